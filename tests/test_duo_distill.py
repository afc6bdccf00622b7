"""Duo's discrete consistency distillation (diffusion/duo_distill.py) and its ddlm-train round."""

import copy
import json
import math

import pytest
import torch

from diffusion import DDiTConfig, DDiTModel
from diffusion.duo_distill import DuoDistillation
from diffusion.objectives import DiffusionObjective
from diffusion.processes import UniformProcess
from diffusion.schedules import get_schedule

K = 11


def _student(seed=0):
    torch.manual_seed(seed)
    model = DDiTModel(DDiTConfig(vocab_size=K, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 cond_dim=8, process="uniform", parameterization="x0", schedule="geometric",
                                 schedule_kwargs={"sigma_min": 1e-4, "sigma_max": 20.0}))
    with torch.no_grad():  # open the adaLN gates so the noise level matters
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model.eval()


def _objective(teacher, dt):
    base = DiffusionObjective(UniformProcess(K), get_schedule("geometric"), "score_entropy", "x0")
    return DuoDistillation(base, teacher, dt)


def test_one_latent_noise_gives_both_times_and_each_has_the_uniform_marginal():
    student = _student()
    objective = _objective(copy.deepcopy(student), 0.3)
    x0 = torch.randint(0, K, (3000, 8), generator=torch.Generator().manual_seed(0))
    t, pair = objective.corrupt(x0, t=torch.full((3000,), 0.8), generator=torch.Generator().manual_seed(1))
    for index, time in ((0, 0.8), (1, 0.5)):
        stay = float((pair[..., index] == x0).double().mean())
        alpha = float(torch.exp(-objective.schedule.total_noise(torch.tensor(time))))
        expected = alpha + (1 - alpha) / K
        assert abs(stay - expected) < 4 * math.sqrt(expected * (1 - expected) / x0.numel()), (time, stay, expected)
    # less noise, the same eps: where the later time kept x0 the earlier one keeps it too
    assert bool((pair[..., 1] == x0)[pair[..., 0] == x0].all())
    drawn, _ = objective.corrupt(x0[:64], generator=torch.Generator().manual_seed(2))
    assert float(drawn.min()) >= 0.3  # t is shifted by dt: s = t - dt >= 0


def test_a_student_equal_to_its_teacher_has_zero_loss_at_a_vanishing_step_and_only_the_student_learns():
    student = _student()
    x0 = torch.randint(0, K, (4, 9), generator=torch.Generator().manual_seed(3))
    tiny = _objective(copy.deepcopy(student), 1e-9)
    assert float(tiny(student, x0, generator=torch.Generator().manual_seed(4)).loss.detach()) < 1e-6
    objective = _objective(copy.deepcopy(student), 0.5)
    out = objective(student.train(), x0, generator=torch.Generator().manual_seed(4))
    assert float(out.loss) > 1e-4 and bool((out.per_sequence >= 0).all())
    out.loss.backward()
    assert all(p.grad is None for p in objective.teacher.parameters())
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in student.parameters())
    for bad, match in ((dict(dt=0.0), "dt must be in"), (dict(dt=1.5), "dt must be in")):
        with pytest.raises(ValueError, match=match):
            _objective(copy.deepcopy(student), **bad)
    masked = DDiTModel(DDiTConfig(vocab_size=K, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, cond_dim=8))
    with pytest.raises(ValueError, match="teacher must be a uniform x0 model"):
        _objective(masked, 0.1)


def test_ddlm_train_distils_a_duo_model_for_one_round_and_resumes_bit_exactly(tmp_path):
    from safetensors.torch import load_file

    from diffusion.training import train
    from diffusion.training.config import TrainConfig

    common = dict(seq_len=32, hidden_size=32, num_layers=1, num_heads=2, cond_dim=16, batch_size=8, warmup_steps=2,
                  eval_blocks=16, eval_batch_size=16, lr=3e-3, precision="no", progress=False,
                  max_position_embeddings=32)
    teacher = train(TrainConfig(output_dir=str(tmp_path / "duo"), objective="duo", process="uniform", max_steps=20,
                                eval_every=20, save_every=20, **common)).final_dir
    config = dict(output_dir=str(tmp_path / "round"), objective="duo_distill", init_from=str(teacher),
                  distill_dt=0.25, max_steps=16, eval_every=16, save_every=8, log_every=1, **common)
    result = train(TrainConfig(**config))
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r and "eval_loss" not in r]
    assert len(losses) == 16 and sum(losses[-4:]) < sum(losses[:4]), losses
    assert all(math.isfinite(r["eval_loss"]) for r in records if "eval_loss" in r)
    model = DDiTModel.from_pretrained(result.final_dir)
    assert (model.config.process, model.config.parameterization) == ("uniform", "x0")
    straight = load_file(str(result.final_dir / "model.safetensors"))
    config.update(output_dir=str(tmp_path / "resumed"), stop_after_steps=8)
    train(TrainConfig(**config))
    config.update(stop_after_steps=None, resume="auto")
    again = load_file(str(train(TrainConfig(**config)).final_dir / "model.safetensors"))
    assert all(torch.equal(straight[name], again[name]) for name in straight)
    for bad, match in (({"init_from": None}, "give both"), ({"distill_dt": 2.0}, "distill_dt must be in"),
                       ({"objective": "masked_elbo", "init_from": None}, "distill_dt is for objective='duo_distill'")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**{**dict(objective="duo_distill", init_from="x", distill_dt=0.1), **bad})
