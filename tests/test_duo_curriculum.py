"""Duo's curriculum (diffusion/duo_curriculum.py) and the schedule of its Gaussian band (diffusion/duo.py)."""

import json
import math

import pytest
import torch

from diffusion import DDiTConfig, DDiTModel
from diffusion.duo import DuoSchedule, gaussian_signal, uniform_alpha
from diffusion.duo_curriculum import DuoCurriculum
from diffusion.losses import score_entropy_loss
from diffusion.objectives import DiffusionObjective
from diffusion.processes import UniformProcess
from diffusion.schedules import get_schedule

K = 11


def _model(seed=0):
    torch.manual_seed(seed)
    return DDiTModel(DDiTConfig(vocab_size=K, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, cond_dim=8,
                                process="uniform", parameterization="x0", schedule="geometric",
                                schedule_kwargs={"sigma_min": 1e-4, "sigma_max": 20.0})).eval()


def _curriculum(**kwargs):
    base = DiffusionObjective(UniformProcess(K), get_schedule("geometric"), "score_entropy", "x0")
    return DuoCurriculum(base, **{"end": 100, "anneal_from": 50, **kwargs})


def test_the_schedule_is_the_uniform_process_of_the_gaussian_band_and_its_rate_is_the_derivative():
    schedule = DuoSchedule(K)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
    a = gaussian_signal(-3.5 + t * 1.75)
    assert torch.allclose(a * a, torch.sigmoid(3.5 - t * 1.75))
    assert torch.allclose(schedule.total_noise(t), -torch.log(uniform_alpha(a, K)), rtol=1e-12)
    h = 1e-4
    inner = t.clamp(h, 1 - h)
    numeric = (schedule.total_noise(inner + h) - schedule.total_noise(inner - h)) / (2 * h)
    assert torch.allclose(schedule.rate(inner), numeric, rtol=1e-5)
    assert bool((schedule.rate(t) > 0).all())  # more log-SNR, less signal, more noise
    with pytest.raises(ValueError, match="gamma_min < gamma_max"):
        DuoSchedule(K, gamma_min=-1.0, gamma_max=-2.0)


def test_the_temperature_falls_log_linearly_and_the_base_objective_follows_the_curriculum():
    curriculum = _curriculum()
    assert curriculum.at_step(0).tau == pytest.approx(0.1)
    assert curriculum.at_step(50).tau == pytest.approx(0.1)
    assert curriculum.at_step(75).tau == pytest.approx(10 ** -1.5)
    assert curriculum.at_step(99).tau == pytest.approx(10 ** (-1 - 49 / 50))
    assert curriculum.at_step(100) is curriculum.base
    for bad, match in (({"end": 0}, "end >= 1"), ({"anneal_from": 100}, "anneal_from < end"),
                       ({"tau_log10": (-1.0, math.inf)}, "tau_log10")):
        with pytest.raises(ValueError, match=match):
            _curriculum(**bad)
    with pytest.raises(ValueError, match="uniform x0 model"):
        DuoCurriculum(DiffusionObjective(UniformProcess(K), get_schedule("geometric"), "score_entropy", "score"),
                      end=10)


def test_the_argmax_of_the_latent_is_the_uniform_process_at_the_schedules_noise():
    curriculum = _curriculum()
    x0 = torch.randint(0, K, (4000, 8), generator=torch.Generator().manual_seed(0))
    t = torch.full((4000,), 0.6)
    _, latent = curriculum.corrupt(x0, t=t, generator=torch.Generator().manual_seed(1))
    stay = float((latent.argmax(-1) == x0).double().mean())
    alpha = float(torch.exp(-curriculum.schedule.total_noise(torch.tensor(0.6))))
    expected = alpha + (1 - alpha) / K
    assert abs(stay - expected) < 4 * math.sqrt(expected * (1 - expected) / x0.numel())


def test_at_zero_temperature_the_curriculum_loss_is_the_uniform_elbo_under_its_schedule():
    """The exact limit: one-hot inputs of x_t are the token embeddings, and the loss is score entropy on the x0
    model's scores with the rate and noise of DuoSchedule, the uniform process's ELBO integrand."""
    model, curriculum = _model(), _curriculum()
    x0 = torch.randint(0, K, (6, 9), generator=torch.Generator().manual_seed(2))
    t, latent = curriculum.corrupt(x0, generator=torch.Generator().manual_seed(3))
    got = curriculum.loss(model, x0, latent, t, tau=0.0).per_sequence
    x_t = latent.argmax(-1)
    sigma_bar = curriculum.schedule.total_noise(t).float()
    log_probs = model(input_ids=x_t, total_noise=sigma_bar).logits
    log_score = UniformProcess(K).log_score_from_log_probs(log_probs, sigma_bar, x_t)
    expected = score_entropy_loss(log_score, x0, x_t, t, UniformProcess(K), curriculum.schedule)
    assert torch.allclose(got, expected, rtol=1e-5)
    warm = curriculum.loss(model, x0, latent, t).per_sequence  # tau = 0.1: the relaxed input changes the loss
    assert not torch.allclose(warm, expected, rtol=1e-3)


def test_one_hot_input_weights_are_the_token_embeddings():
    model = _model()
    ids = torch.randint(0, K, (2, 5), generator=torch.Generator().manual_seed(4))
    noise = torch.tensor([0.3, 1.2])
    plain = model(input_ids=ids, total_noise=noise).logits
    weighted = model(input_ids=ids, total_noise=noise, input_weights=torch.nn.functional.one_hot(ids, K).float()).logits
    assert torch.allclose(plain, weighted, atol=1e-6)
    with pytest.raises(ValueError, match="input_weights must be"):
        model(input_ids=ids, total_noise=noise, input_weights=torch.ones(2, 5, K - 1))


def test_ddlm_train_runs_the_curriculum_then_the_elbo_and_resumes_bit_exactly(tmp_path):
    from safetensors.torch import load_file

    from diffusion.training import train
    from diffusion.training.config import TrainConfig

    config = dict(output_dir=str(tmp_path / "run"), objective="duo", process="uniform", seq_len=32, hidden_size=32,
                  num_layers=1, num_heads=2, cond_dim=16, batch_size=8, max_steps=40, duo_curriculum_steps=24,
                  warmup_steps=4, eval_every=20, eval_blocks=16, eval_batch_size=16, save_every=20, lr=3e-3,
                  precision="no", progress=False, max_position_embeddings=32)
    result = train(TrainConfig(**config))
    losses = [r["eval_loss"] for r in map(json.loads, result.metrics_path.read_text().splitlines()) if "eval_loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.3, losses
    straight = load_file(str(result.final_dir / "model.safetensors"))
    model = DDiTModel.from_pretrained(result.final_dir)
    assert (model.config.process, model.config.parameterization) == ("uniform", "x0")
    config.update(output_dir=str(tmp_path / "resumed"), stop_after_steps=20)
    train(TrainConfig(**config))
    config.update(stop_after_steps=None, resume="auto")
    again = load_file(str(train(TrainConfig(**config)).final_dir / "model.safetensors"))
    assert all(torch.equal(straight[name], again[name]) for name in straight)
    for bad, match in (({"process": "absorbing"}, "objective='duo' trains a uniform x0 model|parameterization='x0'"),
                       ({"duo_curriculum_steps": 1}, "duo_curriculum_steps must be"),
                       ({"discrete_time": 8}, "no block_size, init_from or discrete_time")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**{**dict(objective="duo", process="uniform"), **bad})
