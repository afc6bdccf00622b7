"""The ARDM training objective (diffusion/objectives.py, objective='ardm'): exact-count masks, the weight D/m, and
on an enumerated joint with exact conditionals its exact expectation and every order's sum equal log p(x)."""

import itertools
import math

import pytest
import torch
from scipy.stats import chisquare

from diffusion import DiffusionSpec
from diffusion.objectives import DiffusionObjective, exact_count_masks
from diffusion.training.config import TrainConfig
from tests.reference import ExactDenoiser, conditional, enumerate_joint

V, D = 3, 3
MASK = V


@pytest.fixture(scope="module")
def exact():
    joint = enumerate_joint(V, D, seed=11)
    model = ExactDenoiser(joint, prefix=0)
    objective = DiffusionObjective.from_spec(DiffusionSpec.from_config(model.config), "ardm")
    return joint, model, objective


def test_exactly_m_positions_are_masked_and_m_is_uniform():
    masked, t = exact_count_masks((6000, 7), generator=torch.Generator().manual_seed(0))
    counts = masked.sum(-1)
    assert torch.equal(counts.float() / 7, t)  # the paper's t = D - m + 1: exactly m = D - t + 1 masked
    observed = torch.bincount(counts, minlength=8)[1:].double()
    assert observed.sum() == 6000 and chisquare(observed.numpy()).pvalue > 1e-3
    # every position is masked equally often (a uniformly random subset)
    assert chisquare(masked.sum(0).double().numpy()).pvalue > 1e-3
    plain, _ = exact_count_masks((6000, 7), antithetic=False, generator=torch.Generator().manual_seed(1))
    assert chisquare(torch.bincount(plain.sum(-1), minlength=8)[1:].double().numpy()).pvalue > 1e-3


def test_the_exact_expectation_over_counts_and_masks_is_the_nll(exact):
    joint, model, objective = exact
    for x in list(joint)[:6]:
        x0 = torch.tensor([x])
        expectation = 0.0
        for m in range(1, D + 1):  # m uniform on 1..D, then a uniform subset of size m
            subsets = list(itertools.combinations(range(D), m))
            for subset in subsets:
                xt = x0.clone()
                xt[0, list(subset)] = MASK
                out = objective.loss(model, x0, xt, torch.tensor([m / D]))
                expectation += float(out.per_sequence[0]) / (D * len(subsets))
        assert expectation == pytest.approx(-math.log(joint[x]), abs=1e-9)


def test_every_order_gives_exactly_log_p(exact):
    joint, _, _ = exact
    for x in list(joint)[:6]:
        values = []
        for order in itertools.permutations(range(D)):
            total, seen = 0.0, []
            for k in order:
                masked = tuple(i for i in range(D) if i not in seen)
                probe = tuple(x[i] if i in seen else MASK for i in range(D))
                total += math.log(conditional(joint, probe, masked, k)[x[k]])
                seen.append(k)
            values.append(total)
        assert max(values) - min(values) < 1e-12 and values[0] == pytest.approx(math.log(joint[x]), abs=1e-12)


def test_the_loss_is_d_over_m_times_the_masked_nll(exact):
    joint, model, objective = exact
    x0 = torch.tensor([list(next(iter(joint)))] * 400)
    t, xt = objective.corrupt(x0, generator=torch.Generator().manual_seed(3))
    out = objective.loss(model, x0, xt, t)
    log_probs = model(input_ids=xt).logits
    nll = -log_probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1) * (xt == MASK)
    counts = (xt == MASK).sum(-1)
    assert torch.equal(counts.float() / D, t.float())
    assert torch.allclose(out.per_sequence.double(), (D / counts.double()) * nll.sum(-1), rtol=1e-9)


def test_ardm_needs_an_absorbing_subs_model():
    with pytest.raises(ValueError, match="objective='ardm' needs process='absorbing', got process='uniform'"):
        TrainConfig(objective="ardm", process="uniform")
    with pytest.raises(ValueError, match="objective='ardm' needs parameterization='subs'"):
        TrainConfig(objective="ardm", parameterization="score")
    assert TrainConfig(objective="ardm").resolved_parameterization == "subs"


