"""SEDD predictors for score models (absorbing or uniform): Euler and analytic (Tweedie tau-leaping).

From t = 1 to t = t_final in ``num_steps`` steps of size dt, then a final denoising step:

* Euler: per token, ``p(x_{t-dt} = y) = [y = x_t] + dt sigma(t) R(x_t, y)`` with the reverse rate
  ``R(x_t, y) = Q(x_t, y) s_y`` (negative entries clipped to 0 and the row renormalised);
* analytic: ``p(x_{t-dt} = y) ~ [exp(-dsigma Q) s]_y exp(dsigma Q)(x_t, y)``,
  ``dsigma = sigma_bar(t) - sigma_bar(t - dt)``, exact for one token with the exact score;
* denoise: the analytic step with ``dsigma = sigma_bar(t_final)`` (all remaining noise); MASK excluded.

A ``subs`` model is used through RADD's identity ``log s = log p(x0 | x_t) - log(exp(sigma_bar) - 1)``, a uniform
``x0`` model through its own mixture identity (:meth:`diffusion.processes.UniformProcess.log_score_from_log_probs`).
Fixed (prompt) positions are never moved; with the absorbing process only masked positions are computed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffusion.processes import AbsorbingProcess
from diffusion.spec import DiffusionSpec

from .base import (
    FREE,
    SampleOutput,
    Sampler,
    draw_rows,
    outputs_at,
    register_sampler,
    sample_categorical,
    uniforms,
)

__all__ = ["AnalyticSampler", "D3PMSampler", "EulerSampler"]


class _SEDDSampler(Sampler):
    """Shared loop; subclasses give the transition probabilities of one step."""

    def __init__(self, t_final: float = 1e-5, denoise: bool = True) -> None:
        if not 0.0 < t_final < 1.0:
            raise ValueError(f"t_final must be in (0, 1), got t_final={t_final!r}")
        self.t_final, self.denoise = t_final, denoise

    def _step_probs(self, process: Any, x: Tensor, score: Tensor, schedule: Any, t: Tensor, s: Tensor) -> Tensor:
        raise NotImplementedError

    def _log_score(self, model: Any, spec: DiffusionSpec, x: Tensor, sigma_bar: Tensor, where: Tensor) -> Tensor:
        """float64 log-scores ``[n, S]`` at the positions ``where [B, L]`` selects."""
        process = spec.process
        total_noise = sigma_bar.float().expand(x.shape[0]).to(x.device)
        out = outputs_at(model, where, x, total_noise=total_noise).logits.double()
        if spec.predicts_x0:
            out = process.log_score_from_log_probs(out, sigma_bar.double(), x[where])
        return out

    def _generate(self, model: Any, spec: DiffusionSpec, canvas: Tensor, num_steps: int,
                  generator: torch.Generator | None, return_trajectory: bool, callback: Any) -> SampleOutput:
        free = canvas == FREE
        start = draw_rows(canvas.shape, generator, lambda sub, g: spec.process.sample_limit(sub, generator=g))
        x = torch.where(free, start.to(canvas.device), canvas)
        return self.reverse_from(model, spec, x, free, 1.0, num_steps, generator, return_trajectory, callback)

    def reverse_from(self, model: Any, spec: DiffusionSpec, x: Tensor, free: Tensor, t_start: float, num_steps: int,
                     generator: torch.Generator | None, return_trajectory: bool = False,
                     callback: Any = None) -> SampleOutput:
        """Run the reverse process from the noisy canvas ``x [B, L]`` at time ``t_start`` down to ``t_final`` in
        ``num_steps`` steps (then the final denoising step), moving only the positions ``free [B, L]``: a draw of
        x_0 given x_t (what split-Gibbs posterior sampling needs, :mod:`samplers.posterior`)."""
        process, schedule = spec.process, spec.schedule
        absorbing = isinstance(process, AbsorbingProcess)
        if not self.t_final < t_start <= 1.0:
            raise ValueError(f"t_start must be in (t_final, 1], got t_start={t_start!r}")
        times = torch.linspace(t_start, self.t_final, num_steps + 1, dtype=torch.float64)
        trajectory = [x.clone()] if return_trajectory else None
        nfe = 0

        def move(t: Tensor, s: Tensor | None) -> None:
            """One step t -> s (``s`` None: the final denoising step) at the free positions that can move:
            all of them (uniform) or the masked ones (absorbing: a real token never leaves).  One uniform
            per position is drawn either way, so the random stream does not depend on how many move."""
            nonlocal x, nfe
            u = uniforms(x.shape, generator, x.device)
            where = free & (x == process.mask_id) if absorbing else free
            if not bool(where.any()):
                return
            sigma_bar = schedule.total_noise(t)
            score = self._log_score(model, spec, x, sigma_bar, where).exp()
            nfe += 1
            if s is None:
                probs = process.analytic_transition(x[where], score, sigma_bar).clamp_min(0.0)
                if process.mask_id is not None:  # the last step ends on real tokens (absorbing, bridge)
                    probs[..., process.mask_id] = 0.0
            else:
                probs = self._step_probs(process, x[where], score, schedule, t, s).clamp_min(0.0)
            x = x.clone()
            x[where] = sample_categorical(probs, None, u=u[where])

        for i in range(num_steps):
            move(times[i], times[i + 1])
            if trajectory is not None:
                trajectory.append(x.clone())
            if callback is not None:
                callback(i, x)
        if self.denoise:
            move(times[-1], None)
            if trajectory is not None:
                trajectory.append(x.clone())
        return SampleOutput(tokens=x, nfe=nfe, trajectory=trajectory)


@register_sampler
class EulerSampler(_SEDDSampler):
    """SEDD Euler predictor. Args: ``t_final`` (final time), ``denoise`` (final denoising step)."""

    name = "euler"

    def _step_probs(self, process, x, score, schedule, t, s):
        return process.euler_transition(x, score, (t - s) * schedule.rate(t))


@register_sampler
class AnalyticSampler(_SEDDSampler):
    """SEDD analytic (Tweedie tau-leaping) predictor. Args: ``t_final`` (final time), ``denoise``."""

    name = "analytic"

    def _step_probs(self, process, x, score, schedule, t, s):
        return process.analytic_transition(x, score, schedule.total_noise(t) - schedule.total_noise(s))


@register_sampler
class D3PMSampler(Sampler):
    """D3PM's ancestral sampler (Austin et al. 2021) over ``T = num_steps`` steps on the grid ``t_k = k / T``.

    Step k -> k - 1 is the analytic step from ``t_k`` to ``t_{k-1}``; for a model that predicts x0 that step is the
    x0-parameterised reverse step ``p_theta(x_{k-1} | x_k) = sum_x0 p~(x0 | x_k) q(x_{k-1} | x_k, x0)`` of
    :class:`diffusion.d3pm.DiscreteTime` (tested), and the last one (k = 1) lands at sigma = 0, the data.  Exactly
    T network calls; the model's training T need not match (any grid of its schedule is a valid chain).
    """

    name = "d3pm"

    def _generate(self, model: Any, spec: DiffusionSpec, canvas: Tensor, num_steps: int,
                  generator: torch.Generator | None, return_trajectory: bool, callback: Any) -> SampleOutput:
        if num_steps < 2:
            raise ValueError(f"the d3pm sampler needs T = num_steps >= 2 (the last step is the one from t = 1 / T to "
                             f"the data), got num_steps={num_steps}")
        return AnalyticSampler(t_final=1.0 / num_steps)._generate(model, spec, canvas, num_steps - 1, generator,
                                                                  return_trajectory, callback)
