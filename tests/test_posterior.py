"""SG-DPS (samplers/posterior.py) on an enumerable toy: L = 3 positions, N = 3 tokens, the exact concrete score
of an enumerated prior as the model.  The kernel against transition_probs, the Metropolis-Hastings step's
invariance (enumerated), the whole sampler against the exact posterior, and the prior with a flat likelihood."""

import itertools
import math

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput

from diffusion import DDiTConfig
from diffusion.processes import UniformProcess
from diffusion.spec import DiffusionSpec
from samplers import get_sampler
from samplers.posterior import uniform_log_kernel

N, L = 3, 3
STATES = torch.tensor(list(itertools.product(range(N), repeat=L)))  # (27, 3), row-major order
PRIOR = torch.tensor([0.20, 0.02, 0.05, 0.01, 0.09, 0.03, 0.06, 0.01, 0.04, 0.02, 0.07, 0.01, 0.03, 0.05, 0.02,
                      0.04, 0.01, 0.03, 0.05, 0.02, 0.01, 0.03, 0.04, 0.02, 0.01, 0.02, 0.01], dtype=torch.float64)
PRIOR = PRIOR / PRIOR.sum()
CONFIG = DDiTConfig(vocab_size=N, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, cond_dim=4,
                    max_position_embeddings=L, parameterization="score", process="uniform", schedule="geometric",
                    schedule_kwargs={"sigma_min": 1e-3, "sigma_max": 8.0})
PROCESS = UniformProcess(N)


def _index(x: torch.Tensor) -> torch.Tensor:
    return (x * torch.tensor([N * N, N, 1])).sum(-1)


def _marginal(sigma_bar: float) -> torch.Tensor:
    """p_t over the 27 states: sum_x0 p0(x0) prod_i K(x0_i -> x_i)."""
    kernel = PROCESS.transition_probs(torch.arange(N), torch.tensor(sigma_bar, dtype=torch.float64)).double()
    joint = kernel[STATES[:, None, :], STATES[None, :, :]].prod(-1)  # (x0, x)
    return PRIOR @ joint


WEIGHTS = torch.tensor([N ** (L - 1 - i) for i in range(L)])


def _scores(sigma_bar: float) -> torch.Tensor:
    """``[27, L, N]``: log s(x, t)[i, v] = log p_t(x with x_i = v) - log p_t(x) for every state x."""
    log_p = torch.log(_marginal(sigma_bar))
    index = _index(STATES)
    moved = index[:, None, None] + (torch.arange(N)[None, None, :] - STATES[:, :, None]) * WEIGHTS[None, :, None]
    return log_p[moved] - log_p[index][:, None, None]


class ExactScore(nn.Module):
    """The concrete score of the enumerated prior, as a score model the samplers read (``logits`` = log-scores)."""

    def __init__(self):
        super().__init__()
        self.config, self.anchor = CONFIG, nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, total_noise, **kwargs):
        tables = {float(sigma): _scores(float(sigma)) for sigma in total_noise.double().unique()}
        return MaskedLMOutput(logits=torch.stack([tables[float(sigma)][_index(row)]
                                                  for row, sigma in zip(input_ids, total_noise.double())]))


class TableScore(ExactScore):
    """The same scores for a batch at one noise level, in one lookup: fast for thousands of chains."""

    def forward(self, input_ids, total_noise, **kwargs):
        return MaskedLMOutput(logits=_scores(float(total_noise[0]))[_index(input_ids)])


def test_the_log_kernel_is_the_exact_uniform_transition():
    for sigma_bar in (0.05, 0.7, 3.0):
        kernel = PROCESS.transition_probs(torch.arange(N), torch.tensor(sigma_bar, dtype=torch.float64)).double()
        for x in STATES:
            expected = torch.log(kernel[x[None, :], STATES].prod(-1))  # log q(z | x) for all z
            got = uniform_log_kernel(x.expand(len(STATES), L), STATES, sigma_bar, N)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _log_likelihood(x):
    """A noisy reading of position 0 (it shows 1) and a soft parity constraint (even sums preferred)."""
    reading = torch.where(x[:, 0] == 1, math.log(0.8), math.log(0.1))
    parity = torch.where(x.sum(-1) % 2 == 0, math.log(0.9), math.log(0.1))
    return (reading + parity).double()


