"""The Discrete Markov Bridge's rate matrix (diffusion/markov_bridge.py): closed-form rows against scipy's expm,
valid rows, the absorbing process as a special case, the general score entropy against the brute-force sum, and
matrix learning lowering the prior term."""

import itertools

import pytest
import scipy.linalg
import scipy.stats
import torch

from diffusion.markov_bridge import BridgeProcess, BridgeRate
from diffusion.processes import AbsorbingProcess
from tests.reference import brute_force_score_entropy

K = 5


def _random_rate(seed):
    generator = torch.Generator().manual_seed(seed)
    rate = BridgeRate(K, permutation=torch.randperm(K, generator=generator))
    with torch.no_grad():
        rate.weights.copy_(torch.randn(K - 1, generator=generator, dtype=torch.float64))
    return rate


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_rows_are_scipys_expm_and_valid(seed):
    rate = _random_rate(seed)
    q = rate.matrix().detach()
    off = ~torch.eye(K, dtype=torch.bool)
    assert torch.allclose(q.sum(-1), torch.zeros(K, dtype=torch.float64), atol=1e-12) and bool((q[off] >= -1e-12).all())
    for sigma in (0.0, 0.1, 1.3, 7.0):
        reference = torch.from_numpy(scipy.linalg.expm(sigma * q.numpy()))
        rows = rate.transition_probs(torch.arange(K), sigma).detach()
        assert torch.allclose(rows, reference, atol=1e-12), sigma
        assert bool((rows >= 0).all()) and torch.allclose(rows.sum(-1), torch.ones(K, dtype=torch.float64), atol=1e-12)


def test_one_step_of_rate_is_the_absorbing_process():
    rate = BridgeRate(K)
    with torch.no_grad():  # theta = (0, ..., 0, -1, 0): Lambda = (-1, ..., -1, 0), MASK the last state
        rate.weights.fill_(-60.0)
        rate.weights[-1] = torch.log(torch.expm1(torch.tensor(1.0, dtype=torch.float64)))
    sigma = torch.tensor([0.3, 2.0], dtype=torch.float64)
    x0 = torch.tensor([[0, 3], [2, 1]])
    assert torch.allclose(rate.transition_probs(x0, sigma), AbsorbingProcess(K - 1).transition_probs(x0, sigma),
                          atol=1e-7)  # theta = -1 up to the float32 rounding of its parameter


def _identity_rate(seed):
    generator = torch.Generator().manual_seed(seed)
    rate = BridgeRate(K)
    with torch.no_grad():
        rate.weights.copy_(torch.randn(K - 1, generator=generator))
    return rate


def test_the_score_entropy_is_the_brute_force_sum():
    process = BridgeProcess(_identity_rate(3), sigma_end=5.0)
    q_columns = process.rate.matrix().detach().T  # tests/reference.py keeps ddlm's Q[to, from]
    generator = torch.Generator().manual_seed(4)
    for sigma in (0.05, 0.8):
        log_score = torch.randn(K, K, generator=generator, dtype=torch.float64)
        for x_t, x0 in itertools.product(range(K), repeat=2):
            if float(process.transition_probs(torch.tensor(x0), sigma)[x_t]) == 0:
                continue  # x_t cannot be reached from x0: no term
            got = process.score_entropy(log_score[x_t], sigma, torch.tensor(x_t), torch.tensor(x0))
            want = brute_force_score_entropy(q_columns, log_score[x_t], sigma, x_t, x0)
            assert float(got) == pytest.approx(want, rel=1e-9, abs=1e-12), (sigma, x_t, x0)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_process_pieces_are_the_matrix_exponential(seed):
    """Rates into x_t are Q's columns; the reverse transition is a column of expm(d Q); the staggered score is
    expm(-d Q)^T s (ddlm's Q[to, from]); push_probs is the row vector times expm; all in O(K), against scipy."""
    process = BridgeProcess(_identity_rate(seed), sigma_end=5.0)
    q = process.rate.matrix().detach()
    states = torch.arange(K)
    assert torch.allclose(process.rate_into(states, torch.float64), q.T, atol=1e-12)
    generator = torch.Generator().manual_seed(seed + 10)
    score = torch.rand(K, K, generator=generator, dtype=torch.float64) + 0.1
    probs = torch.softmax(torch.randn(3, K, generator=generator, dtype=torch.float64), -1)
    for d in (0.02, 0.7):
        forward = torch.from_numpy(scipy.linalg.expm(d * q.numpy()))
        backward = torch.from_numpy(scipy.linalg.expm(-d * q.numpy()))
        assert torch.allclose(process.reverse_transition(states, d), forward.T, atol=1e-12)
        assert torch.allclose(process.staggered_score(score, d), score @ backward, atol=1e-10)
        assert torch.allclose(process.push_probs(probs, d), probs @ forward, atol=1e-12)
    limit = process.limit_probs()
    assert torch.allclose(limit, process.rate.data_marginal @ torch.from_numpy(scipy.linalg.expm(5.0 * q.numpy())),
                          atol=1e-12)


