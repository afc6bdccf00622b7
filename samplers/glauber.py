"""The Glauber Generative Model's sampler: heat-bath steps backwards through the round-robin chain
(:mod:`diffusion.glauber`, Varma et al. 2025).

Free positions start uniform over the real tokens (the noise law the forward chain tends to).  For t = T-1 down to
0 at the visited position s = t mod L the classifier's logits give ``p_t(. | y^{-s}) = softmax(l)``, and
``x_t^s ~ p_t(a | y^{-s}) [Pi_t(phi) 1{a = y^s} + Pi_t(y^s)]``.  Fixed positions (a prompt, a suffix) are never
visited: their steps cost no call, so the calls are ``sweeps x free positions``.  ``num_steps`` must be the chain's
``T = sweeps x length`` (the model's ``glauber_sweeps``): the steps are the chain's, not a free choice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffusion.glauber import GlauberObjective, GlauberProcess
from diffusion.spec import DiffusionSpec

from .base import FREE, SampleOutput, Sampler, check_filters, register_sampler, uniforms

__all__ = ["GlauberSampler"]


@register_sampler
class GlauberSampler(Sampler):
    """Heat-bath sampling of a model trained with ``--objective glauber``.

    Args:
        temperature: divides the classifier's log-odds before the softmax (0: the most likely token).
    """

    name = "glauber"

    def __init__(self, temperature: float = 1.0) -> None:
        check_filters(temperature, None, None)
        self.temperature = temperature

    def check_model(self, spec: DiffusionSpec) -> None:
        if not spec.absorbing:
            raise ValueError("the glauber sampler needs a model trained with objective='glauber' (its MASK id marks the "
                             f"visited position), got process={spec.process_name!r}")

    def _generate(self, model: Any, spec: DiffusionSpec, canvas: Tensor, num_steps: int,
                  generator: torch.Generator | None, return_trajectory: bool, callback: Any) -> SampleOutput:
        sweeps = getattr(model.config, "glauber_sweeps", None)
        if not sweeps:
            raise ValueError("the glauber sampler needs a model trained with --objective glauber (its config has no "
                             "glauber_sweeps)")
        rows, length = canvas.shape
        process = GlauberProcess(spec.num_tokens, length, int(sweeps))  # process.steps == spec.chain_steps(length)
        if num_steps != process.steps:
            raise ValueError(f"the glauber chain of this model over {length} positions has {process.steps} steps "
                             f"({sweeps} sweeps x {length}); got num_steps={num_steps}")
        objective = GlauberObjective(process, spec.mask_id)
        free = canvas == FREE
        start = (uniforms((rows, length), generator, canvas.device) * spec.num_tokens).long().clamp_max(
            spec.num_tokens - 1)
        y = torch.where(free, start, canvas)
        trajectory = [y.clone()] if return_trajectory else None
        calls = 0
        for step in reversed(range(process.steps)):
            s = step % length
            if not bool(free[:, s].any()):
                continue
            t = torch.full((rows,), step, device=canvas.device)
            logits = objective.logits(model, y, t).double()
            if self.temperature == 0:
                probs = torch.nn.functional.one_hot(logits.argmax(-1), spec.num_tokens).double()
            else:
                probs = process.reverse_probs(y.cpu(), t.cpu() % length, t.cpu(), logits.cpu() / self.temperature)
            calls += 1
            u = uniforms((rows,), generator, canvas.device)
            cdf = probs.to(canvas.device).cumsum(-1)
            drawn = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
            drawn = drawn.clamp_max(spec.num_tokens - 1)
            y = y.clone()
            y[:, s] = torch.where(free[:, s], drawn, y[:, s])
            if trajectory is not None:
                trajectory.append(y.clone())
            if callback is not None:
                callback(process.steps - 1 - step, y)
        return SampleOutput(tokens=y, nfe=calls, trajectory=trajectory)
