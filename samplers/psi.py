"""Duo's Psi-samplers for uniform-state models: each reverse step mixes the posterior with a predictor-corrector move.

A step t -> s (``alpha = e^{-sigma_bar}``, ``alpha_t < alpha_s``) draws every free position from

    kappa q(x_s | x_t)  +  (1 - kappa) sum_x0 q(x0 | x_t) q(x_s | x0),

where ``q(x_s | x_t)`` is the analytic step of :mod:`samplers.sedd` (for an x0 model the posterior mixture of
:mod:`diffusion.d3pm`), and the second term predicts x0 from ``x_t`` (the analytic step all the way to sigma = 0)
and noises that prediction forward to s again: a corrector that may change any token.  For a model with the
exact scores of a one-position sequence both terms have the forward marginal ``p_s``, so every ``kappa`` in
[0, 1] keeps it (tested: the samples follow the data); ``kappa = 1`` is the analytic sampler, token for token.

``kappa`` per step, from ReMDM's remasking budgets (Wang et al. 2025) as Duo's code uses them, with ``s_t`` the
corrector's share of ``1 - alpha_s``:

- ``cap``: ``s_t = min(eta, (1 - alpha_s) / alpha_t)``, ``kappa = clip(1 - s_t / (1 - alpha_s), 0, 1)``;
- ``rescale``: ``s_t = eta * min(1, (1 - alpha_s) / alpha_t)``, the same ``kappa``;
- ``constant``: ``kappa = eta``.

One network call per step, then the final denoising step (``steps + 1`` calls).  Uniform process only: for masked
models the same idea is ReMDM (:mod:`samplers.remdm`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffusion.spec import DiffusionSpec

from .base import register_sampler
from .sedd import _SEDDSampler

__all__ = ["PSI_MODES", "PsiSampler", "psi_kappa"]

PSI_MODES = ("cap", "rescale", "constant")


def psi_kappa(mode: str, eta: float, alpha_t: Tensor, alpha_s: Tensor) -> Tensor:
    """The posterior's weight ``kappa`` of a step from ``alpha_t`` to ``alpha_s`` (see the module docstring)."""
    if mode == "constant":
        return torch.full_like(alpha_t, eta)
    budget = (1.0 - alpha_s) / alpha_t
    share = torch.clamp(budget, max=eta) if mode == "cap" else eta * torch.clamp(budget, max=1.0)
    return torch.clamp(1.0 - share / (1.0 - alpha_s), 0.0, 1.0)


@register_sampler
class PsiSampler(_SEDDSampler):
    """Duo's Psi-sampler. Args: ``mode`` (``cap``, ``rescale`` or ``constant``), ``eta`` (in [0, 1]; default 0.01
    with ``cap``, as Duo's runs use), ``t_final``, ``denoise`` (as the SEDD samplers)."""

    name = "psi"

    def __init__(self, mode: str = "cap", eta: float = 0.01, t_final: float = 1e-5, denoise: bool = True) -> None:
        super().__init__(t_final=t_final, denoise=denoise)
        if mode not in PSI_MODES:
            raise ValueError(f"mode must be one of {PSI_MODES}, got mode={mode!r}")
        if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
            raise ValueError(f"eta must be in [0, 1], got eta={eta!r}")
        self.mode, self.eta = mode, float(eta)

    def check_model(self, spec: DiffusionSpec) -> None:
        if spec.process_name != "uniform":
            raise ValueError(f"the psi sampler is for uniform-process models (x0 or score), got process="
                             f"{spec.process_name!r}; a masked model's remasking corrector is the remdm sampler")

    def _step_probs(self, process: Any, x: Tensor, score: Tensor, schedule: Any, t: Tensor, s: Tensor) -> Tensor:
        sigma_t, sigma_s = schedule.total_noise(t), schedule.total_noise(s)
        posterior = process.analytic_transition(x, score, sigma_t - sigma_s).clamp_min(0.0)
        posterior = posterior / posterior.sum(-1, keepdim=True)
        predicted = process.analytic_transition(x, score, sigma_t).clamp_min(0.0)  # q(x0 | x_t)
        corrected = process.push_probs(predicted / predicted.sum(-1, keepdim=True), sigma_s)
        kappa = psi_kappa(self.mode, self.eta, torch.exp(-sigma_t), torch.exp(-sigma_s)).to(posterior.dtype)
        return kappa * posterior + (1.0 - kappa) * corrected
