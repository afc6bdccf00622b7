"""The block KV cache (Fast-dLLM): model calls of one block that reuse the keys/values of the positions outside it.

Exact for block-causal models (``attention_block_size``, block diffusion), where a block never attends to later
blocks; an approximation for bidirectional ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import outputs_at

__all__ = ["KV_CACHES", "BlockCaller", "check_kv_cache"]

KV_CACHES = (None, "prefix", "dual")


def check_kv_cache(kv_cache: str | None, block_length: int | None) -> None:
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got kv_cache={kv_cache!r}")
    if kv_cache is not None and block_length is None:
        raise ValueError(f"kv_cache={kv_cache!r} needs semi-autoregressive blocks: set block_length")


class BlockCaller:
    """Model calls of one block, reusing keys/values outside it (Fast-dLLM block KV cache).

    The first step of a block runs the whole canvas and keeps the keys/values; later steps recompute
    only the block and what follows it (``prefix``) or only the block (``dual``), attending to the kept
    keys/values of the rest.  Exact for block-causal models; an approximation for bidirectional ones.
    """

    def __init__(self, model: Any, mode: str | None, start: int, end: int) -> None:
        self.model, self.mode, self.start, self.end = model, mode, start, end
        self.context = None

    def __call__(self, x: Tensor, total_noise: Tensor, where: Tensor, **kwargs: Any) -> Tensor:
        """Outputs ``[n, V]`` at the positions ``where [B, L]`` selects (all inside the block); ``kwargs`` go to the
        model's forward."""
        if self.mode is None:
            return outputs_at(self.model, where, x, total_noise=total_noise, **kwargs).logits
        if self.context is None:
            out = outputs_at(self.model, where, x, total_noise=total_noise, use_cache=True, **kwargs)
            positions = out.key_values.positions
            keep = positions < self.start
            if self.mode == "dual":
                keep |= positions >= self.end
            stop = x.shape[1] if self.mode == "prefix" else self.end
            # Room for the recomputed positions at the front: later calls write there in place.
            self.context = out.key_values.select(keep).with_slots(stop - self.start)
            return out.logits
        stop = x.shape[1] if self.mode == "prefix" else self.end
        positions = torch.arange(self.start, stop, device=x.device)
        # ``where`` lies inside [start, stop), so the slice keeps its row-major order.
        return outputs_at(self.model, where[:, self.start:stop], x[:, self.start:stop], total_noise=total_noise,
                          positions=positions, past_key_values=self.context, **kwargs).logits
