"""x0-parameterised uniform models (``parameterization="x0"``): the score identity, the continuous ELBO and D3PM's
discrete-time bound on one enumerated toy, the d3pm sampler's step, and the training command."""

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from diffusion import DDiTConfig, DDiTModel
from diffusion.d3pm import DiscreteTime
from diffusion.objectives import DiffusionObjective
from diffusion.processes import UniformProcess
from diffusion.schedules import LogLinearSchedule
from diffusion.spec import DiffusionSpec
from samplers import get_sampler
from tests.reference import enumerate_joint

N = 3


class ExactUniformDenoiser(torch.nn.Module):
    """A time-conditioned x0 denoiser with the exact per-position posteriors ``p(x0^i | x_t)`` of an enumerated
    joint under the uniform process at the given ``total_noise``, by Bayes over every clean sequence."""

    def __init__(self, joint: dict[tuple[int, ...], float], schedule_kwargs: dict | None = None) -> None:
        super().__init__()
        self.joint = joint
        self.length = len(next(iter(joint)))
        self.process = UniformProcess(N)
        self.config = SimpleNamespace(mask_token_id=None, vocab_size=N, process="uniform", parameterization="x0",
                                      time_conditioning=True, max_position_embeddings=self.length, num_tokens=N,
                                      schedule="loglinear", schedule_kwargs=schedule_kwargs or {"eps": 1e-3})
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.calls = 0

    def posterior(self, x_t: tuple[int, ...], sigma_bar: float) -> torch.Tensor:
        out = torch.zeros(self.length, N, dtype=torch.float64)
        kernel = self.process.transition_probs(torch.arange(N), torch.tensor(sigma_bar, dtype=torch.float64))
        for x0, p in self.joint.items():
            weight = p * math.prod(float(kernel[a, b]) for a, b in zip(x0, x_t))
            out[range(self.length), list(x0)] += weight
        return out / out.sum(-1, keepdim=True)

    def forward(self, input_ids, total_noise=None, **kwargs):
        from transformers.modeling_outputs import MaskedLMOutput

        self.calls += 1
        noise = torch.as_tensor(total_noise, dtype=torch.float64).expand(input_ids.shape[0])
        rows = [self.posterior(tuple(r), float(s)).log() for r, s in zip(input_ids.tolist(), noise)]
        return MaskedLMOutput(logits=torch.stack(rows))


def _marginal(joint, sigma_bar):
    """p_t(x) for every sequence x of the toy's length, under the uniform process at ``sigma_bar``."""
    process = UniformProcess(N)
    kernel = process.transition_probs(torch.arange(N), torch.tensor(sigma_bar, dtype=torch.float64))
    length = len(next(iter(joint)))
    return {x: sum(p * math.prod(float(kernel[a, b]) for a, b in zip(x0, x)) for x0, p in joint.items())
            for x in itertools.product(range(N), repeat=length)}


def test_the_score_of_the_exact_posterior_is_the_ratio_of_marginals():
    """log_score_from_log_probs applied to p(x0^i | x_t) gives s_y = p_t(x with y at i) / p_t(x), brute force."""
    joint = enumerate_joint(N, 2, seed=3)
    model = ExactUniformDenoiser(joint)
    process = UniformProcess(N)
    for sigma_bar in (0.05, 0.7, 3.0):
        marginal = _marginal(joint, sigma_bar)
        for x in marginal:
            log_probs = model.posterior(x, sigma_bar).log()
            score = process.log_score_from_log_probs(log_probs, sigma_bar, torch.tensor(x)).exp()
            for i, y in itertools.product(range(2), range(N)):
                moved = tuple(y if j == i else x[j] for j in range(2))
                assert float(score[i, y]) == pytest.approx(marginal[moved] / marginal[x], rel=1e-10)


def _continuous_bound(model, joint, nodes=48):
    """The continuous ELBO of the model, exactly in x_t and by Gauss-Legendre in t: int_0^1 E[L(x0, t)] dt plus
    KL(q(x_1 | x0) || uniform), with the objective's own per-sequence loss (score entropy on the x0 identity)."""
    objective = DiffusionObjective.from_spec(DiffusionSpec.from_config(model.config))
    assert objective.objective == "score_entropy" and objective.parameterization == "x0"
    sequences = list(itertools.product(range(N), repeat=model.length))
    x0 = torch.tensor([a for a in joint for _ in sequences])
    x_t = torch.tensor([b for _ in joint for b in sequences])
    p_data = torch.tensor([p for p in joint.values() for _ in sequences], dtype=torch.float64)
    points, weights = np.polynomial.legendre.leggauss(nodes)
    total = 0.0
    for u, w in zip(points, weights):  # t = v^3 with v uniform on (0, 1): nodes crowd the t -> 0 end
        v = (u + 1) / 2
        t, w = v ** 3, w * 3 * v ** 2
        sigma = objective.schedule.total_noise(torch.tensor(t, dtype=torch.float64))
        reach = UniformProcess(N).transition_probs(x0, sigma).gather(-1, x_t.unsqueeze(-1)).squeeze(-1).prod(-1)
        loss = objective.loss(model, x0, x_t, torch.full((len(x0),), t, dtype=torch.float64)).per_sequence
        total += w / 2 * float((p_data * reach * loss.double()).sum())
    sigma_end = float(objective.schedule.total_noise(torch.tensor(1.0, dtype=torch.float64)))
    end = UniformProcess(N).transition_probs(torch.tensor(0), torch.tensor(sigma_end, dtype=torch.float64))
    prior = float((end * torch.log(end * N)).sum()) * model.length
    return total + prior


