"""Duo's Gaussian duality (Sahoo et al., ICML 2025, "The Diffusion Duality"): a uniform-state discrete diffusion is
the argmax of a Gaussian diffusion on one-hot vectors.

Over K states, the variance-preserving Gaussian latent of a token ``x0`` is

    w = a e_{x0} + s eps,    eps ~ N(0, I_K),    a^2 + s^2 = 1   (``a``: the Gaussian signal level),

and ``x_t = argmax_j w_j``.  Then ``x_t = x0`` when ``eps_{x0} + a / s`` beats the other K - 1 coordinates:

    P(x_t = x0) = int phi(z) Phi(z + a / s)^(K-1) dz,     P(x_t = y) = (1 - P(x_t = x0)) / (K - 1)   (y != x0),

which is the uniform process's marginal ``q(x_t | x0) = alpha e_{x0} + (1 - alpha) / K`` with

    alpha = T(a) = (K P(x_t = x0) - 1) / (K - 1)

(Duo's diffusion transformation operator; T(0) = 0, T(1) = 1, increasing).  ddlm's uniform process
(:class:`~diffusion.processes.UniformProcess`) has ``alpha = e^{-sigma_bar}``, so the Gaussian level ``a`` is the
uniform process at ``sigma_bar = -log T(a)`` (tested by a chi-square test of sampled argmaxes against
``transition_probs``).  Duo's curriculum trains on the tempered relaxation ``softmax(w / tau)``, which tends to
the one-hot of the argmax as ``tau -> 0``: at the curriculum's end the model sees exactly the uniform process's
``x_t``, and its loss is that process's bound.

Duo's Gaussian schedule is linear in the log-SNR ``gamma(t) = gamma_min + t (gamma_max - gamma_min)`` with
``a(t)^2 = sigmoid(-gamma(t))``; :class:`DuoSchedule` is the uniform process it induces, ``sigma_bar(t) = -log
T(a(t))``, with the rate from ``T'`` by a central difference in float64.  The curriculum objective that trains on
the relaxation is :mod:`diffusion.duo_curriculum`; the Psi-samplers are ``samplers/psi.py``; discrete consistency
distillation is not built yet.
``P(x_t = x0)`` is computed by the trapezoid rule over ``z`` in [-12, 12] (``grid`` points), in float64 and log
space (``(K - 1) log Phi``), accurate to about 1e-10 for any K.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .schedules import Schedule

__all__ = ["DuoSchedule", "gaussian_latent", "gaussian_signal", "tempered_softmax", "uniform_alpha"]


def uniform_alpha(gaussian_signal: Tensor | float, num_states: int, *, grid: int = 20001) -> Tensor:
    """``T(a)``: the uniform-process signal ``alpha`` whose marginal the argmax of the Gaussian latent has,
    for Gaussian signal levels ``a`` in [0, 1] (any shape; float64 out)."""
    if isinstance(num_states, bool) or not isinstance(num_states, int) or num_states < 2:
        raise ValueError(f"num_states must be an int >= 2, got num_states={num_states!r}")
    a = torch.as_tensor(gaussian_signal, dtype=torch.float64)
    if bool(((a < 0) | (a > 1) | torch.isnan(a)).any()):
        raise ValueError(f"the Gaussian signal level must be in [0, 1], got {a.flatten()[:5].tolist()}")
    s = torch.sqrt(1.0 - a * a)
    z = torch.linspace(-12.0, 12.0, grid, dtype=torch.float64)
    log_phi = -0.5 * z * z - 0.5 * math.log(2 * math.pi)
    shift = (a / s).unsqueeze(-1)  # a / s = inf at a = 1: Phi = 1 there
    log_cdf = torch.special.log_ndtr(z + shift)
    same = torch.trapezoid(torch.exp(log_phi + (num_states - 1) * log_cdf), z, dim=-1)
    same = torch.where(s == 0, torch.ones_like(same), same)
    return ((num_states * same - 1.0) / (num_states - 1)).clamp(0.0, 1.0)


def gaussian_latent(x0: Tensor, gaussian_signal: Tensor, num_states: int,
                    generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
    """``w = a e_{x0} + sqrt(1 - a^2) eps`` ``[..., K]`` (float32) for ids ``x0 [...]`` and levels ``a``
    broadcasting against ``x0`` from the left (``[B]`` for ``[B, L]``); ``noise`` (``[..., K]``) is ``eps`` when
    given (two times of one path share it), else it is drawn."""
    a = torch.as_tensor(gaussian_signal, dtype=torch.float32, device=x0.device)
    a = a.reshape(a.shape + (1,) * (x0.dim() - a.dim()))
    if noise is None:
        noise = torch.randn(*x0.shape, num_states, generator=generator, device=x0.device)
    one_hot = torch.nn.functional.one_hot(x0, num_states).float()
    return a.unsqueeze(-1) * one_hot + torch.sqrt(1.0 - a * a).unsqueeze(-1) * noise


def tempered_softmax(latent: Tensor, tau: float) -> Tensor:
    """Duo's curriculum input ``softmax(w / tau)`` ``[..., K]``; ``tau = 0`` is the one-hot of ``argmax w``."""
    if not (isinstance(tau, (int, float)) and 0 <= tau < math.inf):
        raise ValueError(f"tau must be >= 0 and finite, got tau={tau!r}")
    if tau == 0:
        return torch.nn.functional.one_hot(latent.argmax(-1), latent.shape[-1]).to(latent.dtype)
    return torch.softmax(latent / tau, dim=-1)


