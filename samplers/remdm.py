"""ReMDM: masked ancestral sampling that may remask tokens it has committed (Wang et al., "Remasking Discrete
Diffusion Models with Inference-Time Scaling", 2025, arXiv 2503.00307).

A step t -> s (``alpha_t <= alpha_s``) with remasking probability ``sigma_t`` in ``[0, sigma_max]``,
``sigma_max = min(1, (1 - alpha_s) / alpha_t)``, draws every generated position from

    q(z_s | z_t = y, y != m) = (1 - sigma_t) [z_s = y] + sigma_t [z_s = m]
    q(z_s | z_t = m)         = (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t) p_theta(z_s | z_t)
                               + (1 - alpha_s - sigma_t alpha_t) / (1 - alpha_t) [z_s = m]

whose marginal is the forward process's at s for any such ``sigma_t``; ``sigma_t = 0`` is MDLM's ancestral step,
and this sampler then draws exactly the tokens of :class:`~samplers.ancestral.MaskedAncestralSampler` (the same
uniforms in the same order: one for "moves", one for the token, per position and step).  Prompt and suffix
tokens are never remasked.  Schedules of ``sigma_t``:

- ``cap``: ``min(eta, sigma_max)``;
- ``rescale``: ``eta * sigma_max``;
- ``conf``: per position ``sigma_max * softmax_l(-c_l)`` over the committed generated positions, ``c_l`` the
  probability the token had when it was drawn: the least confident token is the likeliest to go (``eta`` unused);
- ``loop``: alpha follows its own piecewise-linear path (:func:`loop_alpha`), 0 -> ``alpha_on`` over t in [1, t_on]
  and ``alpha_on`` -> 1 over [t_off, 0], with plain ancestral steps there; a step that starts inside (t_off, t_on]
  remasks with ``sigma_t = min(eta, sigma_max)``.  While alpha stays at ``alpha_on`` each such step remasks about as
  many tokens as it unmasks: the model revises a canvas at a fixed noise level.

The network sees ``total_noise = -log(alpha)`` of the alpha a step starts from.  Each step calls the network once
at the masked positions (no cache: remasking changes the canvas in ways the ancestral event schedule cannot
foresee), and a final call gives every position still masked its most likely token.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from diffusion.spec import DiffusionSpec

from .ancestral import MaskedAncestralSampler
from .base import (
    FREE,
    SampleOutput,
    outputs_at,
    register_sampler,
    remove_remaining_noise,
    sample_categorical,
    token_probs,
    uniforms,
)

__all__ = ["REMASK_SCHEDULES", "RemaskingAncestralSampler", "loop_alpha"]

REMASK_SCHEDULES = ("cap", "rescale", "conf", "loop")


def loop_alpha(t: float, t_on: float, t_off: float, alpha_on: float) -> float:
    """ReMDM-loop's alpha at time t: linear from 0 (t = 1) to ``alpha_on`` (t = t_on), constant to t_off, then
    linear to 1 (t = 0)."""
    if t > t_on:
        return (1.0 - t) * alpha_on / (1.0 - t_on)
    if t > t_off:
        return alpha_on
    return 1.0 - t * (1.0 - alpha_on) / t_off


@register_sampler
class RemaskingAncestralSampler(MaskedAncestralSampler):
    """ReMDM for masked (subs) models.

    Args:
        schedule: ``cap``, ``rescale``, ``conf`` or ``loop`` (see the module docstring).
        eta: remasking strength in [0, 1] (``cap``, ``rescale``, ``loop``); 0 is the ancestral sampler.
        t_on, t_off, alpha_on: the loop's window (``0 < t_off < t_on < 1``) and its alpha (in (0, 1)).
        t_final, temperature, top_k, top_p: as :class:`~samplers.ancestral.MaskedAncestralSampler`.
    """

    name = "remdm"

    def __init__(self, schedule: str = "cap", eta: float = 0.02, t_on: float = 0.55, t_off: float = 0.05,
                 alpha_on: float = 0.9, t_final: float = 1e-5, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None) -> None:
        super().__init__(t_final=t_final, cache=False, temperature=temperature, top_k=top_k, top_p=top_p)
        if schedule not in REMASK_SCHEDULES:
            raise ValueError(f"schedule must be one of {REMASK_SCHEDULES}, got schedule={schedule!r}")
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and 0.0 <= eta <= 1.0):
            raise ValueError(f"eta must be in [0, 1], got eta={eta!r}")
        if schedule == "loop" and not (0.0 < t_off < t_on < 1.0 and 0.0 < alpha_on < 1.0):
            raise ValueError(f"the loop needs 0 < t_off < t_on < 1 and 0 < alpha_on < 1, got t_on={t_on!r}, "
                             f"t_off={t_off!r}, alpha_on={alpha_on!r}")
        self.schedule, self.eta, self.t_on, self.t_off, self.alpha_on = schedule, float(eta), t_on, t_off, alpha_on

    def _alphas(self, spec: DiffusionSpec, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_t, alpha_s)`` as float64 0-d tensors: the model's schedule, or the loop's own path."""
        if self.schedule == "loop":
            return (torch.tensor(loop_alpha(float(t), self.t_on, self.t_off, self.alpha_on), dtype=torch.float64),
                    torch.tensor(loop_alpha(float(s), self.t_on, self.t_off, self.alpha_on), dtype=torch.float64))
        return spec.schedule.alpha(t).double(), spec.schedule.alpha(s).double()

    def _total_noise(self, spec: DiffusionSpec, t: Tensor, alpha_t: Tensor) -> Tensor:
        """What the network is told: the schedule's sigma_bar(t), or -log(alpha) on the loop's path."""
        if self.schedule == "loop":
            return -torch.log(alpha_t.clamp_min(1e-30))
        return spec.schedule.total_noise(t)

    def _sigma(self, alpha_t: Tensor, alpha_s: Tensor, t: float, confidence: Tensor, committed: Tensor
               ) -> tuple[float, Tensor]:
        """``(sigma for masked positions, sigma_t per position [B, L])``, within ``[0, sigma_max]``; 0 outside
        ``committed`` in the second."""
        a_t, a_s = float(alpha_t), float(alpha_s)
        sigma_max = 1.0 if a_t <= 0 else min(1.0, (1.0 - a_s) / a_t)
        if self.schedule == "conf":  # the softmax of -confidence over the committed positions of each row
            scores = torch.where(committed, -confidence, torch.full_like(confidence, -math.inf))
            weights = torch.where(committed.any(-1, keepdim=True), scores.softmax(-1), torch.zeros_like(scores))
            return 0.0, sigma_max * weights.nan_to_num(0.0)
        if self.schedule == "cap":
            value = min(self.eta, sigma_max)
        elif self.schedule == "rescale":
            value = self.eta * sigma_max
        else:  # loop: remasking only while the step starts inside the window
            value = min(self.eta, sigma_max) if self.t_off < t <= self.t_on else 0.0
        per_position = torch.where(committed, torch.full(committed.shape, value, dtype=torch.float64,
                                                         device=committed.device), 0.0)
        return value, per_position

    def _generate(self, model: Any, spec: DiffusionSpec, canvas: Tensor, num_steps: int,
                  generator: torch.Generator | None, return_trajectory: bool, callback: Any) -> SampleOutput:
        mask_id, batch = spec.mask_id, canvas.shape[0]
        generated = canvas == FREE
        x = torch.where(generated, torch.full_like(canvas, mask_id), canvas)
        confidence = torch.zeros(x.shape, dtype=torch.float64, device=x.device)  # probability at drawing time
        times = torch.linspace(1.0, self.t_final, num_steps + 1, dtype=torch.float64)
        nfe, trajectory = 0, [x.clone()] if return_trajectory else None

        def outputs(sigma_bar: Tensor, where: Tensor) -> Tensor:
            nonlocal nfe
            nfe += 1
            return outputs_at(model, where, x, total_noise=sigma_bar.float().expand(batch).to(x.device)).logits.float()

        for i in range(num_steps):
            t, s = times[i], times[i + 1]
            alpha_t, alpha_s = self._alphas(spec, t, s)
            masked = x == mask_id
            committed = generated & ~masked
            sigma_masked, sigma = self._sigma(alpha_t, alpha_s, float(t), confidence, committed)
            log_probs = outputs(self._total_noise(spec, t, alpha_t), masked)  # (n, V) at the masked positions
            # A masked position's chance to take a token: (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t).
            p_unmask = 0.0 if float(alpha_t) >= 1 else float((alpha_s - (1.0 - sigma_masked) * alpha_t) / (1 - alpha_t))
            u_move = uniforms(x.shape, generator, x.device)
            u_token = uniforms(x.shape, generator, x.device)
            unmask = masked & (u_move < p_unmask)
            remask = committed & (u_move < sigma)
            if bool(unmask.any()) or bool(remask.any()):
                x = x.clone()
                if bool(unmask.any()):
                    probs = token_probs(log_probs[unmask[masked]], exclude=mask_id, temperature=self.temperature,
                                        top_k=self.top_k, top_p=self.top_p)
                    tokens = sample_categorical(probs, None, u=u_token[unmask])
                    x[unmask] = tokens
                    confidence[unmask] = probs.gather(-1, tokens[:, None]).squeeze(-1).double()
                x[remask] = mask_id
            if trajectory is not None:
                trajectory.append(x.clone())
            if callback is not None:
                callback(i, x)
        last = times[-1]
        final_noise = self._total_noise(spec, last, self._alphas(spec, last, last)[0])
        x = remove_remaining_noise(x, mask_id, lambda where: outputs(final_noise, where), trajectory)
        return SampleOutput(tokens=x, nfe=nfe, trajectory=trajectory)
