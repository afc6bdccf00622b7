"""Losses: exact-model integrals equal the NLL; finite at the endpoints; the t-sampler is stratified."""

import itertools
import math

import numpy as np
import pytest
import torch

from diffusion.losses import masked_diffusion_loss, score_entropy_loss
from diffusion.objectives import DiffusionObjective
from diffusion.processes import AbsorbingProcess, UniformProcess
from diffusion.schedules import GeometricSchedule, LogLinearSchedule
from tests.reference import conditional, enumerate_joint


def _gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)


P0 = torch.tensor([0.5, 0.05, 0.3, 0.15], dtype=torch.float64)  # a one-token data distribution, N = 4


@pytest.mark.parametrize(
    "schedule", [LogLinearSchedule(eps=1e-3), GeometricSchedule(sigma_min=1e-3, sigma_max=12.0)], ids=repr
)
def test_absorbing_score_entropy_one_token_exact_model(schedule):
    # E_t [ (1 - alpha_t) L(MASK) ] over t in [0, 1] = (alpha_0 - alpha_1) * NLL for the exact score
    # s_y = p(y) / (e^sigma_bar - 1); for the log-linear schedule alpha_0 - alpha_1 = 1 - eps.
    process = AbsorbingProcess(4)
    nodes, weights = _gauss_legendre(200)
    for x0 in range(4):
        sigma_bar = schedule.total_noise(nodes)
        log_score = torch.full((len(nodes), 1, 5), 0.0, dtype=torch.float64)
        log_score[:, 0, :4] = P0.log() - torch.log(torch.expm1(sigma_bar))[:, None]
        xt = torch.full((len(nodes), 1), process.mask_id)
        x0s = torch.full((len(nodes), 1), x0)
        loss_masked = score_entropy_loss(log_score, x0s, xt, nodes, process, schedule)
        integral = (weights * schedule.mask_probability(nodes) * loss_masked).sum()
        expected = (schedule.alpha(0.0) - schedule.alpha(1.0)) * -math.log(P0[x0])
        assert math.isclose(integral.item(), expected.item(), rel_tol=1e-8)


def test_uniform_score_entropy_one_token_exact_model_approaches_nll():
    # DWDSE + KL(p_{1|0} || uniform) -> -log p0(x0) as sigma_min -> 0 (gap ~ 2e-7 at sigma_min = 1e-8).
    n = 4
    process = UniformProcess(n)
    schedule = GeometricSchedule(sigma_min=1e-8, sigma_max=20.0)
    nodes, weights = _gauss_legendre(400)
    sigma_bar = schedule.total_noise(nodes)  # (T,)
    keep = torch.exp(-sigma_bar)[:, None]
    p_t = keep * P0[None] + (1 - keep) / n  # (T, n) marginal at time t
    for x0 in range(n):
        q_xt = process.transition_probs(torch.full((len(nodes),), x0), sigma_bar)  # (T, n): q(x_t | x0)
        # one row per (node, x_t): the exact score at x_t is p_t(.) / p_t(x_t)
        log_score = (p_t[:, None, :] / p_t[:, :, None]).log().reshape(-1, 1, n)
        xt = torch.arange(n).repeat(len(nodes))[:, None]
        t = nodes.repeat_interleave(n)
        loss = score_entropy_loss(log_score, torch.full_like(xt, x0), xt, t, process, schedule).reshape(len(nodes), n)
        dwdse = (weights * (q_xt * loss).sum(-1)).sum()
        limit = process.transition_probs(torch.tensor([x0]), torch.tensor(20.0, dtype=torch.float64))[0]
        kl = (limit * (limit * n).log()).sum()
        assert math.isclose((dwdse + kl).item(), -math.log(P0[x0]), rel_tol=0, abs_tol=1e-6)


def test_masked_elbo_one_token_exact_model():
    schedule = LogLinearSchedule(eps=1e-3)
    nodes, weights = _gauss_legendre(20)
    logits = torch.cat([P0.log(), torch.tensor([-1e6], dtype=torch.float64)]).expand(len(nodes), 1, 5)
    for x0 in range(4):
        x0s = torch.full((len(nodes), 1), x0)
        xt = torch.full((len(nodes), 1), 4)
        loss = masked_diffusion_loss(logits, x0s, xt, nodes, schedule, mask_id=4)
        integral = (weights * schedule.mask_probability(nodes) * loss).sum()
        assert math.isclose(integral.item(), (1 - 1e-3) * -math.log(P0[x0]), rel_tol=1e-10)


def test_masked_elbo_equals_exact_nll_on_enumerated_joint():
    # L = 3 over 3 real tokens: sum over every mask set M of t^|M| (1-t)^(L-|M|) times the loss with the
    # exact conditionals p(x_i | x_unmasked), integrated over t (Gauss-Legendre is exact: degree L - 1).
    vocab, length = 3, 3
    joint = enumerate_joint(vocab, length, seed=0)
    schedule = LogLinearSchedule(eps=0.0)
    nodes, weights = _gauss_legendre(4)
    mask_id = vocab
    for seq in [(0, 1, 2), (2, 2, 0), (1, 0, 1)]:
        elbo = 0.0
        for k in range(1, length + 1):
            for masked in itertools.combinations(range(length), k):
                logits = torch.full((1, length, vocab + 1), -1e6, dtype=torch.float64)
                for i in range(length):
                    if i in masked:
                        logits[0, i, :vocab] = torch.tensor(conditional(joint, seq, masked, i), dtype=torch.float64).log()
                    else:
                        logits[0, i, seq[i]] = 0.0
                x0 = torch.tensor([seq])
                xt = x0.clone()
                xt[0, list(masked)] = mask_id
                loss = masked_diffusion_loss(
                    logits.expand(len(nodes), -1, -1), x0.expand(len(nodes), -1), xt.expand(len(nodes), -1),
                    nodes, schedule, mask_id=mask_id,
                )
                prob_mask_set = nodes**k * (1 - nodes) ** (length - k)
                elbo += (weights * prob_mask_set * loss).sum().item()
        assert math.isclose(elbo, -math.log(joint[seq]), rel_tol=1e-10)


