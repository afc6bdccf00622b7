"""A planned budget of network calls: ARDM's parallel sampling policy (Hoogeboom et al., "Autoregressive Diffusion
Models", ICLR 2022, arXiv 2110.02037, section 4).

A time-free masked model is an order-agnostic autoregressive model: given the tokens at any set of positions it
predicts every other one.  Generating D tokens in a random order sigma with k calls means choosing boundaries
``0 = b_0 < b_1 < ... < b_k = D``; call j predicts from the tokens ``sigma[:b_j]`` and draws the positions
``sigma[b_j : b_{j+1}]`` all at once.  With the per-step loss curve ``L_t`` (the expected NLL of the next token when
t tokens are known: :func:`diffusion.evaluation.likelihood.any_order_steps`, written by ``ddlm-eval ppl
--any-order N --store-curve``) the policy's negative log-likelihood bound is

    B(b) = sum_j (b_{j+1} - b_j) L_{b_j}        (nats per sequence)

(every token of a group is charged the loss of the group's first), and :func:`ardm_policy` minimises it over all
policies of exactly k calls by dynamic programming, O(k D^2).  ``k = D`` is one token per call and ``B`` is then
the any-order NLL estimate ``sum_t L_t``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
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
    sample_categorical,
    token_probs,
    uniforms,
)

__all__ = ["CURVE_FILE", "ARDMPolicySampler", "ardm_policy", "policy_bound", "read_curve"]

CURVE_FILE = "ardm_curve.json"  # {"nats_per_step": [L_0, ..., L_{D-1}], ...}, next to a model's config.json


def policy_bound(curve: list[float] | Tensor, boundaries: list[int], offset: int = 0) -> float:
    """``B(b) = sum_j (b_{j+1} - b_j) L_{offset + b_j}``: the NLL bound of a policy (``offset``: tokens known before
    the first call, a prompt)."""
    return float(sum((end - start) * float(curve[offset + start]) for start, end in zip(boundaries, boundaries[1:])))


def ardm_policy(curve: list[float] | Tensor, length: int, calls: int, offset: int = 0) -> tuple[list[int], float]:
    """The boundaries ``[0, b_1, ..., length]`` of the ``calls``-call policy with the least bound, and that bound.

    ``curve[offset + t]`` is the loss of a token when ``offset + t`` tokens are known.

    Raises:
        ValueError: ``calls`` outside ``[1, length]``, or a curve too short or not finite.
    """
    if isinstance(calls, bool) or not isinstance(calls, int) or not 1 <= calls <= length:
        raise ValueError(f"the call budget must be an int in [1, {length}] (the positions to generate), got {calls!r}")
    values = torch.as_tensor(curve, dtype=torch.float64)
    if values.dim() != 1 or len(values) < offset + length:
        raise ValueError(f"the loss curve has {values.numel()} steps; {offset + length} are needed "
                         f"({offset} known + {length} generated tokens)")
    loss = values[offset : offset + length]
    if not bool(torch.isfinite(loss).all()):
        raise ValueError("the loss curve holds non-finite values")
    starts = torch.arange(length + 1, dtype=torch.float64)
    # cost[a, b] = (b - a) L_a for a < b, +inf otherwise
    cost = (starts[None, :] - starts[:length, None]) * loss[:, None]
    cost = torch.where(starts[None, :] > starts[:length, None], cost, torch.full_like(cost, math.inf))
    best = torch.full((calls + 1, length + 1), math.inf, dtype=torch.float64)
    choice = torch.zeros((calls + 1, length + 1), dtype=torch.long)
    best[0, 0] = 0.0
    for j in range(1, calls + 1):
        total = best[j - 1, :length, None] + cost  # [a, b]: the best j-1 groups ending at a, then [a, b)
        best[j], choice[j] = total.min(dim=0)
    boundaries = [length]
    for j in range(calls, 0, -1):
        boundaries.append(int(choice[j, boundaries[-1]]))
    boundaries.reverse()
    return boundaries, float(best[calls, length])


def read_curve(folder: str | Path) -> list[float] | None:
    """The loss curve a model folder stores (:data:`CURVE_FILE`), or None when it has none."""
    path = Path(folder) / CURVE_FILE
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())["nats_per_step"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a loss curve ({{'nats_per_step': [...]}}): {err}") from err
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ValueError(f"{path}: nats_per_step must be a list of finite numbers")
    return [float(v) for v in values]


@register_sampler
class ARDMPolicySampler(Sampler):
    """Exactly ``num_steps`` network calls, spent as :func:`ardm_policy` plans them (time-free masked models).

    Args:
        curve: the per-step loss curve (nats), at least as long as the canvas; None plans as if every step cost
            the same (the budget split as evenly as possible).
        temperature, top_k, top_p: filters on each token distribution.

    After :meth:`generate`, ``last_policy`` holds the boundaries used and ``last_bound`` their NLL bound in nats
    per sequence (None without a curve).
    """

    name = "ardm"
    masked_only = True

    def __init__(self, curve: list[float] | None = None, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None) -> None:
        check_filters(temperature, top_k, top_p)
        if curve is not None and not all(isinstance(v, (int, float)) and math.isfinite(v) for v in curve):
            raise ValueError("curve must be a list of finite numbers (nats per step)")
        self.curve = None if curve is None else [float(v) for v in curve]
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.last_policy: list[int] | None = None
        self.last_bound: float | None = None

    def check_model(self, spec: DiffusionSpec) -> None:
        super().check_model(spec)
        if not spec.time_free_masked:
            raise ValueError("the ardm sampler needs a time-free masked model (an order-agnostic network)")

    def _generate(self, model: Any, spec: DiffusionSpec, canvas: Tensor, num_steps: int,
                  generator: torch.Generator | None, return_trajectory: bool, callback: Any) -> SampleOutput:
        free = canvas == FREE
        counts = free.sum(-1)
        if bool((counts != counts[0]).any()):
            raise ValueError(f"the ardm sampler needs the same number of positions to generate in every row, got "
                             f"{sorted(set(counts.tolist()))}")
        length, known = int(counts[0]), canvas.shape[1] - int(counts[0])
        if num_steps > length:
            raise ValueError(f"num_steps={num_steps} is more calls than the {length} positions to generate")
        if self.curve is None:
            base, extra = divmod(length, num_steps)
            policy = [0] + torch.tensor([base + (1 if j < extra else 0) for j in range(num_steps)]).cumsum(0).tolist()
            self.last_bound = None
        else:
            policy, self.last_bound = ardm_policy(self.curve, length, num_steps, offset=known)
        self.last_policy = policy
        mask_id = spec.mask_id
        x = torch.where(free, torch.full_like(canvas, mask_id), canvas)
        # The order: the free positions of each row sorted by a uniform key (a random permutation).
        keys = uniforms(x.shape, generator, x.device).masked_fill(~free, math.inf)
        order = keys.argsort(dim=-1)[:, :length]  # [B, D]
        trajectory = [x.clone()] if return_trajectory else None
        zero = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        for j, (start, end) in enumerate(zip(policy, policy[1:])):
            masked = x == mask_id
            log_probs = outputs_at(model, masked, x, total_noise=zero).logits.float()
            u = uniforms(x.shape, generator, x.device)
            group = torch.zeros_like(masked)
            group.scatter_(-1, order[:, start:end], True)
            probs = token_probs(log_probs[group[masked]], exclude=mask_id, temperature=self.temperature,
                                top_k=self.top_k, top_p=self.top_p)
            x = x.clone()
            x[group] = sample_categorical(probs, None, u=u[group])
            if trajectory is not None:
                trajectory.append(x.clone())
            if callback is not None:
                callback(j, x)
        return SampleOutput(tokens=x, nfe=len(policy) - 1, trajectory=trajectory)