def gaussian_signal(gamma: Tensor | float) -> Tensor:
    """The Gaussian signal level ``a = sqrt(sigmoid(-gamma))`` at log-SNR-like ``gamma`` (float64)."""
    return torch.sqrt(torch.sigmoid(-torch.as_tensor(gamma, dtype=torch.float64)))


class DuoSchedule(Schedule):
    """The uniform process of Duo's Gaussian schedule over ``num_states`` states (see the module docstring):
    ``sigma_bar(t) = -log T(a(t))``, ``a(t) = sqrt(sigmoid(-gamma_min - t (gamma_max - gamma_min)))``.

    Duo's curriculum uses ``gamma`` in [-3.5, -1.75] (its defaults), a narrow band of the Gaussian path; the rate
    ``d sigma_bar / dt = -T'(a) a'(t) / T(a)`` takes ``T'`` by a central difference (step 1e-5 in ``a``)."""

    name = "duo"

    def __init__(self, num_states: int, gamma_min: float = -3.5, gamma_max: float = -1.75) -> None:
        if isinstance(num_states, bool) or not isinstance(num_states, int) or num_states < 2:
            raise ValueError(f"num_states must be an int >= 2, got num_states={num_states!r}")
        if not (math.isfinite(gamma_min) and math.isfinite(gamma_max) and gamma_min < gamma_max):
            raise ValueError(f"Duo's schedule needs finite gamma_min < gamma_max, got gamma_min={gamma_min!r}, "
                             f"gamma_max={gamma_max!r}")
        self.num_states, self.gamma_min, self.gamma_max = num_states, float(gamma_min), float(gamma_max)

    def _signal(self, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return gaussian_signal(self.gamma_min + t * (self.gamma_max - self.gamma_min))

    def total_noise(self, t: Tensor | float) -> Tensor:
        return -torch.log(uniform_alpha(self._signal(t), self.num_states))

    def rate(self, t: Tensor | float) -> Tensor:
        a = self._signal(t)
        h = 1e-5
        slope = (uniform_alpha((a + h).clamp(max=1.0), self.num_states)
                 - uniform_alpha((a - h).clamp(min=0.0), self.num_states)) / ((a + h).clamp(max=1.0)
                                                                              - (a - h).clamp(min=0.0))
        da_dt = -0.5 * a * (1.0 - a * a) * (self.gamma_max - self.gamma_min)  # a^2 = sigmoid(-gamma)
        return -slope * da_dt / uniform_alpha(a, self.num_states)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_states": self.num_states, "gamma_min": self.gamma_min,
                "gamma_max": self.gamma_max}
