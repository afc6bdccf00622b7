"""SEDD predictors for score models (absorbing or uniform): Euler and analytic (Tweedie tau-leaping).

From t = 1 to t = eps in ``num_steps`` steps of size dt, then a final denoising step:

* Euler: per token, ``p(x_{t-dt} = y) = [y = x_t] + dt sigma(t) R(x_t, y)`` with the reverse rate
  ``R(x_t, y) = Q(x_t, y) s_y`` (negative entries clipped to 0 and the row renormalised);
* analytic: ``p(x_{t-dt} = y) ~ [exp(-dsigma Q) s]_y exp(dsigma Q)(x_t, y)``,
  ``dsigma = sigma_bar(t) - sigma_bar(t - dt)``, exact for one token with the exact score;
* denoise: the analytic step with ``dsigma = sigma_bar(eps)`` (all remaining noise); MASK excluded.

A ``subs`` model is used through RADD's identity ``log s = log p(x0 | x_t) - log(exp(sigma_bar) - 1)``.
Fixed (prompt) positions are reset after every step, so they never change.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffusion.processes import AbsorbingProcess, get_process
from diffusion.schedules import get_schedule

from .base import FREE, SampleOutput, Sampler, register_sampler, sample_categorical

__all__ = ["EulerSampler", "AnalyticSampler"]


class _SEDDSampler(Sampler):
    """Shared loop; subclasses give the transition probabilities of one step."""

    def __init__(self, eps: float = 1e-5, denoise: bool = True) -> None:
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got eps={eps!r}")
        self.eps, self.denoise = eps, denoise

    def _step_probs(self, process: Any, x: Tensor, score: Tensor, schedule: Any, t: Tensor, s: Tensor) -> Tensor:
        raise NotImplementedError

    def _log_score(self, model: Any, process: Any, x: Tensor, sigma_bar: Tensor) -> Tensor:
        sigma = sigma_bar.float().expand(x.shape[0]).to(x.device)
        out = model(input_ids=x, sigma=sigma).logits.double()
        if model.config.parameterization == "subs":
            out = process.log_score_from_log_probs(out, sigma.double(), x)
        return out

    def _generate(self, model: Any, canvas: Tensor, num_steps: int, generator: torch.Generator | None,
                  return_trajectory: bool, callback: Any) -> SampleOutput:
        config = model.config
        process = get_process(config.process, config.vocab_size - (1 if config.process == "absorbing" else 0))
        schedule = get_schedule(config.schedule, **config.schedule_kwargs)
        free = canvas == FREE
        x = torch.where(free, process.sample_limit(canvas.shape, generator=generator).to(canvas.device), canvas)
        times = torch.linspace(1.0, self.eps, num_steps + 1, dtype=torch.float64)
        trajectory = [x.clone()] if return_trajectory else None
        nfe = 0
        for i in range(num_steps):
            t, s = times[i], times[i + 1]
            score = self._log_score(model, process, x, schedule.total_noise(t)).exp()
            nfe += 1
            probs = self._step_probs(process, x, score, schedule, t, s).clamp_min(0.0)
            x = torch.where(free, sample_categorical(probs, generator), canvas)
            if trajectory is not None:
                trajectory.append(x.clone())
            if callback is not None:
                callback(i, x)
        if self.denoise:
            sigma_end = schedule.total_noise(times[-1])
            score = self._log_score(model, process, x, sigma_end).exp()
            nfe += 1
            probs = process.analytic_transition(x, score, sigma_end).clamp_min(0.0)
            if isinstance(process, AbsorbingProcess):
                probs[..., process.mask_id] = 0.0
            x = torch.where(free, sample_categorical(probs, generator), canvas)
            if trajectory is not None:
                trajectory.append(x.clone())
        return SampleOutput(tokens=x, nfe=nfe, trajectory=trajectory)


@register_sampler
class EulerSampler(_SEDDSampler):
    """SEDD Euler predictor. Args: ``eps`` (final time), ``denoise`` (final denoising step)."""

    name = "euler"

    def _step_probs(self, process, x, score, schedule, t, s):  # noqa: ANN001, ANN202
        return process.euler_transition(x, score, (t - s) * schedule.rate_noise(t))


@register_sampler
class AnalyticSampler(_SEDDSampler):
    """SEDD analytic (Tweedie tau-leaping) predictor. Args: ``eps`` (final time), ``denoise``."""

    name = "analytic"

    def _step_probs(self, process, x, score, schedule, t, s):  # noqa: ANN001, ANN202
        return process.analytic_transition(x, score, schedule.total_noise(t) - schedule.total_noise(s))