class ExactConditionals(torch.nn.Module):
    """A 'denoiser' that returns log p(x0_i | unmasked tokens) of an enumerated joint (time-free, subs)."""

    def __init__(self, joint, vocab, length):
        super().__init__()
        self.joint, self.vocab, self.length = joint, vocab, length

    def forward(self, input_ids, total_noise=None, attention_mask=None):
        out = torch.full(input_ids.shape + (self.vocab + 1,), -1e6, dtype=torch.float64)
        cache = {}
        for b, row in enumerate(input_ids.tolist()):
            masked = tuple(i for i, tok in enumerate(row) if tok == self.vocab)
            for i in range(self.length):
                if i in masked:
                    key = (tuple(row), i)
                    if key not in cache:
                        cache[key] = torch.tensor(conditional(self.joint, tuple(row), masked, i), dtype=torch.float64).log()
                    out[b, i, : self.vocab] = cache[key]
                else:
                    out[b, i, row[i]] = 0.0
        return type("Out", (), {"logits": out})()


@pytest.mark.parametrize("objective", ["masked_elbo", "score_entropy"])
def test_objective_monte_carlo_mean_is_nll_with_exact_model(objective):
    # Both objectives of a subs model (score entropy through RADD's identity) have expectation
    # (1 - eps) * NLL with exact conditionals; the Monte Carlo mean must cover it.
    vocab, length = 3, 3
    joint = enumerate_joint(vocab, length, seed=1)
    seq = (2, 0, 1)
    model = ExactConditionals(joint, vocab, length)
    obj = DiffusionObjective(AbsorbingProcess(vocab), LogLinearSchedule(eps=0.0), objective, "subs", t_min=1e-3)
    x0 = torch.tensor([seq]).expand(4000, -1)
    out = obj(model, x0, generator=torch.Generator().manual_seed(0))
    mean = out.per_sequence.mean().item()
    stderr = out.per_sequence.std().item() / math.sqrt(len(out.per_sequence))
    assert abs(mean - -math.log(joint[seq])) < 4 * stderr
    assert math.isclose(out.loss.item(), out.per_sequence.sum().item() / (4000 * 3), rel_tol=1e-12)


def test_losses_reject_mismatched_shapes():
    schedule = LogLinearSchedule()
    x = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="t must have shape"):
        masked_diffusion_loss(torch.zeros(2, 3, 5), x, x, torch.rand(3), schedule)
    with pytest.raises(ValueError, match="model output shape"):
        score_entropy_loss(torch.zeros(2, 4, 5), x, x, torch.rand(2), AbsorbingProcess(4), schedule)


def test_objective_validation():
    with pytest.raises(ValueError, match="masked_elbo.*uniform"):
        DiffusionObjective(UniformProcess(4), LogLinearSchedule(), "masked_elbo", "score")
    with pytest.raises(ValueError, match="objective='mse'"):
        DiffusionObjective(AbsorbingProcess(4), LogLinearSchedule(), "mse", "subs")
    obj = DiffusionObjective(AbsorbingProcess(4), LogLinearSchedule(), "masked_elbo", "subs")
    with pytest.raises(ValueError, match="outside the 4 real tokens"):
        obj(torch.nn.Identity(), torch.tensor([[0, 4]]))


@pytest.mark.parametrize(
    "process_name, parameterization, objective",
    [("absorbing", "subs", "masked_elbo"), ("absorbing", "subs", "score_entropy"),
     ("absorbing", "score", "score_entropy"), ("uniform", "score", "score_entropy")],
)
def test_loss_finite_at_schedule_endpoints_for_fully_masked_and_clean_batches(process_name, parameterization, objective):
    from diffusion.modeling_ddit import DDiTConfig, DDiTModel

    n = 10
    vocab = n + 1 if process_name == "absorbing" else n
    schedule = ("geometric", {"sigma_min": 1e-4, "sigma_max": 20.0}) if process_name == "uniform" else ("loglinear", {"eps": 1e-3})
    config = DDiTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, cond_dim=16,
                        process=process_name, parameterization=parameterization,
                        schedule=schedule[0], schedule_kwargs=schedule[1])
    torch.manual_seed(0)
    model = DDiTModel(config)
    obj = DiffusionObjective.from_config(config, objective=objective)
    x0 = torch.randint(0, n, (2, 12), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([obj.t_min, 1.0])
    noisy = torch.full_like(x0, n) if process_name == "absorbing" else (x0 + 1) % n  # every token corrupted
    for xt in (noisy, x0.clone()):
        sigma_bar = obj.schedule.total_noise(t)
        out = model(xt, total_noise=sigma_bar).logits
        if objective == "masked_elbo":
            loss = masked_diffusion_loss(out, x0, xt, t, obj.schedule, mask_id=n)
        else:
            if parameterization == "subs":
                out = obj.process.log_score_from_log_probs(out, sigma_bar, xt)
            loss = score_entropy_loss(out, x0, xt, t, obj.process, obj.schedule)
        model.zero_grad()
        loss.sum().backward()
        assert torch.isfinite(loss).all(), loss
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        if xt is not noisy and process_name == "absorbing":
            assert bool((loss == 0).all())  # nothing masked, nothing to score
