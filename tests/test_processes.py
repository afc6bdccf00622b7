"""Forward processes against float64 matrix-exponential references."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from diffusion.processes import AbsorbingProcess, UniformProcess, get_process
from tests.reference import (
    absorbing_rate_matrix,
    brute_force_score_entropy,
    kernel,
    uniform_rate_matrix,
)

N = 5
SIGMAS = [1e-4, 0.03, 0.7, 2.5, 9.0]


def _process_and_q(name):
    if name == "absorbing":
        return AbsorbingProcess(N), absorbing_rate_matrix(N)
    return UniformProcess(N), uniform_rate_matrix(N)


@pytest.mark.parametrize("name", ["absorbing", "uniform"])
@pytest.mark.parametrize("sigma_bar", SIGMAS)
def test_transition_probs_is_matrix_exponential_column(name, sigma_bar):
    process, q = _process_and_q(name)
    x0 = torch.arange(N)
    probs = process.transition_probs(x0, torch.tensor(sigma_bar, dtype=torch.float64))
    expected = kernel(q, sigma_bar)[:, x0].T  # rows: q(. | x0)
    torch.testing.assert_close(probs, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["absorbing", "uniform"])
def test_sample_xt_matches_transition_probs(name):
    process, _ = _process_and_q(name)
    gen = torch.Generator().manual_seed(0)
    draws = 200_000
    x0 = torch.full((draws // 100, 100), 2)
    sigma_bar = torch.full((x0.shape[0],), 0.8, dtype=torch.float64)
    xt = process.sample_xt(x0, sigma_bar, generator=gen)
    counts = torch.bincount(xt.flatten(), minlength=process.num_states).double().numpy()
    expected = process.transition_probs(torch.tensor([2]), torch.tensor(0.8, dtype=torch.float64))[0].numpy()
    support = expected > 0
    assert counts[~support].sum() == 0
    chi2 = stats.chisquare(counts[support], expected[support] * draws)
    assert chi2.pvalue > 1e-3, (counts, expected * draws)


def test_absorbing_sample_xt_per_sequence_noise_levels():
    process = AbsorbingProcess(N)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, N, (2, 20_000), generator=gen)
    xt = process.sample_xt(x0, torch.tensor([0.0, 50.0]), generator=gen)
    assert torch.equal(xt[0], x0[0])  # sigma_bar = 0: nothing moves
    assert bool((xt[1] == process.mask_id).all())  # sigma_bar = 50: everything masked


def _random_case(process, seed, batch=6, length=7):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, N, (batch, length), generator=gen)
    sigma_bar = torch.tensor(SIGMAS + [1.3], dtype=torch.float64)[:batch]
    xt = process.sample_xt(x0, sigma_bar, generator=gen)
    if isinstance(process, UniformProcess):  # make sure both cases x_t == x0 and x_t != x0 occur
        xt[:, 0] = x0[:, 0]
        xt[:, 1] = (x0[:, 1] + 1) % N
    else:
        xt[:, 0] = process.mask_id
        xt[:, 1] = x0[:, 1]
    log_score = torch.randn(batch, length, process.num_states, generator=gen, dtype=torch.float64) * 2
    return x0, xt, sigma_bar, log_score


@pytest.mark.parametrize("name", ["absorbing", "uniform"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_entropy_equals_brute_force(name, seed):
    process, q = _process_and_q(name)
    x0, xt, sigma_bar, log_score = _random_case(process, seed)
    se = process.score_entropy(log_score, sigma_bar, xt, x0)
    assert se.shape == xt.shape and se.dtype == torch.float64
    for b in range(xt.shape[0]):
        for i in range(xt.shape[1]):
            expected = brute_force_score_entropy(q, log_score[b, i], sigma_bar[b].item(), xt[b, i].item(), x0[b, i].item())
            assert math.isclose(se[b, i].item(), expected, rel_tol=1e-9, abs_tol=1e-9), (b, i, se[b, i], expected)


@pytest.mark.parametrize("name", ["absorbing", "uniform"])
def test_score_entropy_nonnegative_and_zero_at_true_ratios(name):
    process, q = _process_and_q(name)
    x0, xt, sigma_bar, log_score = _random_case(process, 5)
    assert bool((process.score_entropy(log_score, sigma_bar, xt, x0) >= -1e-12).all())

    # True ratios r_y = q(y | x0) / q(x_t | x0); the MASK entry of an absorbing score is irrelevant.
    true_log = torch.zeros_like(log_score)
    for b in range(xt.shape[0]):
        p = kernel(q, sigma_bar[b].item())
        for i in range(xt.shape[1]):
            ratio = p[:, x0[b, i]] / p[xt[b, i], x0[b, i]]
            true_log[b, i] = torch.log(ratio.clamp_min(1e-300))
    se = process.score_entropy(true_log, sigma_bar, xt, x0)
    torch.testing.assert_close(se, torch.zeros_like(se), atol=1e-9, rtol=0)


def test_absorbing_score_entropy_zero_at_unmasked_positions():
    process = AbsorbingProcess(N)
    x0, _, sigma_bar, log_score = _random_case(process, 3)
    se = process.score_entropy(log_score, sigma_bar, x0.clone(), x0)
    assert bool((se == 0).all())


@pytest.mark.parametrize("name", ["absorbing", "uniform"])
@pytest.mark.parametrize("sigma_bar", [1e-4, 1e-6])
def test_score_entropy_float32_stable_at_small_noise(name, sigma_bar):
    # At the exact ratios and tiny sigma_bar, r ~ 1/sigma_bar is huge: the textbook sum
    # s - r log s + r(log r - 1) loses O(1) to cancellation in float32 (-1.0 absorbing, 1.6 uniform at 1e-6);
    # the phi-form must stay at ~0.
    process, q = _process_and_q(name)
    p = kernel(q, sigma_bar)
    x0 = torch.tensor([[1]])
    xt = torch.tensor([[process.mask_id if process.mask_id is not None else 3]])
    ratio = (p[:, 1] / p[xt[0, 0], 1]).clamp_min(1e-300)
    se = process.score_entropy(ratio.log().float()[None, None], torch.tensor([sigma_bar]), xt, x0)
    assert se.dtype == torch.float32
    assert abs(se.item()) < 1e-4


@pytest.mark.parametrize("name", ["absorbing", "uniform"])
@pytest.mark.parametrize("dsigma", [1e-3, 0.4, 3.0])
def test_staggered_score_and_reverse_transition(name, dsigma):
    process, q = _process_and_q(name)
    gen = torch.Generator().manual_seed(0)
    score = torch.rand(4, process.num_states, generator=gen, dtype=torch.float64) + 0.1
    expected = (kernel(q, -dsigma) @ score.T).T
    torch.testing.assert_close(process.staggered_score(score, dsigma), expected, rtol=1e-10, atol=1e-12)
    states = torch.arange(process.num_states)
    rows = process.reverse_transition(states, torch.tensor(dsigma, dtype=torch.float64))
    torch.testing.assert_close(rows, kernel(q, dsigma), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["absorbing", "uniform"])
def test_reverse_rate_rows(name):
    process, q = _process_and_q(name)
    states = torch.arange(process.num_states)
    score = torch.rand(process.num_states, process.num_states, dtype=torch.float64) + 0.5
    rate = process.reverse_rate(states, score)
    torch.testing.assert_close(rate.sum(-1), torch.zeros(process.num_states, dtype=torch.float64), atol=1e-12, rtol=0)
    for x in range(process.num_states):
        for y in range(process.num_states):
            if y != x:
                assert math.isclose(rate[x, y].item(), (q[x, y] * score[x, y]).item(), abs_tol=1e-14)
    euler = process.euler_transition(states, score, 0.01)
    torch.testing.assert_close(euler.sum(-1), torch.ones(process.num_states, dtype=torch.float64))
    if name == "absorbing":  # real tokens never move in reverse time
        torch.testing.assert_close(euler[:N], torch.eye(process.num_states, dtype=torch.float64)[:N])


@pytest.mark.parametrize("name", ["absorbing", "uniform"])
@pytest.mark.parametrize("t_sigma, s_sigma", [(2.0, 1.2), (0.5, 0.05), (6.0, 5.9)])
def test_analytic_step_is_exact_posterior_for_one_token(name, t_sigma, s_sigma):
    process, q = _process_and_q(name)
    rng = np.random.default_rng(0)
    p0 = torch.zeros(process.num_states, dtype=torch.float64)
    p0[:N] = torch.from_numpy(rng.dirichlet(np.ones(N)))
    p_t = kernel(q, t_sigma) @ p0
    p_s = kernel(q, s_sigma) @ p0
    dsigma = t_sigma - s_sigma
    for x in range(process.num_states):
        score = p_t / p_t[x]  # exact score of a one-token sequence
        step = process.analytic_transition(torch.tensor([x]), score[None], torch.tensor(dsigma, dtype=torch.float64))[0]
        posterior = kernel(q, dsigma)[x, :] * p_s / p_t[x]
        torch.testing.assert_close(step, posterior, rtol=1e-9, atol=1e-12)
        assert math.isclose(step.sum().item(), 1.0, rel_tol=1e-10)
        assert bool((step >= -1e-15).all())


def test_radd_log_score_gives_minus_r_log_c():
    # RADD: with log s = log c - log(e^sigma - 1), t-DSE == -r log c(x0) at every masked position.
    process = AbsorbingProcess(N)
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, N + 1, generator=gen, dtype=torch.float64)
    logits[..., N] = -1e6
    log_c = torch.log_softmax(logits, -1)
    x0 = torch.randint(0, N, (3, 4), generator=gen)
    xt = torch.full_like(x0, process.mask_id)
    sigma_bar = torch.tensor([0.01, 0.5, 4.0], dtype=torch.float64)
    se = process.score_entropy(process.log_score_from_log_probs(log_c, sigma_bar, xt), sigma_bar, xt, x0)
    r = 1.0 / torch.expm1(sigma_bar)[:, None]
    torch.testing.assert_close(se, -r * log_c.gather(-1, x0[..., None])[..., 0], rtol=1e-10, atol=1e-12)


def test_get_process_and_bad_arguments():
    assert get_process("absorbing", 7).mask_id == 7 and get_process("absorbing", 7).num_states == 8
    assert get_process("uniform", 7).num_states == 7
    with pytest.raises(ValueError, match="unknown process name='gaussian'"):
        get_process("gaussian", 7)
    with pytest.raises(ValueError, match="num_tokens=1"):
        AbsorbingProcess(1)
    with pytest.raises(ValueError, match="num_states=6"):
        AbsorbingProcess(N).score_entropy(torch.zeros(1, 1, 3), 1.0, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))
