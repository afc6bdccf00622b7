"""Masked ancestral sampling (MDLM "ddpm") for absorbing models with the subs parameterisation.

From t = 1 (free positions MASK) down to t = t_final in ``num_steps`` steps t -> s: every masked token
unmasks with probability (alpha_s - alpha_t) / (1 - alpha_t) to y ~ p_theta(. | x_t); unmasked tokens
(and the prompt) never change.  At the end every token still masked takes its most likely value.

For a time-free network the sampler is exact-cached per sequence (RADD): a sequence is recomputed
only when it changed.  Which positions unmask at which step depends on the random numbers alone, not
on the network, so the whole unmasking schedule is drawn first (the same draws, in the same order, as
the step loop) and each sequence's calls are its *events*, the steps at which some of its tokens
unmask.  The k-th events of all sequences are independent of each other and run as one batch, so a
batch needs about ``max_b events_b`` calls of the full batch instead of one call per step; a sequence
takes about ``n (1 - (1 - 1/n)^L)`` events for L free tokens and n steps.  Each token is drawn from
the output of its sequence's state just before its step with that step's uniform, exactly as in the
uncached loop, so cached and uncached runs give the same tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffusion.spec import DiffusionSpec

from .base import (
    FREE,
    SampleOutput,
    Sampler,
    check_filters,
    outputs_at,
    register_sampler,
    remove_remaining_noise,
    sample_categorical,
    token_probs,
    uniforms,
)

__all__ = ["MaskedAncestralSampler"]


@register_sampler
class MaskedAncestralSampler(Sampler):
    """Ancestral sampler for masked diffusion.

    Args:
        t_final: final diffusion time (the last step goes to ``t_final``).
        cache: reuse the network output of sequences that did not change (time-free models only).
        temperature, top_k, top_p: filters on each token distribution (temperature 0: argmax).
    """

    name = "ancestral"
    masked_only = True

    def __init__(self, t_final: float = 1e-5, cache: bool = True, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None) -> None:
        if not 0.0 < t_final < 1.0:
            raise ValueError(f"t_final must be in (0, 1), got t_final={t_final!r}")
        check_filters(temperature, top_k, top_p)
        self.t_final, self.cache = t_final, cache
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def _generate(self, model: Any, spec: DiffusionSpec, canvas: Tensor, num_steps: int,
                  generator: torch.Generator | None, return_trajectory: bool, callback: Any) -> SampleOutput:
        x = torch.where(canvas == FREE, torch.full_like(canvas, spec.mask_id), canvas)
        times = torch.linspace(1.0, self.t_final, num_steps + 1, dtype=torch.float64)
        if self.cache and not spec.time_conditioning:
            return self._generate_by_events(model, spec, x, times, generator, return_trajectory, callback)
        return self._generate_stepwise(model, spec, x, times, generator, return_trajectory, callback)

    def _draw(self, log_probs: Tensor, u: Tensor, mask_id: int) -> Tensor:
        """Tokens ``[n]`` from outputs ``[n, V]`` (after the filters) with the uniforms ``u [n]``."""
        probs = token_probs(log_probs, exclude=mask_id, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return sample_categorical(probs, None, u=u)

    def _generate_stepwise(self, model: Any, spec: DiffusionSpec, x: Tensor, times: Tensor,
                           generator: torch.Generator | None, return_trajectory: bool, callback: Any) -> SampleOutput:
        """The plain loop: one network call per step for the whole batch (at its masked positions)."""
        schedule, mask_id, batch = spec.schedule, spec.mask_id, x.shape[0]
        nfe, trajectory = 0, [x.clone()] if return_trajectory else None

        def outputs(t: Tensor, where: Tensor) -> Tensor:
            nonlocal nfe
            nfe += 1
            sigma_bar = schedule.total_noise(t).float().expand(batch).to(x.device)
            return outputs_at(model, where, x, total_noise=sigma_bar).logits.float()

        for i in range(len(times) - 1):
            t, s = times[i], times[i + 1]
            masked = x == mask_id
            log_probs = outputs(t, masked)  # (n, V) at the masked positions
            alpha_t, alpha_s = schedule.alpha(t), schedule.alpha(s)
            p_unmask = float((alpha_s - alpha_t) / (1 - alpha_t))
            # Two uniforms per position every step; distributions only where a token moves.
            u_move = uniforms(x.shape, generator, x.device)
            u_token = uniforms(x.shape, generator, x.device)
            move = masked & (u_move < p_unmask)
            if bool(move.any()):
                x = x.clone()
                x[move] = self._draw(log_probs[move[masked]], u_token[move], mask_id)
            if trajectory is not None:
                trajectory.append(x.clone())
            if callback is not None:
                callback(i, x)
        x = remove_remaining_noise(x, mask_id, lambda where: outputs(times[-1], where), trajectory)
        return SampleOutput(tokens=x, nfe=nfe, trajectory=trajectory)

    def _generate_by_events(self, model: Any, spec: DiffusionSpec, x: Tensor, times: Tensor,
                            generator: torch.Generator | None, return_trajectory: bool, callback: Any) -> SampleOutput:
        """The exact per-sequence cache, batched by event rounds (see the module docstring)."""
        schedule, mask_id, num_steps = spec.schedule, spec.mask_id, len(times) - 1
        start = x.clone()

        # 1. The unmasking schedule, from the step loop's draws in its order: the step at which each
        #    position unmasks (num_steps: never, noise removal) and the token uniform of that step.
        masked = x == mask_id
        unmask_step = torch.full(x.shape, num_steps, dtype=torch.long, device=x.device)
        u_token_at = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        for i in range(num_steps):
            alpha_t, alpha_s = schedule.alpha(times[i]), schedule.alpha(times[i + 1])
            p_unmask = float((alpha_s - alpha_t) / (1 - alpha_t))
            u_move = uniforms(x.shape, generator, x.device)
            u_token = uniforms(x.shape, generator, x.device)
            move = masked & (u_move < p_unmask)
            unmask_step[move] = i
            u_token_at[move] = u_token[move]
            masked &= ~move

        # 2. Rounds: the k-th event of every sequence that has one, in one batch.
        events = [torch.unique(row[row < num_steps]) for row in unmask_step]  # sorted steps per sequence
        nfe = 0
        for k in range(max(len(e) for e in events)):
            rows = torch.tensor([b for b, e in enumerate(events) if len(e) > k], device=x.device)
            step = torch.stack([events[b][k] for b in rows.tolist()])  # (r,)
            sub = x[rows]
            where = sub == mask_id
            sigma_bar = schedule.total_noise(times[step.cpu()]).float().to(x.device)
            log_probs = outputs_at(model, where, sub, total_noise=sigma_bar).logits.float()  # (n, V)
            nfe += 1
            moving = unmask_step[rows] == step[:, None]  # (r, L), inside ``where``
            sub[moving] = self._draw(log_probs[moving[where]], u_token_at[rows][moving], mask_id)
            x[rows] = sub

        # 3. Noise removal for the sequences with masks left, from their final state.
        still_masked = x == mask_id
        rows = still_masked.any(-1).nonzero(as_tuple=True)[0]
        if len(rows):
            sigma_bar = schedule.total_noise(times[-1]).float().expand(len(rows)).to(x.device)
            log_probs = outputs_at(model, still_masked[rows], x[rows], total_noise=sigma_bar).logits.float()
            nfe += 1
            x[still_masked] = token_probs(log_probs, exclude=mask_id, temperature=0).argmax(-1)

        trajectory = None
        if return_trajectory or callback is not None:  # the canvases of the step loop, rebuilt
            canvases = [torch.where(start == mask_id, torch.where(unmask_step <= i, x, start), start)
                        for i in range(num_steps)]
            if callback is not None:
                for i, canvas in enumerate(canvases):
                    callback(i, canvas)
            if return_trajectory:
                trajectory = [start, *canvases] + ([x.clone()] if len(rows) else [])
        return SampleOutput(tokens=x, nfe=nfe, trajectory=trajectory)
