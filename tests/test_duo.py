"""diffusion/duo.py: the argmax of Duo's Gaussian latent is ddlm's uniform process at sigma_bar = -log T(a)."""

import math

import pytest
import torch
from scipy import integrate
from scipy.stats import chisquare, norm

from diffusion.duo import gaussian_latent, tempered_softmax, uniform_alpha
from diffusion.processes import UniformProcess


@pytest.mark.parametrize("a, k", [(0.3, 5), (0.7, 5), (0.5, 50), (0.9, 4097)])
def test_the_operator_is_the_integral_computed_by_scipy(a, k):
    s = math.sqrt(1 - a * a)
    same, _ = integrate.quad(lambda z: norm.pdf(z) * norm.cdf(z + a / s) ** (k - 1), -12, 12, limit=200)
    assert abs(float(uniform_alpha(a, k)) - (k * same - 1) / (k - 1)) < 1e-9


def test_limits_and_monotonicity():
    levels = torch.linspace(0, 1, 101, dtype=torch.float64)
    alpha = uniform_alpha(levels, 64)
    assert abs(float(alpha[0])) < 1e-12 and float(alpha[-1]) == 1.0
    assert bool((alpha.diff() > 0).all())
    with pytest.raises(ValueError, match="num_states=1"):
        uniform_alpha(0.5, 1)
    with pytest.raises(ValueError, match=r"\[1.5\]"):
        uniform_alpha(torch.tensor([1.5]), 8)


@pytest.mark.parametrize("a", [0.35, 0.8])
def test_the_argmax_has_the_uniform_processs_marginal(a):
    """Chi-square of sampled argmaxes against UniformProcess.transition_probs at sigma_bar = -log T(a)."""
    k, draws = 6, 60_000
    x0 = torch.full((draws,), 2)
    latent = gaussian_latent(x0, torch.tensor(a), k, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(latent.argmax(-1), minlength=k).double()
    sigma_bar = -math.log(float(uniform_alpha(a, k)))
    probs = UniformProcess(k).transition_probs(torch.tensor([2]), torch.tensor([sigma_bar]))[0].double()
    expected = probs / probs.sum() * draws  # the process computes in float32: renormalised for the test's sums
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def test_the_relaxation_tends_to_the_one_hot_argmax():
    latent = gaussian_latent(torch.tensor([[0, 3], [1, 2]]), torch.tensor([0.4, 0.9]), 7,
                             generator=torch.Generator().manual_seed(1))
    hard = tempered_softmax(latent, 0.0)
    assert torch.equal(hard.argmax(-1), latent.argmax(-1)) and torch.equal(hard.sum(-1), torch.ones(2, 2))
    gaps = [float((tempered_softmax(latent, tau) - hard).abs().max()) for tau in (1.0, 0.1, 0.01, 0.001)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-6
    with pytest.raises(ValueError, match="tau=-1"):
        tempered_softmax(latent, -1)
