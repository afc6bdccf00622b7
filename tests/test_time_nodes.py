"""The time-node rules (Monte Carlo, stratified, Gauss-Legendre) and the training-time draws."""

import pytest
import torch

from diffusion.time_nodes import TIME_RULES, gauss_legendre_01, sample_t, time_nodes


def test_gauss_legendre_weights_and_exactness_for_polynomials():
    t, w = gauss_legendre_01(3)
    assert torch.isclose(w.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-15)
    for degree in range(6):  # 3 nodes integrate degree <= 5 exactly on [0, 1]
        assert abs(float((w * t**degree).sum()) - 1 / (degree + 1)) < 1e-14
    nodes, weights = time_nodes("quadrature", 3, 4)
    assert torch.equal(nodes, t[:, None].expand(3, 4)) and torch.equal(weights, w[:, None].expand(3, 4))


@pytest.mark.parametrize("rule", ["monte_carlo", "stratified"])
def test_random_rules_are_unbiased_and_stratified_puts_one_node_per_stratum(rule):
    n, rows = 8, 20000
    t, w = time_nodes(rule, n, rows, generator=torch.Generator().manual_seed(0))
    assert t.shape == w.shape == (n, rows) and t.dtype == torch.float64 and torch.equal(w, torch.full_like(w, 1 / n))
    # E[sum_n w_n f(t_n)] = int_0^1 f for f(t) = t^3: 1/4
    estimates = (w * t**3).sum(0)
    assert abs(float(estimates.mean()) - 0.25) < 4 * float(estimates.std()) / rows**0.5
    if rule == "stratified":
        assert torch.equal(torch.floor(t * n).long(), torch.arange(n)[:, None].expand(n, rows))
        plain = (torch.rand(n, rows, generator=torch.Generator().manual_seed(1), dtype=torch.float64) ** 3).mean(0)
        assert estimates.var() < plain.var() / 10  # stratification removes most of the variance


def test_t_min_floors_the_random_nodes():
    t, _ = time_nodes("monte_carlo", 64, 100, generator=torch.Generator().manual_seed(0), t_min=0.05)
    assert float(t.min()) == 0.05
    with pytest.raises(ValueError, match="rule must be one of"):
        time_nodes("simpson", 2, 2)
    with pytest.raises(ValueError, match="num_points must be a positive int, got num_points=0"):
        time_nodes("quadrature", 0, 2)
    assert set(TIME_RULES) == {"monte_carlo", "stratified", "quadrature"}


def test_sample_t_antithetic_one_draw_per_stratum():
    n = 64
    t = sample_t(n, t_min=1e-3, antithetic=True, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = (t - 1e-3) / (1 - 1e-3)
    strata = torch.floor(u * n).long()
    assert torch.equal(strata, torch.arange(n))
    plain = sample_t(n, t_min=1e-3, generator=torch.Generator().manual_seed(0))
    assert bool(((plain >= 1e-3) & (plain < 1)).all())
    with pytest.raises(ValueError, match="batch_size=0"):
        sample_t(0)
