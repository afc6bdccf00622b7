"""Tree rollouts with sibling advantages (d-TreeRPO's branching, V-STAR's sibling-relative advantages).

A flat group samples G completions of a prompt independently.  A tree of ``depth`` D and ``branches`` K samples
the same G = K^D leaves, but shares their beginnings: the S sampling steps are cut into D segments
(:func:`tree_segments`); segment 1 runs on K copies of the prompt's empty canvas, and after each segment every
partially unmasked canvas is copied K times and each copy continues with its own random stream.  Every step is one
batched network call, so the tree spends the flat group's S calls; it runs fewer rows per call in its early
segments (``row_calls``: sum over calls of the rows they process).

Advantages (:func:`sibling_advantages`).  A node n at depth d (1..D) is the canvas after segment d; its value
``V(n)`` is the mean reward of the leaves below it.  Its sibling set is the K children of its parent, and its
advantage compares it with them, as GRPO compares a group:

    A(n) = (V(n) - mean_siblings V) / (std_siblings V + eps)      (``scale="none"``: no division)

so the advantages of every sibling set sum to zero.  A completion token committed during segment d is credited
with the advantage of the leaf's depth-d ancestor: the choices made in a segment are judged against the other
choices made from the same canvas.  ``"group"`` advantages instead give every token of a leaf the leaf's flat
group advantage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from samplers import FREE
from samplers.base import RowStreams

from .objective import group_advantages

__all__ = ["TREE_SAMPLERS", "sibling_advantages", "token_advantages", "tree_rollout", "tree_segments"]

# Samplers whose callback runs after each network call, so a segment can stop after its steps.
TREE_SAMPLERS = ("remask", "threshold")


class _SegmentDone(Exception):
    """Raised from the sampler's callback when a segment has run its steps."""


def tree_segments(steps: int, depth: int) -> list[int]:
    """The sampling steps of each of the ``depth`` segments: ``steps`` split as evenly as possible, the earlier
    segments taking the remainder.

    >>> tree_segments(6, 4)
    [2, 2, 1, 1]
    """
    if depth > steps:
        raise ValueError(f"tree_depth={depth} exceeds sampling_steps={steps}: every segment needs a step")
    base, extra = divmod(steps, depth)
    return [base + (1 if d < extra else 0) for d in range(depth)]


def tree_rollout(sampler: Any, model: Any, prompt_ids: Tensor, completion_length: int, steps: int, branches: int,
                 depth: int, stream: Any) -> dict[str, Any]:
    """Sample ``branches ** depth`` leaves for each prompt row.

    Args:
        sampler: one of :data:`TREE_SAMPLERS`.
        prompt_ids: ``[P, Lp]`` one row per prompt (group).
        stream: ``stream(group, level, node) -> torch.Generator``, the random stream of a node's segment.

    Returns:
        ``tokens [P * K^D, Lp + Lc]`` (the leaves of prompt p are rows ``[p K^D, (p + 1) K^D)``, siblings
        consecutive), ``depth [P * K^D, Lc]`` (the segment, 1..D, in which each completion token was committed),
        ``nfe`` (batched calls) and ``row_calls``.
    """
    prompts, width = prompt_ids.shape
    canvas = torch.cat([prompt_ids, torch.full((prompts, completion_length), FREE)], dim=1)
    committed_at = torch.zeros((prompts, completion_length), dtype=torch.long)
    segments = tree_segments(steps, depth)
    remaining, nfe, row_calls = steps, 0, 0
    for level, segment in enumerate(segments, start=1):
        canvas = canvas.repeat_interleave(branches, dim=0)
        committed_at = committed_at.repeat_interleave(branches, dim=0)
        nodes = branches ** level
        generators = [stream(p, level, n) for p in range(prompts) for n in range(nodes)]
        seen: dict[str, Tensor] = {}

        def stop(step: int, x: Tensor, segment: int = segment) -> None:
            if step + 1 == segment:
                seen["x"] = x.detach().clone()
                raise _SegmentDone

        last = level == depth
        try:
            out = sampler.generate(model, canvas=canvas, num_steps=remaining, generator=RowStreams(generators, 1),
                                   callback=None if last else stop)
            x = out.tokens.cpu()
        except _SegmentDone:
            x = seen["x"].cpu()
        mask_id = model.config.mask_token_id
        new = (canvas[:, width:] == FREE) & (x[:, width:] != mask_id)
        committed_at = torch.where(new, torch.full_like(committed_at, level), committed_at)
        canvas = torch.where((x == mask_id) & (canvas == FREE), torch.full_like(x, FREE), x)
        nfe += segment
        row_calls += segment * len(canvas)
        remaining -= segment
    return {"tokens": canvas, "depth": committed_at, "nfe": nfe, "row_calls": row_calls}


def sibling_advantages(rewards: Tensor, branches: int, depth: int, *, scale: str = "group") -> Tensor:
    """``[B, D]``: for each leaf (rows as :func:`tree_rollout` lays them out) the advantage of its ancestor at each
    depth within that ancestor's sibling set.  NaN rewards (excluded leaves) are left out of the node values; a node
    with no rewarded leaf gets advantage 0.

    >>> sibling_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 2, 2, scale="none").tolist()
    [[0.25, 0.5], [0.25, -0.5], [-0.25, 0.0], [-0.25, 0.0]]
    """
    leaves = branches ** depth
    if rewards.dim() != 1 or rewards.numel() % leaves:
        raise ValueError(f"rewards must be [B] with B a multiple of branches ** depth = {leaves}, "
                         f"got {tuple(rewards.shape)}")
    r = rewards.double().view(-1, leaves)
    columns = []
    for d in range(1, depth + 1):
        per_node = r.view(r.shape[0], branches ** d, -1)  # the leaves below each depth-d node
        valid = ~torch.isnan(per_node)
        values = torch.where(valid, per_node, 0).sum(-1) / valid.sum(-1).clamp_min(1)
        values = torch.where(valid.any(-1), values, torch.full_like(values, float("nan")))
        advantages = group_advantages(values.reshape(-1), branches, scale=scale).view(values.shape)
        columns.append(advantages.nan_to_num(0.0).repeat_interleave(leaves // branches ** d, dim=1).reshape(-1))
    return torch.stack(columns, dim=-1).to(rewards.dtype)


def token_advantages(node_advantages: Tensor, committed_at: Tensor) -> Tensor:
    """``[B, Lc]``: each completion token's advantage, that of its leaf's ancestor at the depth (1..D) of the segment
    that committed it (``node_advantages [B, D]``, ``committed_at [B, Lc]``)."""
    if bool((committed_at < 1).any()) or bool((committed_at > node_advantages.shape[1]).any()):
        raise ValueError("every completion token needs a segment in 1..depth")
    return node_advantages.gather(1, committed_at - 1)