def test_ddlm_train_with_ardm_checkpoints_resumes_and_is_scored_by_ddlm_eval(tmp_path, capsys):
    import json

    from diffusion.adapters import load_denoiser
    from diffusion.training import train
    from samplers.cli.evaluate import main as evaluate_main

    config = dict(output_dir=str(tmp_path / "run"), objective="ardm", seq_len=32, hidden_size=32, num_layers=1,
                  num_heads=2, cond_dim=16, batch_size=4, max_steps=6, warmup_steps=2, eval_every=3, eval_blocks=8,
                  eval_batch_size=8, log_every=1, save_every=3, precision="no", progress=False,
                  max_position_embeddings=64)
    result = train(TrainConfig(**config))
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    held_out = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(held_out) == 3 and all(math.isfinite(v) for v in held_out)
    model, _ = load_denoiser(str(result.final_dir))
    assert model.config.parameterization == "subs" and not model.config.time_conditioning
    # resume from step 3 reaches the same final weights as the uninterrupted run
    from safetensors.torch import load_file

    straight = load_file(str(result.final_dir / "model.safetensors"))
    config.update(output_dir=str(tmp_path / "resumed"), stop_after_steps=3)
    train(TrainConfig(**config))
    config.update(stop_after_steps=None, resume="auto")
    resumed = train(TrainConfig(**config))
    again = load_file(str(resumed.final_dir / "model.safetensors"))
    assert all(torch.equal(straight[name], again[name]) for name in straight)
    assert evaluate_main(["ppl", "--model", str(result.final_dir), "--max-blocks", "4", "--num-points", "2",
                          "--json"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["form"] == "lambda" and math.isfinite(scored["nats_per_token"])  # the masked ELBO's bound


@pytest.fixture(scope="module")
def time_free_model():
    """A random time-free subs DDiT in float64: conditionals that belong to no joint, so that no identity of exact
    conditionals makes the two estimators below agree by accident."""
    from diffusion.modeling_ddit import DDiTConfig, DDiTModel

    torch.manual_seed(5)
    model = DDiTModel(DDiTConfig(vocab_size=V + 1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 cond_dim=8, parameterization="subs", max_position_embeddings=D)).double().eval()
    for parameter in model.parameters():  # adaLN-zero and zero-initialised heads would make every output uniform
        torch.nn.init.normal_(parameter, std=0.5)
    assert not model.config.needs_sigma
    return model


def _exact_masked_elbo(model, x0, objective):
    """int_0^1 w(t) E_{Bernoulli masks}[sum_masked -log p] dt in float64: every mask enumerated with its probability
    at each node of a Gauss-Legendre rule (the integrand is a polynomial of degree D - 1 in t for eps = 0)."""
    from diffusion.time_nodes import gauss_legendre_01

    nodes, weights = gauss_legendre_01(D + 2)
    total = 0.0
    for t, w in zip(nodes.tolist(), weights.tolist()):
        p = float(objective.schedule.mask_probability(t))
        for mask in itertools.product((False, True), repeat=D):
            xt = x0.clone()
            xt[0, list(i for i in range(D) if mask[i])] = MASK
            probability = math.prod(p if m else 1 - p for m in mask)
            out = objective.loss(model, x0, xt, torch.tensor([t], dtype=torch.float64))
            total += w * probability * out.per_sequence[0].item()
    return total


def _exact_ardm(model, x0, objective):
    total = 0.0
    for m in range(1, D + 1):
        subsets = list(itertools.combinations(range(D), m))
        for subset in subsets:
            xt = x0.clone()
            xt[0, list(subset)] = MASK
            out = objective.loss(model, x0, xt, torch.tensor([m / D], dtype=torch.float64))
            total += out.per_sequence[0].item() / (D * len(subsets))
    return total


def test_for_a_time_free_model_the_exact_count_estimator_has_the_continuous_bounds_expectation(time_free_model):
    """The held-out evaluation of a time-free masked model (diffusion/training/loop.py, held_out_objective) swaps the
    continuous masked ELBO's Bernoulli masks for exact counts: both must have the same expectation, float64."""
    from diffusion.schedules import LogLinearSchedule
    from diffusion.training.loop import held_out_objective

    spec = DiffusionSpec.from_config(time_free_model.config)
    continuous = DiffusionObjective(spec.process, LogLinearSchedule(eps=0.0), "masked_elbo", "subs")
    counted = held_out_objective(continuous, time_free=True)
    assert counted.objective == "ardm" and held_out_objective(continuous, time_free=False) is continuous
    for x in [(0, 1, 2), (2, 2, 0), (1, 0, 1)]:
        x0 = torch.tensor([x])
        bound = _exact_masked_elbo(time_free_model, x0, continuous)
        # the model's outputs are float32 (DDiTModel.forward), the sums float64
        assert _exact_ardm(time_free_model, x0, counted) == pytest.approx(bound, rel=1e-6)
        assert bound > 1.0  # a random model: far from any exact conditional


def test_the_exact_count_draws_average_to_the_bound(time_free_model):
    """Monte Carlo over the training/evaluation sampler itself (stratified counts across the batch): the mean of
    20000 draws lies within 4 standard errors of the exact expectation, float64."""
    spec = DiffusionSpec.from_config(time_free_model.config)
    objective = DiffusionObjective.from_spec(spec, "ardm")
    x0 = torch.tensor([[2, 0, 1]]).expand(20000, D).contiguous()
    t, xt = objective.corrupt(x0, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        draws = objective.loss(time_free_model, x0, xt, t.double()).per_sequence.double()
    exact = _exact_ardm(time_free_model, x0[:1], objective)
    assert abs(draws.mean().item() - exact) < 4 * draws.std().item() / math.sqrt(len(draws))
    # stratified counts: the batch holds every count 1..D equally often (up to one)
    counts = torch.bincount((xt == MASK).sum(-1), minlength=D + 1)[1:]
    assert counts.sum() == 20000 and counts.max() - counts.min() <= 1
