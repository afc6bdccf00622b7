"""The Discrete Markov Bridge's rate matrix (diffusion/markov_bridge.py): closed-form rows against scipy's expm,
valid rows, the absorbing process as a special case, the general score entropy against the brute-force sum, and
matrix learning lowering the prior term."""

import itertools

import pytest
import scipy.linalg
import torch

from diffusion.markov_bridge import BridgeRate
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
                          atol=1e-12)


def test_the_score_entropy_is_the_brute_force_sum():
    rate = _random_rate(3)
    q_columns = rate.matrix().detach().T  # tests/reference.py keeps ddlm's Q[to, from]
    generator = torch.Generator().manual_seed(4)
    for sigma in (0.05, 0.8):
        log_score = torch.randn(K, K, generator=generator, dtype=torch.float64)
        for x_t, x0 in itertools.product(range(K), repeat=2):
            if float(rate.transition_probs(torch.tensor(x0), sigma)[x_t].detach()) == 0:
                continue  # x_t cannot be reached from x0: no term
            got = rate.score_entropy(log_score[x_t], sigma, torch.tensor(x_t), torch.tensor(x0))
            want = brute_force_score_entropy(q_columns, log_score[x_t], sigma, x_t, x0)
            assert float(got.detach()) == pytest.approx(want, rel=1e-9, abs=1e-12), (sigma, x_t, x0)


def test_matrix_learning_lowers_the_prior_term():
    rate = _random_rate(5)
    data = torch.randint(0, K, (256,), generator=torch.Generator().manual_seed(6))
    marginal = torch.bincount(data, minlength=K).double() / len(data)
    optimizer = torch.optim.Adam(rate.parameters(), lr=0.05)
    values = []
    for _ in range(40):
        loss = rate.prior_kl(data, 1.0, marginal).mean()
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