def _discrete_bound(model, joint, steps):
    """D3PM's L_vb of the model over T steps, exactly: every clean sequence and every x_k, through the objective."""
    objective = DiffusionObjective.from_spec(DiffusionSpec.from_config(model.config), discrete_time=steps)
    sequences = list(itertools.product(range(N), repeat=model.length))
    x0 = torch.tensor([a for a in joint for _ in sequences])
    x_k = torch.tensor([b for _ in joint for b in sequences])
    p_data = torch.tensor([p for p in joint.values() for _ in sequences], dtype=torch.float64)
    chain = DiscreteTime(UniformProcess(N), objective.schedule, steps)
    total = 0.0
    for k in range(1, steps + 1):
        reach = chain.marginal(x0, torch.full((len(x0),), k)).gather(-1, x_k.unsqueeze(-1)).squeeze(-1).prod(-1)
        t = torch.full((len(x0),), k / steps, dtype=torch.float64)
        per_sequence = objective.loss(model, x0, x_k, t).per_sequence.double()  # prior + T L_{k-1}
        total += float((p_data * reach * per_sequence).sum()) / steps
    return total


def test_with_exact_posteriors_the_continuous_bound_is_tight_and_the_discrete_one_falls_to_it():
    """Two positions of N = 3 tokens.  With exact posteriors the continuous ELBO (through the objective's score
    entropy on the x0 identity) is tight: H(data) + KL(q(x_1) || uniform), since the reverse chain with exact ratios
    is the true reverse and moves one position at a time.  Each T-step reverse step factorises over positions, so
    L_vb(T) sits above it and falls to it as T = 2, 8, 32, 128."""
    joint = enumerate_joint(N, 2, seed=5)
    model = ExactUniformDenoiser(joint)
    entropy = -sum(p * math.log(p) for p in joint.values())
    data = torch.zeros(N, N, dtype=torch.float64)
    for x0, p in joint.items():
        data[x0] = p
    sigma_end = LogLinearSchedule(1e-3).total_noise(torch.tensor(1.0, dtype=torch.float64))
    kernel = UniformProcess(N).transition_probs(torch.arange(N), sigma_end)  # [x0, x_1]
    at_end = kernel.T @ data @ kernel  # q(x_1) over pairs
    tight = entropy + float((at_end * torch.log(at_end * N * N)).sum())
    continuous = _continuous_bound(model, joint)
    assert continuous == pytest.approx(tight, abs=1e-8)
    bounds = [_discrete_bound(model, joint, steps) for steps in (2, 8, 32, 128)]
    assert all(a > b for a, b in zip(bounds, bounds[1:])), bounds
    assert bounds[-1] > continuous
    assert bounds[-1] - continuous < 0.05 * (bounds[0] - continuous), (bounds, continuous)


def test_on_one_position_the_exact_model_makes_every_bound_the_entropy_plus_the_prior_term():
    """With one position the mixture of posteriors is the exact reverse kernel q(x_{k-1} | x_k), so at every T
    L_vb = H(data) + KL(q(x_T) || p(x_T)): the data's entropy plus the prior's mismatch with the data at t = 1."""
    joint = enumerate_joint(N, 1, seed=2)
    model = ExactUniformDenoiser(joint)
    entropy = -sum(p * math.log(p) for p in joint.values())
    data = torch.tensor(list(joint.values()), dtype=torch.float64)
    sigma_end = LogLinearSchedule(1e-3).total_noise(torch.tensor(1.0, dtype=torch.float64))
    at_end = UniformProcess(N).push_probs(data, sigma_end)  # q(x_T), the same for every T
    mismatch = float((at_end * torch.log(at_end * N)).sum())
    for steps in (1, 4, 16):
        assert _discrete_bound(model, joint, steps) == pytest.approx(entropy + mismatch, abs=1e-9)


