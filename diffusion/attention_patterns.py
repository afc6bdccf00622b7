"""Attention patterns as boolean matrices ``[Lq, Lk]`` (True: query i may attend to key j).

- bidirectional: every pair (a masked-diffusion denoiser);
- causal: ``j <= i`` (an autoregressive LM);
- block-causal with block size b: ``floor(j / b) <= floor(i / b)`` (BD3-LM, Arriola et al. 2025): a block sees
  itself and the blocks before it; b = 1 is causal, b = L bidirectional;
- annealed causal at progress ``r in [0, 1]``: causal plus each future key with probability r (DiffuLLaMA, Gong
  et al. 2025, anneals an autoregressive model's mask towards bidirectional this way).  The future keys switch on
  in one fixed random order (uniforms ``U_ij`` of a fixed seed; ``j`` is visible once ``U_ij < r``), so a training
  step's pattern depends on its progress only, and a resumed run repeats it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .modeling_ddit import block_causal_pattern

__all__ = ["ATTENTION_MODES", "annealed_causal", "attention_pattern", "block_causal"]

ATTENTION_MODES = ("bidirectional", "causal", "block")
_ANNEAL_SEED = 0


block_causal = block_causal_pattern  # one home: modeling_ddit.py, which ships (with dropout.py) as Hub remote code


def attention_pattern(mode: str, length: int, block_size: int | None = None,
                      device: torch.device | str = "cpu") -> Tensor:
    """The ``[L, L]`` pattern of ``mode`` (one of :data:`ATTENTION_MODES`; ``block`` needs ``block_size``)."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got attention={mode!r}")
    positions = torch.arange(length, device=device)
    if mode == "bidirectional":
        return torch.ones(length, length, dtype=torch.bool, device=device)
    if mode == "causal":
        return block_causal(positions, positions, 1)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"attention='block' needs a positive block_size, got block_size={block_size!r}")
    return block_causal(positions, positions, block_size)


def annealed_causal(length: int, progress: float, device: torch.device | str = "cpu") -> Tensor:
    """Causal plus the future keys whose fixed uniform is below ``progress`` (``[L, L]``; 1 is bidirectional)."""
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got progress={progress!r}")
    if progress >= 1.0:
        return attention_pattern("bidirectional", length, device=device)
    order = torch.rand(length, length, generator=torch.Generator().manual_seed(_ANNEAL_SEED))
    return attention_pattern("causal", length, device=device) | (order < progress).to(device)
