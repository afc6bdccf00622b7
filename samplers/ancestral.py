"""Masked ancestral sampling (MDLM "ddpm") for absorbing models with the subs parameterisation.

From t = 1 (all MASK) down to t = eps in ``num_steps`` steps t -> s: every masked token unmasks with
probability (alpha_s - alpha_t) / (1 - alpha_t) to y ~ p_theta(. | x_t); unmasked tokens never change.
At the end every token still masked takes its most likely value.

For a time-free network the step is exact-cached per sequence (RADD): a sequence that did not change
since the last network call reuses that call's output, so only changed sequences are recomputed.  The
random numbers drawn do not depend on the cache, so cached and uncached runs give the same tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion.schedules import Schedule, get_schedule

from .base import SampleOutput

__all__ = ["MaskedAncestralSampler"]


class MaskedAncestralSampler:
    """Ancestral sampler for masked diffusion.

    Args:
        eps: final diffusion time (the last step goes from ``t_1`` to ``eps``).
        cache: reuse the network output of sequences that did not change (time-free models only).
        temperature: divides the log-probabilities before sampling (> 0).
    """

    name = "ancestral"

    def __init__(self, eps: float = 1e-5, cache: bool = True, temperature: float = 1.0) -> None:
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got eps={eps!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got temperature={temperature!r}")
        self.eps, self.cache, self.temperature = eps, cache, temperature

    @torch.no_grad()
    def generate(
        self,
        model: torch.nn.Module,
        *,
        batch_size: int,
        length: int,
        num_steps: int,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
    ) -> SampleOutput:
        config = model.config
        if config.process != "absorbing" or config.parameterization != "subs":
            raise ValueError(
                "the ancestral sampler needs an absorbing model with parameterization='subs', got "
                f"process={config.process!r}, parameterization={config.parameterization!r}"
            )
        for name, value in (("batch_size", batch_size), ("length", length), ("num_steps", num_steps)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        if length > config.max_position_embeddings:
            raise ValueError(f"length={length} exceeds the model's max_position_embeddings={config.max_position_embeddings}")

        schedule: Schedule = get_schedule(config.schedule, **config.schedule_kwargs)
        device = next(model.parameters()).device
        mask_id = config.mask_token_id
        use_cache = self.cache and not config.time_conditioning
        x = torch.full((batch_size, length), mask_id, dtype=torch.long, device=device)
        times = torch.linspace(1.0, self.eps, num_steps + 1, dtype=torch.float64)
        log_probs: Tensor | None = None
        stale = torch.ones(batch_size, dtype=torch.bool, device=device)
        nfe, trajectory = 0, [x.clone()] if return_trajectory else None

        for i in range(num_steps):
            t, s = times[i], times[i + 1]
            if log_probs is None or not use_cache or bool(stale.any()):
                rows = stale if (use_cache and log_probs is not None) else torch.ones_like(stale)
                sigma = schedule.total_noise(t).float().expand(int(rows.sum())).to(device)
                fresh = model(x[rows], sigma=sigma).logits.float()
                if log_probs is None:
                    log_probs = fresh
                else:
                    log_probs[rows] = fresh
                nfe += 1
            alpha_t, alpha_s = schedule.alpha(t), schedule.alpha(s)
            p_unmask = float((alpha_s - alpha_t) / (1 - alpha_t))
            u_move = torch.rand(x.shape, generator=generator, dtype=torch.float64).to(device)
            u_token = torch.rand(x.shape, generator=generator, dtype=torch.float64).to(device)
            probs = torch.softmax(log_probs[..., :mask_id].double() / self.temperature, dim=-1)
            cdf = probs.cumsum(-1)
            draw = torch.searchsorted(cdf, (u_token * cdf[..., -1]).unsqueeze(-1)).squeeze(-1).clamp_max(mask_id - 1)
            move = (x == mask_id) & (u_move < p_unmask)
            x_next = torch.where(move, draw, x)
            stale = (x_next != x).any(-1)
            x = x_next
            if trajectory is not None:
                trajectory.append(x.clone())

        still_masked = x == mask_id
        if bool(still_masked.any()):  # noise removal: the most likely token
            if not use_cache or bool(stale.any()):
                sigma = schedule.total_noise(times[-1]).float().expand(batch_size).to(device)
                log_probs = model(x, sigma=sigma).logits.float()
                nfe += 1
            x = torch.where(still_masked, log_probs[..., :mask_id].argmax(-1), x)
            if trajectory is not None:
                trajectory.append(x.clone())
        return SampleOutput(tokens=x, nfe=nfe, trajectory=trajectory)