def test_the_d3pm_samplers_step_is_the_x0_posterior_and_it_samples_the_data_on_one_position():
    chain = DiscreteTime(UniformProcess(N), LogLinearSchedule(1e-3), 6)
    process = chain.process
    generator = torch.Generator().manual_seed(0)
    for k in range(1, 7):
        log_probs = torch.randn(5, N, generator=generator, dtype=torch.float64).log_softmax(-1)
        x_k = torch.randint(0, N, (5,), generator=generator)
        sigma_now, sigma_before = chain.sigma(torch.tensor(k)), chain.sigma(torch.tensor(k - 1))
        score = process.log_score_from_log_probs(log_probs, sigma_now, x_k).exp()
        analytic = process.analytic_transition(x_k, score, sigma_now - sigma_before)
        assert torch.allclose(analytic / analytic.sum(-1, keepdim=True),
                              chain.posterior(x_k, log_probs.exp(), torch.tensor(k)), atol=1e-10)

    joint = enumerate_joint(N, 1, seed=6)
    model = ExactUniformDenoiser(joint)
    out = get_sampler("d3pm").generate(model, batch_size=3000, length=1, num_steps=8,
                                       generator=torch.Generator().manual_seed(1))
    assert out.nfe == 8 and model.calls == 8
    observed = torch.bincount(out.tokens[:, 0], minlength=N).numpy()
    assert chisquare(observed, np.array(list(joint.values())) * 3000).pvalue > 1e-3
    with pytest.raises(ValueError, match="num_steps=1"):
        get_sampler("d3pm").generate(model, batch_size=2, length=1, num_steps=1)


def test_parameterization_x0_is_refused_where_it_does_not_fit():
    with pytest.raises(ValueError, match="parameterization='x0' needs process='uniform' or 'nearest_neighbour'"):
        DDiTConfig(vocab_size=8, process="absorbing", parameterization="x0")
    schedule = LogLinearSchedule()
    with pytest.raises(ValueError, match="objective='masked_elbo'"):
        DiffusionObjective(UniformProcess(N), schedule, "masked_elbo", "x0")
    with pytest.raises(ValueError, match="parameterization='score'"):
        DiffusionObjective(UniformProcess(N), schedule, "score_entropy", "score", discrete_time=8)
    from diffusion.training import TrainConfig

    with pytest.raises(ValueError, match="parameterization='x0' is a uniform or nearest-neighbour model"):
        TrainConfig(parameterization="x0", process="absorbing", objective="score_entropy")
    with pytest.raises(ValueError, match="discrete_time"):
        TrainConfig(parameterization="score", process="uniform", objective="score_entropy", discrete_time=8)


def test_the_x0_model_is_time_conditioned_and_outputs_log_probabilities():
    model = DDiTModel(DDiTConfig(vocab_size=11, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 cond_dim=8, process="uniform", parameterization="x0", schedule="geometric",
                                 schedule_kwargs={"sigma_min": 1e-4, "sigma_max": 20.0}))
    assert model.config.time_conditioning
    ids = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids, total_noise=torch.tensor([0.5, 2.0])).logits
    assert torch.allclose(logits.exp().sum(-1), torch.ones(2, 6), atol=1e-5)
    # the head's prior: with zero raw logits the model is the posterior of uniform data, keeping x_t with
    # probability alpha + (1 - alpha) / N and spreading the rest evenly
    with torch.no_grad():
        model.lm_head.weight.zero_()
    for sigma_bar in (1e-3, 0.5, 20.0):
        probs = model(input_ids=ids, total_noise=torch.tensor(sigma_bar)).logits.exp()
        alpha = math.exp(-sigma_bar)
        expected = torch.full_like(probs, (1 - alpha) / 11).scatter(-1, ids[..., None], alpha + (1 - alpha) / 11)
        assert torch.allclose(probs, expected, rtol=1e-4, atol=1e-7), sigma_bar
    with pytest.raises(ValueError, match="pass total_noise"):
        model(input_ids=ids)


def test_ddlm_train_trains_a_uniform_x0_model_in_continuous_and_discrete_time(tmp_path):
    import json

    from diffusion.adapters import load_denoiser
    from diffusion.training import train
    from diffusion.training.config import TrainConfig

    common = dict(seq_len=32, hidden_size=32, num_layers=1, num_heads=2, cond_dim=16, batch_size=8, max_steps=40,
                  warmup_steps=4, eval_every=40, eval_blocks=16, eval_batch_size=16, save_every=40,
                  precision="no", progress=False, max_position_embeddings=32, lr=3e-3,
                  process="uniform", parameterization="x0", objective="score_entropy")
    for name, extra in (("continuous", {}), ("d3pm", {"discrete_time": 100})):
        result = train(TrainConfig(output_dir=str(tmp_path / name), **common, **extra))
        losses = [json.loads(line)["eval_loss"] for line in result.metrics_path.read_text().splitlines()
                  if "eval_loss" in json.loads(line)]
        assert len(losses) == 2 and losses[1] < losses[0] - 0.3, (name, losses)
        model, _ = load_denoiser(str(result.final_dir))
        assert (model.config.parameterization, model.config.time_conditioning) == ("x0", True)
        out = get_sampler("d3pm").generate(model, batch_size=2, length=32, num_steps=8,
                                           generator=torch.Generator().manual_seed(0))
        assert out.nfe == 8 and out.tokens.shape == (2, 32) and int(out.tokens.max()) < model.config.vocab_size


