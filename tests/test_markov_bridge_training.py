"""The Discrete Markov Bridge trained from ddlm-train (``--process bridge``): the loss is the score-entropy part
(gradients to the network only) plus the prior term (gradients to the rates only); a run learns its rates, stores
the training data's token frequencies with its weights, resumes bit-exactly, and its folder is scored by ddlm-eval
(with the learnt prior term) and sampled by the SEDD samplers."""

import json

import pytest
import torch

from diffusion import DDiTConfig, DDiTModel
from diffusion.evaluation.likelihood import sequence_nelbo
from diffusion.markov_bridge import BridgeObjective, BridgeProcess, BridgeRate
from diffusion.objectives import DiffusionObjective
from diffusion.spec import DiffusionSpec

K = 9  # 8 real tokens + MASK


def _model(seed=0):
    torch.manual_seed(seed)
    config = DDiTConfig(vocab_size=K, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, cond_dim=16,
                        process="bridge", parameterization="score")
    model = DDiTModel(config)
    rate = BridgeRate.of_model(model)
    rate.set_data_marginal(torch.tensor([5, 1, 2, 3, 1, 4, 2, 2, 0]))
    with torch.no_grad():
        model.bridge_rates.weights[:-1] = torch.linspace(-3.0, -1.0, K - 2)  # leak rates large enough to matter
    return model


def test_the_two_parts_of_the_loss_reach_disjoint_parameters():
    """The network's gradient is the score entropy's alone, the rates' the prior term's alone."""
    model = _model()
    spec = DiffusionSpec.of(model)
    assert isinstance(spec.process, BridgeProcess) and spec.process.mask_id == K - 1
    base = DiffusionObjective.from_spec(spec, "score_entropy")
    x0 = torch.randint(0, K - 1, (3, 6), generator=torch.Generator().manual_seed(1))
    t, xt = base.corrupt(x0, generator=torch.Generator().manual_seed(2))

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}

    both = grads(BridgeObjective(base).loss(model, x0, xt, t).loss)
    score_only = grads(base.loss(model, x0, xt, t).loss)
    prior_only = grads(spec.process.prior_kl(x0).sum() / x0.numel())
    for name in both:
        if name == "bridge_rates.weights":
            assert torch.equal(score_only[name], torch.zeros_like(both[name]))
            assert torch.allclose(both[name], prior_only[name].float(), rtol=1e-5, atol=1e-9)
            assert bool(both[name].abs().sum() > 0)
        else:
            assert torch.allclose(both[name], score_only[name], rtol=1e-5, atol=1e-8), name
    out = BridgeObjective(base).loss(model, x0, xt, t)
    plain = base.loss(model, x0, xt, t)
    prior = spec.process.prior_kl(x0).sum(-1)
    assert torch.allclose(out.per_sequence.double(), plain.per_sequence.double() + prior, atol=1e-4)


def test_the_bound_adds_the_learnt_prior_term_and_the_spec_needs_the_weights():
    model = _model().eval()
    x0 = torch.randint(0, K - 1, (4, 6), generator=torch.Generator().manual_seed(3))
    spec = DiffusionSpec.of(model)
    with_prior, _ = sequence_nelbo(model, x0, num_points=4, generator=torch.Generator().manual_seed(4))
    base = DiffusionObjective.from_spec(spec)
    generator, points = torch.Generator().manual_seed(4), None
    from diffusion.evaluation.likelihood import T_MIN
    from diffusion.time_nodes import time_nodes
    points, weights = time_nodes("quadrature", 4, 4, generator=generator, t_min=T_MIN)
    expected = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for n in range(4):
            t = points[n].float()
            _, xt = base.corrupt(x0, t=t, generator=generator)
            expected += weights[n] * base.loss(model, x0, xt, t).per_sequence.double()
        expected += spec.process.prior_kl(x0).sum(-1)
    assert torch.allclose(with_prior, expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"lives in its weights: build its spec with DiffusionSpec.of\(model\)"):
        DiffusionSpec.from_config(model.config).process


def test_ddlm_train_learns_the_rates_resumes_bit_exactly_and_its_model_is_scored_and_sampled(tmp_path, capsys):
    from safetensors.torch import load_file

    from diffusion.training import train
    from diffusion.training.config import TrainConfig
    from samplers import get_sampler

    config = dict(output_dir=str(tmp_path / "run"), process="bridge", objective="score_entropy", seq_len=32,
                  hidden_size=32, num_layers=1, num_heads=2, cond_dim=16, batch_size=8, max_steps=30, warmup_steps=3,
                  eval_every=15, eval_blocks=16, eval_batch_size=16, save_every=15, lr=3e-3, precision="no",
                  progress=False, max_position_embeddings=32)
    result = train(TrainConfig(**config))
    losses = [r["eval_loss"] for r in map(json.loads, result.metrics_path.read_text().splitlines()) if "eval_loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5, losses
    straight = load_file(str(result.final_dir / "model.safetensors"))
    model = DDiTModel.from_pretrained(result.final_dir)
    start = DDiTModel(model.config).bridge_rates.weights
    assert not torch.equal(model.bridge_rates.weights, start)  # matrix learning moved the rates
    marginal = model.bridge_rates.data_marginal
    assert float(marginal[-1]) == 0.0 and float(marginal.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(marginal.max()) > 10 * float(marginal[marginal > 0].min())  # the corpus's frequencies, not uniform
    config.update(output_dir=str(tmp_path / "resumed"), stop_after_steps=15)
    train(TrainConfig(**config))
    config.update(stop_after_steps=None, resume="auto")
    again = load_file(str(train(TrainConfig(**config)).final_dir / "model.safetensors"))
    assert set(again) == set(straight) and all(torch.equal(straight[name], again[name]) for name in straight)

    spec = DiffusionSpec.of(model)
    for name in ("analytic", "euler"):
        out = get_sampler(name).generate(model, batch_size=2, length=12, num_steps=6,
                                         generator=torch.Generator().manual_seed(0))
        assert out.nfe == 7 and bool((out.tokens < spec.mask_id).all()) and bool((out.tokens >= 0).all())

    from samplers.cli.evaluate import main as eval_main

    capsys.readouterr()
    eval_main(["ppl", "--model", str(result.final_dir), "--max-blocks", "8", "--num-points", "4", "--json"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["form"] == "t" and record["nats_per_token"] > 0


@pytest.mark.parametrize("bad, match", [
    ({"objective": "masked_elbo"}, "needs process='absorbing'|process='bridge' trains a score model"),
    ({"parameterization": "x0"}, "parameterization='x0' is a uniform or nearest-neighbour model|process='bridge' trains a score model"),
    ({"discrete_time": 8}, "no block_size, init_from or discrete_time|discrete_time"),
    ({"streaming": True}, "no streaming and no fsdp"),
    ({"distributed": "fsdp"}, "no streaming and no fsdp"),
])
def test_what_a_bridge_run_cannot_take_is_named(bad, match):
    from diffusion.training.config import TrainConfig

    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"process": "bridge", "objective": "score_entropy", **bad})
    with pytest.raises(ValueError, match="process='bridge' is a score model"):
        DDiTConfig(vocab_size=K, process="bridge", parameterization="x0")
