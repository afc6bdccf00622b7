"""Block KV caches: model calls of one block that reuse the keys/values of positions computed earlier.

``prefix`` and ``dual`` are exact for block-causal models (``attention_block_size``, block diffusion), where a
block never attends to later blocks; every mode is an approximation for bidirectional models, whose cached
keys/values go stale as the block is decoded (and ``delayed`` also inside the block, for any model).  A
:class:`CachePolicy` says what is cached and when the cache is rebuilt by a full call:

* ``prefix`` (Fast-dLLM): keys/values of the positions before the block, from the block's first call; every
  later call recomputes the block and everything after it.
* ``dual`` (Fast-dLLM): keys/values of every position outside the block; later calls recompute the block only.
* ``delayed`` (dKV-Cache's delayed caching, applied to a block): like ``dual``, and inside the block only the
  positions still masked and those committed by the previous step are recomputed.  A token's keys/values are
  cached one step after it is committed (the step its representation changes most), then reused.
* ``refresh_every = k``: a full call (which rebuilds the cache) every k calls of a block; ``k = 1`` is exact:
  every call is the uncached call, so the tokens equal the uncached sampler's.
* ``refresh_changed = f``: a full call once more than a fraction f of the block's positions have been committed
  since the cache was built (what the stale keys/values have not seen).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import outputs_at

__all__ = ["KV_CACHES", "BlockCaller", "CachePolicy", "check_kv_cache", "cache_policy"]

KV_CACHES = (None, "prefix", "dual", "delayed")


@dataclass(frozen=True)
class CachePolicy:
    """What a block caches (``mode``) and when a full call rebuilds it (see the module docstring)."""

    mode: str
    refresh_every: int | None = None
    refresh_changed: float | None = None

    def __post_init__(self) -> None:  # the policy is public: it checks itself, whoever builds it
        if self.mode is None:
            raise ValueError("a CachePolicy needs a cache mode; no cache is policy None")
        check_kv_cache(self.mode, 0, self.refresh_every, self.refresh_changed)


def check_kv_cache(kv_cache: str | None, block_length: int | None, refresh_every: int | None = None,
                   refresh_changed: float | None = None) -> None:
    """Refuse a bad cache mode or refresh option, naming it, before any model call."""
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got kv_cache={kv_cache!r}")
    if kv_cache is not None and block_length is None:
        raise ValueError(f"kv_cache={kv_cache!r} needs semi-autoregressive blocks: set block_length")
    if refresh_every is not None and (isinstance(refresh_every, bool) or not isinstance(refresh_every, int)
                                      or refresh_every < 1):
        raise ValueError(f"cache_refresh_every must be a positive int or None, "
                         f"got cache_refresh_every={refresh_every!r}")
    if refresh_changed is not None and (isinstance(refresh_changed, bool)
                                        or not isinstance(refresh_changed, (int, float))
                                        or not 0 <= refresh_changed < 1):
        raise ValueError(f"cache_refresh_changed must be a fraction in [0, 1) or None, "
                         f"got cache_refresh_changed={refresh_changed!r}")
    if kv_cache is None and (refresh_every is not None or refresh_changed is not None):
        raise ValueError("cache_refresh_every / cache_refresh_changed refresh a KV cache: set kv_cache too")


def cache_policy(kv_cache: str | None, refresh_every: int | None = None,
                 refresh_changed: float | None = None) -> CachePolicy | None:
    """The :class:`CachePolicy` of these options, or None without a cache (checked by :func:`check_kv_cache`)."""
    return None if kv_cache is None else CachePolicy(kv_cache, refresh_every, refresh_changed)


class BlockCaller:
    """Model calls of the block ``[start, end)`` under a :class:`CachePolicy` (None: every call is a full call).

    A full call runs the whole canvas and keeps the keys/values of all positions; a cached call recomputes only
    the positions the policy names and attends to the kept keys/values of the others.
    """

    def __init__(self, model: Any, policy: CachePolicy | str | None, start: int, end: int) -> None:
        self.policy = CachePolicy(policy) if isinstance(policy, str) else policy
        self.model, self.start, self.end = model, start, end
        self.cache = None  # KVCache of every position (delayed) or of the positions kept (prefix, dual)
        self.calls_since_full, self.at_full, self.previous = 0, None, None
        self.full_calls = 0

    def _stale(self, x: Tensor) -> bool:
        policy = self.policy
        if self.cache is None:
            return True
        if policy.refresh_every is not None and self.calls_since_full >= policy.refresh_every:
            return True
        if policy.refresh_changed is not None:
            changed = (x[:, self.start:self.end] != self.at_full[:, self.start:self.end]).float().mean(-1)
            return bool((changed > policy.refresh_changed).any())
        return False

    def __call__(self, x: Tensor, total_noise: Tensor, where: Tensor, **kwargs: Any) -> Tensor:
        """Outputs ``[n, V]`` at the positions ``where [B, L]`` selects (all inside the block); ``kwargs`` go to the
        model's forward."""
        if self.policy is None:
            return outputs_at(self.model, where, x, total_noise=total_noise, **kwargs).logits
        if self._stale(x):
            logits = self._full(x, total_noise, where, **kwargs)
        elif self.policy.mode == "delayed":
            logits = self._delayed(x, total_noise, where, **kwargs)
        else:
            stop = x.shape[1] if self.policy.mode == "prefix" else self.end
            positions = torch.arange(self.start, stop, device=x.device)
            # ``where`` lies inside [start, stop), so the slice keeps its row-major order.
            logits = outputs_at(self.model, where[:, self.start:stop], x[:, self.start:stop], total_noise=total_noise,
                                positions=positions, past_key_values=self.cache, **kwargs).logits
        self.calls_since_full += 1
        self.previous = x.clone()
        return logits

    def _full(self, x: Tensor, total_noise: Tensor, where: Tensor, **kwargs: Any) -> Tensor:
        out = outputs_at(self.model, where, x, total_noise=total_noise, use_cache=True, **kwargs)
        positions = out.key_values.positions
        if self.policy.mode == "delayed":  # every position, copied: later calls write into it
            self.cache = out.key_values.select(torch.ones_like(positions, dtype=torch.bool))
        else:
            keep = positions < self.start
            if self.policy.mode == "dual":
                keep |= positions >= self.end
            stop = x.shape[1] if self.policy.mode == "prefix" else self.end
            # Room for the recomputed positions at the front: later calls write there in place.
            self.cache = out.key_values.select(keep).with_slots(stop - self.start)
        self.calls_since_full, self.at_full, self.full_calls = 0, x.clone(), self.full_calls + 1
        return out.logits

    def _delayed(self, x: Tensor, total_noise: Tensor, where: Tensor, **kwargs: Any) -> Tensor:
        """Recompute the block's positions masked in any row or committed by the previous step in any row; write
        their fresh keys/values into the cache (the newly committed ones are then reused from the next call)."""
        length = x.shape[1]
        in_block = torch.zeros(length, dtype=torch.bool, device=x.device)
        in_block[self.start:self.end] = True
        mask_id = getattr(self.model.config, "mask_token_id")
        recompute = in_block & ((x == mask_id).any(0) | (x != self.previous).any(0))
        recompute |= in_block & where.any(0)  # every position read is recomputed
        positions = recompute.nonzero(as_tuple=True)[0]
        context = self.cache.select(~recompute)
        out = outputs_at(self.model, where[:, recompute], x[:, recompute], total_noise=total_noise,
                         positions=positions, past_key_values=context, use_cache=True, **kwargs)
        for cached, fresh in zip(self.cache.keys + self.cache.values, out.key_values.keys + out.key_values.values):
            cached[:, :, positions] = fresh.to(cached.dtype)
        return out.logits