def test_the_psi_samplers_kappa_follows_its_definitions_and_kappa_one_is_the_analytic_sampler():
    from samplers.psi import psi_kappa

    alpha_t, alpha_s = torch.tensor([0.1, 0.5, 0.98]), torch.tensor([0.2, 0.9, 0.999])
    budget = (1 - alpha_s) / alpha_t
    cap = (1 - torch.minimum(torch.full_like(budget, 0.05), budget) / (1 - alpha_s)).clamp(0, 1)
    rescale = (1 - 0.5 * budget.clamp(max=1) / (1 - alpha_s)).clamp(0, 1)
    assert torch.allclose(psi_kappa("cap", 0.05, alpha_t, alpha_s), cap)
    assert torch.allclose(psi_kappa("rescale", 0.5, alpha_t, alpha_s), rescale)
    assert torch.equal(psi_kappa("constant", 0.3, alpha_t, alpha_s), torch.full((3,), 0.3))

    torch.manual_seed(0)
    model = DDiTModel(DDiTConfig(vocab_size=11, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 cond_dim=8, process="uniform", parameterization="x0", schedule="geometric",
                                 schedule_kwargs={"sigma_min": 1e-4, "sigma_max": 20.0})).eval()
    runs = {name: sampler.generate(model, batch_size=4, length=10, num_steps=12,
                                   generator=torch.Generator().manual_seed(5)).tokens
            for name, sampler in (("analytic", get_sampler("analytic")),
                                  ("psi-1", get_sampler("psi", mode="constant", eta=1.0)),
                                  ("psi-half", get_sampler("psi", mode="constant", eta=0.5)))}
    assert torch.equal(runs["psi-1"], runs["analytic"])
    assert not torch.equal(runs["psi-half"], runs["analytic"])
    for bad, match in (({"mode": "loop"}, "mode must be one of"), ({"eta": 1.5}, "eta must be in")):
        with pytest.raises(ValueError, match=match):
            get_sampler("psi", **bad)


@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_every_psi_mixture_keeps_the_marginal_so_an_exact_model_samples_the_data(kappa):
    """One position, exact posteriors: the posterior step and the predict-then-renoise step both have the forward
    marginal p_s, so any mixture of them ends at the data (chi-square)."""
    joint = enumerate_joint(N, 1, seed=8)
    model = ExactUniformDenoiser(joint)
    out = get_sampler("psi", mode="constant", eta=kappa).generate(model, batch_size=3000, length=1, num_steps=6,
                                                                  generator=torch.Generator().manual_seed(2))
    assert out.nfe == 7  # six steps and the final denoising step
    observed = torch.bincount(out.tokens[:, 0], minlength=N).numpy()
    assert chisquare(observed, np.array(list(joint.values())) * 3000).pvalue > 1e-3
    with pytest.raises(ValueError, match="uniform-process models"):
        get_sampler("psi").generate(
            DDiTModel(DDiTConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 cond_dim=8)), batch_size=1, length=4, num_steps=2)


def test_the_score_identity_holds_in_float32_at_the_smallest_noise_levels():
    """A confident posterior at x_t (mass 1 - 1e-10): the true ratios are about sigma_bar / N, which the identity
    must not compute as 1 - N p_xt / (N + e^sigma - 1) in float32, where that difference rounds to 0."""
    n, process = 4096, UniformProcess(4096)
    x_t = torch.tensor([5])
    log_probs = torch.full((1, n), math.log(1e-10 / (n - 1)), dtype=torch.float64)
    log_probs[0, 5] = math.log1p(-1e-10)
    for sigma_bar in (1e-4, 1e-2, 1.0):
        kernel_same, kernel_other = math.exp(-sigma_bar) + -math.expm1(-sigma_bar) / n, -math.expm1(-sigma_bar) / n
        probs = log_probs.exp()[0]
        # s_y = sum_x0 p(x0) q(y | x0) / q(x_t | x0), brute force in float64 over the three kinds of x0
        reference = torch.tensor([
            probs[5] * kernel_other / kernel_same + probs[y] * kernel_same / kernel_other
            + (1 - probs[5] - probs[y]) for y in range(n)], dtype=torch.float64)
        score = process.log_score_from_log_probs(log_probs.float(), sigma_bar, x_t)[0].double()
        keep = torch.arange(n) != 5
        assert torch.allclose(score[keep], reference[keep].log(), atol=1e-3), sigma_bar
