"""Structured transitions (diffusion/structured.py): closed-form rows against scipy's expm, valid
distributions, D3PM's posterior by Bayes, the general score entropy against the brute-force sum, and refusals."""

import itertools

import pytest
import torch

from diffusion.d3pm import DiscreteTime
from diffusion.processes import UniformProcess
from diffusion.schedules import get_schedule
from diffusion.structured import SymmetricRateProcess, gaussian_band_rate, nearest_neighbour_rate
from tests.reference import brute_force_score_entropy, kernel, uniform_rate_matrix

K = 6


def _families():
    embeddings = torch.randn(K, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {"nearest_neighbour": nearest_neighbour_rate(embeddings, 2), "gaussian": gaussian_band_rate(K, 0.3, 2)}


@pytest.mark.parametrize("family", ["nearest_neighbour", "gaussian"])
def test_closed_form_rows_are_scipys_expm_and_valid_distributions(family):
    rate = _families()[family]
    process = SymmetricRateProcess(rate)
    for sigma in (0.0, 0.05, 0.7, 3.0, 40.0):
        reference = kernel(rate, sigma)  # rate is symmetric: Q[to, from] and Q[from, to] agree
        rows = process.transition_probs(torch.arange(K), torch.tensor(sigma, dtype=torch.float64))
        assert torch.allclose(rows, reference.T, atol=1e-12), (family, sigma)
        assert torch.allclose(rows.sum(-1), torch.ones(K, dtype=torch.float64), atol=1e-12) and bool((rows >= 0).all())
        probs = torch.softmax(torch.randn(3, K, dtype=torch.float64), -1)
        assert torch.allclose(process.push_probs(probs, sigma), probs @ reference.T, atol=1e-12)
    limit = process.transition_probs(torch.tensor([0]), torch.tensor(400.0))  # connected: tends to uniform
    assert torch.allclose(limit, torch.full((1, K), 1.0 / K, dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("family", ["nearest_neighbour", "gaussian"])
def test_the_d3pm_posterior_is_bayes(family):
    rate = _families()[family]
    chain = DiscreteTime(SymmetricRateProcess(rate), get_schedule("geometric"), 4)
    for k in (1, 2, 4):
        now, before = float(chain.sigma(torch.tensor(k))), float(chain.sigma(torch.tensor(k - 1)))
        step, q_before, q_now = kernel(rate, now - before), kernel(rate, before), kernel(rate, now)
        for x0, x_k in itertools.product(range(K), repeat=2):
            if q_now[x_k, x0] < 1e-6:  # the eigendecomposition is accurate to ~1e-15 absolute, not relative
                continue
            bayes = step[x_k, :] * q_before[:, x0] / q_now[x_k, x0]
            got = chain.posterior(torch.tensor(x_k), torch.nn.functional.one_hot(torch.tensor(x0), K).double(),
                                  torch.tensor(k))
            assert torch.allclose(got, bayes, atol=1e-9)


@pytest.mark.parametrize("family", ["nearest_neighbour", "gaussian", "uniform"])
def test_the_general_score_entropy_is_the_brute_force_sum(family):
    rate = uniform_rate_matrix(K) if family == "uniform" else _families()[family]
    process = SymmetricRateProcess(rate)
    generator = torch.Generator().manual_seed(1)
    for sigma in (0.01, 0.5, 4.0):
        log_score = torch.randn(K, K, generator=generator, dtype=torch.float64)
        for x_t, x0 in itertools.product(range(K), repeat=2):
            got = process.score_entropy(log_score[x_t], torch.tensor(sigma, dtype=torch.float64),
                                        torch.tensor(x_t), torch.tensor(x0))
            want = brute_force_score_entropy(rate, log_score[x_t], sigma, x_t, x0)
            assert float(got) == pytest.approx(want, rel=1e-6, abs=1e-12), (family, sigma, x_t, x0)  # eigh: 1e-15 absolute
    if family == "uniform":  # the same value as the closed form the uniform process uses
        x_t, x0 = torch.tensor([0, 1, 2]), torch.tensor([0, 2, 2])
        log_score = torch.randn(3, K, generator=generator, dtype=torch.float64)
        assert torch.allclose(process.score_entropy(log_score, 0.5, x_t, x0),
                              UniformProcess(K).score_entropy(log_score, 0.5, x_t, x0), rtol=1e-9)


def test_the_staggered_score_inverts_the_kernel():
    process = SymmetricRateProcess(_families()["gaussian"])
    score = torch.rand(2, K, dtype=torch.float64)
    back = process.push_probs(process.staggered_score(score, 0.3), 0.3)  # exp(0.3 A) exp(-0.3 A) s = s
    assert torch.allclose(back, score, atol=1e-12)


def test_families_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="neighbours must be an int in 1..5, got neighbours=6"):
        nearest_neighbour_rate(torch.randn(K, 3), 6)
    with pytest.raises(ValueError, match="at most max_states=4 are allowed"):
        SymmetricRateProcess(gaussian_band_rate(K), max_states=4)
    two_islands = torch.zeros(4, 4, dtype=torch.float64)
    two_islands[0, 1] = two_islands[1, 0] = two_islands[2, 3] = two_islands[3, 2] = 1.0
    with pytest.raises(ValueError, match="not connected"):
        SymmetricRateProcess(two_islands - torch.diag(two_islands.sum(-1)))
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        gaussian_band_rate(K, 0.0)


def test_a_score_model_learns_under_a_structured_process():
    """The continuous-time score entropy with a nearest-neighbour rate matrix, through the Python API: a tiny DDiT
    on sequences that repeat one token halves its loss in 150 steps."""
    from diffusion import DDiTConfig, DDiTModel
    from diffusion.objectives import DiffusionObjective

    torch.manual_seed(0)
    process = SymmetricRateProcess(_families()["nearest_neighbour"])
    model = DDiTModel(DDiTConfig(vocab_size=K, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 cond_dim=16, max_position_embeddings=8, process="uniform",
                                 parameterization="score", schedule="geometric"))
    objective = DiffusionObjective(process, get_schedule("geometric"), "score_entropy", "score")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        x0 = torch.randint(0, K, (16, 1), generator=generator).expand(16, 8).contiguous()
        out = objective(model, x0, generator=generator)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20, (losses[:3], losses[-3:])
