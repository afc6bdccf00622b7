"""Threshold parallel decoding (Fast-dLLM): in each step commit every masked token of the current block
whose confidence p(y) exceeds ``threshold`` (and at least the scheduled count, so at least one).

Confident positions are committed together, so easy stretches take one step for many tokens; hard
ones fall back to the confidence-remasking schedule.  Blocks are decoded left to right as in
semi-autoregressive decoding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffusion.spec import DiffusionSpec

from .base import (
    SampleOutput,
    Sampler,
    check_filters,
    check_positive_int,
    check_stop_at_eos,
    eos_id_of,
    register_sampler,
)
from .kv_cache import cache_policy, check_kv_cache
from .remasking import decode_blocks

__all__ = ["ThresholdSampler"]


@register_sampler
class ThresholdSampler(Sampler):
    """Fast-dLLM threshold decoding.

    Args:
        threshold: commit every masked token with p(y) above it (in (0, 1]; 1 turns parallel commits off).
        block_length: positions per semi-autoregressive block (None: one block).
        temperature, top_k, top_p: filters on the predictions (temperature 0: argmax; the default 1 samples).
        kv_cache: ``prefix``, ``dual`` (Fast-dLLM) or ``delayed`` (dKV-Cache) block KV cache (needs
            ``block_length``), or None; see :mod:`samplers.kv_cache`.
        cache_refresh_every: with a cache, a full call every this many calls of a block (1: exact); None: never.
        cache_refresh_changed: with a cache, a full call once more than this fraction of the block was committed
            since the cache was built; None: never.
        stop_at_eos: finish a row once a block holds its EOS and stop when every row has (needs ``block_length``).
    """

    name = "threshold"
    masked_only = True

    def __init__(self, threshold: float = 0.9, block_length: int | None = None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, kv_cache: str | None = None,
                 stop_at_eos: bool = False, cache_refresh_every: int | None = None,
                 cache_refresh_changed: float | None = None) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got threshold={threshold!r}")
        if block_length is not None:
            check_positive_int("block_length", block_length)
        check_kv_cache(kv_cache, block_length, cache_refresh_every, cache_refresh_changed)
        check_filters(temperature, top_k, top_p)
        check_stop_at_eos(stop_at_eos, block_length)
        self.stop_at_eos = stop_at_eos
        self.threshold, self.block_length = threshold, block_length
        self.kv_cache = cache_policy(kv_cache, cache_refresh_every, cache_refresh_changed)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def _generate(self, model: Any, spec: DiffusionSpec, canvas: Tensor, num_steps: int,
                  generator: torch.Generator | None, return_trajectory: bool, callback: Any) -> SampleOutput:
        return decode_blocks(model, spec, canvas, num_steps, self.block_length, strategy="low_confidence",
                             temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                             threshold=self.threshold, generator=generator, return_trajectory=return_trajectory,
                             callback=callback, kv_cache=self.kv_cache,
                             eos_id=eos_id_of(model) if self.stop_at_eos else None)