def test_the_absorbing_special_case_matches_ddlms_absorbing_process():
    rate = BridgeRate(K)
    with torch.no_grad():
        rate.weights.fill_(-60.0)
        rate.weights[-1] = torch.log(torch.expm1(torch.tensor(1.0)))
    bridge, absorbing = BridgeProcess(rate, sigma_end=5.0), AbsorbingProcess(K - 1)
    x_t = torch.tensor([0, 2, K - 1])
    score = torch.rand(3, K, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    assert torch.allclose(bridge.rate_into(x_t, torch.float64), absorbing.rate_into(x_t, torch.float64), atol=1e-6)
    assert torch.allclose(bridge.reverse_transition(x_t, 0.4), absorbing.reverse_transition(x_t, 0.4).double(),
                          atol=1e-6)
    assert torch.allclose(bridge.staggered_score(score, 0.4), absorbing.staggered_score(score, 0.4), atol=1e-6)


def test_forward_draws_follow_the_closed_form_rows():
    """Chi-square of 20,000 draws of x_t given x0 against q(x_t | x0) (the training corruption)."""
    process = BridgeProcess(BridgeRate.absorbing_start(K, leak=0.2), sigma_end=5.0)
    x0 = torch.full((20_000,), 1)
    draws = process.sample_xt(x0, 0.6, generator=torch.Generator().manual_seed(0))
    expected = process.transition_probs(torch.tensor(1), 0.6) * len(x0)
    observed = torch.bincount(draws, minlength=K).double()
    keep = expected > 0
    assert int(observed[~keep].sum()) == 0  # no mass below x0 in the order
    chi2 = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < scipy.stats.chi2.ppf(0.999, int(keep.sum()) - 1), chi2
    limit = process.sample_limit((50_000,), generator=torch.Generator().manual_seed(1))
    expected = process.limit_probs() * 50_000
    observed = torch.bincount(limit, minlength=K).double()
    keep = expected > 0
    chi2 = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < scipy.stats.chi2.ppf(0.999, int(keep.sum()) - 1), chi2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_suffix_sum_prior_term_is_the_kl_of_the_rows(seed):
    """``prior_kl`` (one suffix sum over the order) equals KL(q(x_T | x0) || p_hat_0 expm(sigma_T Q)) from scipy."""
    rate = _random_rate(seed)
    rate.set_data_marginal(torch.tensor([3.0, 1.0, 1.0, 2.0, 5.0]))  # every state seen: a finite KL
    q = rate.matrix().detach()
    for sigma in (0.3, 2.5):
        kernel = torch.from_numpy(scipy.linalg.expm(sigma * q.numpy()))
        prior = rate.data_marginal @ kernel
        want = [float(sum(kernel[x, y] * torch.log(kernel[x, y] / prior[y]) for y in range(K) if kernel[x, y] > 0))
                for x in range(K)]
        got = rate.prior_kl(torch.arange(K), sigma).detach()
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12), sigma


def test_matrix_learning_lowers_the_prior_term():
    rate = _random_rate(5)
    data = torch.randint(0, K, (256,), generator=torch.Generator().manual_seed(6))
    rate.set_data_marginal(torch.bincount(data, minlength=K))
    optimizer = torch.optim.Adam(rate.parameters(), lr=0.05)
    values = []
    for _ in range(40):
        loss = rate.prior_kl(data, 1.0).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values.append(loss.item())
    assert values[-1] < 0.5 * values[0], values[::10]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_states must be an int >= 2, got num_states=1"):
        BridgeRate(1)
    with pytest.raises(ValueError, match="permutation must be a permutation of 0..4"):
        BridgeRate(K, permutation=torch.tensor([0, 0, 1, 2, 3]))
    with pytest.raises(ValueError, match="needs the identity order"):
        BridgeProcess(_random_rate(7), sigma_end=1.0)
    with pytest.raises(ValueError, match="leak must be in"):
        BridgeRate.absorbing_start(K, leak=0.0)


def test_float32_score_entropy_keeps_its_precision_where_a_token_moved_by_the_leak():
    """At a token moved by the leak the ratio of x0 is ~1 / (sigma leak), ~1e7 here: the float32 loss of a
    near-exact score stays within 1% of the float64 one (the x0 term is kept in its cancellation-free phi form)."""
    k = 4097
    process = BridgeProcess(BridgeRate.absorbing_start(k), sigma_end=6.9)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 4000, (64,), generator=generator)
    x_t = torch.clamp(x0 + torch.randint(1, 50, (64,), generator=generator), max=k - 2)
    sigma = 1e-3
    probs = process.transition_probs(x0, sigma)
    exact = torch.log((probs / probs.gather(-1, x_t[:, None])).clamp_min(1e-300))
    log_score = (exact + 0.01 * torch.randn(64, k, generator=generator, dtype=torch.float64)).clamp_min(-60.0)
    wide = process.score_entropy(log_score, sigma, x_t, x0)
    narrow = process.score_entropy(log_score.float(), sigma, x_t, x0).double()
    assert bool((wide > 0).all()) and float(((narrow - wide).abs() / wide).max()) < 1e-2


def test_an_infinite_total_noise_is_refused_by_name():
    with pytest.raises(ValueError, match="must be finite and > 0 .* got sigma_end=inf"):
        BridgeProcess(BridgeRate(K), sigma_end=float("inf"))