def test_the_metropolis_hastings_step_leaves_the_conditional_invariant():
    """Enumerate the step's transition matrix over z (given x) and check pi(z | x, y) P = pi(z | x, y)."""
    sampler = get_sampler("sgdps", log_likelihood=_log_likelihood, mh_steps=1)
    sigma_bar = 0.8
    x = torch.tensor([2, 0, 1])
    target = torch.exp(uniform_log_kernel(x.expand(len(STATES), L), STATES, sigma_bar, N) + _log_likelihood(STATES))
    target = target / target.sum()
    # One move from each z: position i (1/L) and token v (1/N) proposed, accepted with min(1, ratio).
    matrix = torch.zeros(len(STATES), len(STATES), dtype=torch.float64)
    for a, z in enumerate(STATES):
        for i in range(L):
            for v in range(N):
                proposal = z.clone()
                proposal[i] = v
                b = int(_index(proposal))
                accept = min(1.0, float(target[b] / target[a]))
                matrix[a, b] += accept / (L * N)
                matrix[a, a] += (1 - accept) / (L * N)
    torch.testing.assert_close(target @ matrix, target, rtol=1e-12, atol=1e-14)
    # And the sampler's own moves follow that matrix: from z = x, 20000 chains, one move each.
    free = torch.ones(20000, L, dtype=torch.bool)
    moved = sampler.likelihood_step(x.expand(20000, L).clone(), free, sigma_bar, N, torch.Generator().manual_seed(0))
    empirical = torch.bincount(_index(moved), minlength=len(STATES)).double() / 20000
    expected = matrix[int(_index(x))]
    assert float((empirical - expected).abs().sum()) / 2 < 0.02


def _empirical(tokens):
    return torch.bincount(_index(tokens), minlength=len(STATES)).double() / len(tokens)


@pytest.mark.slow
def test_the_sampler_draws_the_exact_posterior():
    """20000 chains, 100 annealing levels (about 15 s; 40 levels left a TV of 0.048: annealing too fast)."""
    chains = 20000
    sampler = get_sampler("sgdps", log_likelihood=_log_likelihood, prior_steps=16, mh_steps=30)
    out = sampler.generate(TableScore(), batch_size=chains, length=L, num_steps=100,
                           generator=torch.Generator().manual_seed(0))
    posterior = PRIOR * torch.exp(_log_likelihood(STATES))
    posterior = posterior / posterior.sum()
    tv = float((_empirical(out.tokens) - posterior).abs().sum()) / 2
    prior_tv = float((PRIOR - posterior).abs().sum()) / 2
    assert tv < 0.03 < prior_tv, (tv, prior_tv)


def test_a_flat_likelihood_returns_the_prior():
    chains = 8000
    sampler = get_sampler("sgdps", log_likelihood=lambda x: torch.zeros(len(x)), prior_steps=16, mh_steps=5)
    out = sampler.generate(TableScore(), batch_size=chains, length=L, num_steps=10,
                           generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(_index(out.tokens), minlength=len(STATES)).double()
    expected = PRIOR * chains
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 55.5, chi_square  # 26 degrees of freedom: the 0.999 quantile is 54.1
    assert out.nfe == 10 * 17  # each level: 16 analytic steps and the final denoising step


def test_the_exact_score_model_is_the_ratio_of_marginals():
    spec = DiffusionSpec.from_config(CONFIG)
    assert spec.num_tokens == N and not spec.masked
    x = torch.tensor([[0, 2, 1], [1, 1, 1]])
    sigma = torch.tensor([0.4, 0.4])
    scores = TableScore()(input_ids=x, total_noise=sigma).logits
    p = _marginal(float(sigma[0]))  # the float32 noise level the model was given
    for b in range(2):
        for i in range(L):
            for v in range(N):
                moved = x[b].clone()
                moved[i] = v
                assert float(scores[b, i, v]) == pytest.approx(math.log(p[_index(moved)] / p[_index(x[b])]), abs=1e-12)


@pytest.mark.parametrize("kwargs, call, match", [
    ({}, None, "exactly one of log_likelihood and reward"),
    ({"reward": lambda x: x.sum(-1).double(), "reward_temperature": 0.0}, None, "reward_temperature"),
    ({"log_likelihood": _log_likelihood, "mh_steps": 0}, None, "mh_steps"),
    ({"log_likelihood": lambda x: torch.zeros(len(x), 2)}, "run", r"returned shape \(8, 2\) for 8 rows"),
    ({"log_likelihood": lambda x: torch.full((len(x),), math.nan)}, "run", "NaN or \\+inf"),
])
def test_bad_likelihoods_and_settings_are_refused(kwargs, call, match):
    with pytest.raises(ValueError, match=match):
        sampler = get_sampler("sgdps", **kwargs)
        if call:
            sampler.generate(TableScore(), batch_size=8, length=L, num_steps=2, generator=torch.Generator().manual_seed(0))


def test_absorbing_models_are_refused_in_one_line():
    from tests.test_samplers import SCORE_ABSORBING

    with pytest.raises(ValueError, match="needs a uniform-process model"):
        get_sampler("sgdps", log_likelihood=_log_likelihood).generate(SCORE_ABSORBING, batch_size=1, length=4,
                                                                     num_steps=2)
