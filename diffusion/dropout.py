"""Dropout whose mask costs a quarter of the random draws on a CPU.

``torch.nn.functional.dropout`` on a CPU draws one Bernoulli variable per element (``bernoulli_``), about
9% of a bf16 training step of the toolkit's small models.  :class:`Dropout` draws 64 random bits per four
elements instead: each element keeps its value when its 16-bit share ``u`` (uniform on ``{0, ..., 65535}``)
satisfies ``u >= k``, with ``k = round(p * 65536)``, so it is dropped with probability

    p_eff = k / 65536,   |p_eff - p| <= 2^-17,

and kept values are scaled by ``1 / (1 - p_eff)``: the output is an unbiased estimate of the input, exactly as
inverted dropout is, at a rate within 7.7e-6 of ``p``.  The bits come from torch's default generator, whose
state the checkpoints carry, so a resumed run draws the same masks.  On other devices (a GPU's fused dropout
is already cheap) and for ``p`` in {0, ``training=False``} it is ``F.dropout``'s behaviour: identity at p = 0
or in eval mode, ``F.dropout`` itself off the CPU and for ``p`` within 2^-17 of 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Dropout", "dropout", "dropout_keep_mask"]

_LEVELS = 1 << 16


def dropout_keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> tuple[Tensor, float]:
    """A boolean keep-mask of ``shape`` (each entry True with probability ``1 - p_eff``) and ``p_eff``."""
    threshold = round(p * _LEVELS)
    count = 1
    for size in shape:
        count *= size
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)  # every 64-bit pattern
    shares = words.view(torch.int16)[:count].view(shape)  # uniform on [-32768, 32767]
    return shares >= threshold - (_LEVELS // 2), threshold / _LEVELS


class _MaskedScale(torch.autograd.Function):
    """y = x * keep / (1 - p_eff); dy/dx = keep / (1 - p_eff)."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale  # a product, as F.dropout's: a NaN stays NaN where its element is dropped

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None, None


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout of ``x`` (any shape) with rate ``p``: the functional form of :class:`Dropout`."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got p={p!r}")
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or round(p * _LEVELS) == _LEVELS:  # p within 2^-17 of 1: no 16-bit share resolves it
        return F.dropout(x, p, True)
    keep, p_eff = dropout_keep_mask(x.shape, p)
    return _MaskedScale.apply(x, keep, 1.0 / (1.0 - p_eff))


class Dropout(nn.Module):
    """Inverted dropout with rate ``p`` (drop-in for ``nn.Dropout``; the module docstring gives the maths)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got p={p!r}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
