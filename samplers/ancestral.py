"""Masked ancestral sampling (MDLM "ddpm") for absorbing models with the subs parameterisation.

From t = 1 (free positions MASK) down to t = eps in ``num_steps`` steps t -> s: every masked token
unmasks with probability (alpha_s - alpha_t) / (1 - alpha_t) to y ~ p_theta(. | x_t); unmasked tokens
(and the prompt) never change.  At the end every token still masked takes its most likely value.

For a time-free network the step is exact-cached per sequence (RADD): a sequence that did not change
since the last network call reuses that call's output, and only the changed sequences are recomputed,
in one smaller batch.  The random numbers drawn do not depend on the cache, so cached and uncached runs
give the same tokens.  Expected calls for L free tokens: about n (1 - (1 - 1/n)^L).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffusion.schedules import get_schedule

from .base import (
    FREE,
    SampleOutput,
    Sampler,
    check_filters,
    outputs_at,
    register_sampler,
    sample_categorical,
    token_probs,
)

__all__ = ["MaskedAncestralSampler"]


def check_masked_model(config: Any, sampler: str) -> None:
    if config.process != "absorbing" or config.parameterization != "subs":
        raise ValueError(
            f"the {sampler} sampler needs an absorbing model with parameterization='subs', got "
            f"process={config.process!r}, parameterization={config.parameterization!r}"
        )


@register_sampler
class MaskedAncestralSampler(Sampler):
    """Ancestral sampler for masked diffusion.

    Args:
        eps: final diffusion time (the last step goes to ``eps``).
        cache: reuse the network output of sequences that did not change (time-free models only).
        temperature, top_k, top_p: filters on each token distribution (temperature 0: argmax).
    """

    name = "ancestral"

    def __init__(self, eps: float = 1e-5, cache: bool = True, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None) -> None:
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got eps={eps!r}")
        check_filters(temperature, top_k, top_p)
        self.eps, self.cache = eps, cache
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def check_model(self, config: Any) -> None:
        check_masked_model(config, self.name)

    def _generate(self, model: Any, canvas: Tensor, num_steps: int, generator: torch.Generator | None,
                  return_trajectory: bool, callback: Any) -> SampleOutput:
        config = model.config
        schedule = get_schedule(config.schedule, **config.schedule_kwargs)
        mask_id = config.mask_token_id
        use_cache = self.cache and not config.time_conditioning
        x = torch.where(canvas == FREE, torch.full_like(canvas, mask_id), canvas)
        batch = x.shape[0]
        times = torch.linspace(1.0, self.eps, num_steps + 1, dtype=torch.float64)
        log_probs: Tensor | None = None  # (B, L, V): the latest outputs, read at masked positions only
        stale = torch.ones(batch, dtype=torch.bool, device=x.device)
        nfe, trajectory = 0, [x.clone()] if return_trajectory else None

        def refresh(t: Tensor) -> None:
            """Recompute the outputs of the stale sequences (all of them without the cache), at their masked
            positions only: the only ones a step reads."""
            nonlocal log_probs, nfe
            rows = stale if (use_cache and log_probs is not None) else torch.ones_like(stale)
            if use_cache:
                rows = rows & (x == mask_id).any(-1)  # a finished sequence is never read again
                if not bool(rows.any()):
                    return
            if log_probs is None:
                log_probs = torch.zeros(x.shape + (config.vocab_size,), device=x.device)
            where = torch.zeros_like(x, dtype=torch.bool)
            where[rows] = x[rows] == mask_id
            sigma = schedule.total_noise(t).float().expand(int(rows.sum())).to(x.device)
            log_probs[where] = outputs_at(model, where[rows], x[rows], sigma=sigma).logits.float()
            nfe += 1

        for i in range(num_steps):
            t, s = times[i], times[i + 1]
            if log_probs is None or not use_cache or bool(stale.any()):
                refresh(t)
            alpha_t, alpha_s = schedule.alpha(t), schedule.alpha(s)
            p_unmask = float((alpha_s - alpha_t) / (1 - alpha_t))
            # Two uniforms per position every step (cache or not); distributions only where a token moves.
            u_move = torch.rand(x.shape, generator=generator, dtype=torch.float64).to(x.device)
            u_token = torch.rand(x.shape, generator=generator, dtype=torch.float64).to(x.device)
            move = (x == mask_id) & (u_move < p_unmask)
            x_next = x.clone()
            if bool(move.any()):
                probs = token_probs(log_probs[move], exclude=mask_id, temperature=self.temperature,
                                    top_k=self.top_k, top_p=self.top_p)
                x_next[move] = sample_categorical(probs, None, u=u_token[move])
            stale = (x_next != x).any(-1)
            x = x_next
            if trajectory is not None:
                trajectory.append(x.clone())
            if callback is not None:
                callback(i, x)

        still_masked = x == mask_id
        if bool(still_masked.any()):  # noise removal: the most likely token
            if not use_cache or bool(stale.any()):
                refresh(times[-1])
            x = x.clone()
            x[still_masked] = token_probs(log_probs[still_masked], exclude=mask_id, temperature=0).argmax(-1)
            if trajectory is not None:
                trajectory.append(x.clone())
        return SampleOutput(tokens=x, nfe=nfe, trajectory=trajectory)
