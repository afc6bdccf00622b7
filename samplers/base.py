"""What every sampler returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["SampleOutput"]


@dataclass(frozen=True)
class SampleOutput:
    """``tokens``: ``LongTensor[B, L]``; ``nfe``: network calls made; ``trajectory``: the canvas after each step."""

    tokens: Tensor
    nfe: int
    trajectory: list[Tensor] | None = None
