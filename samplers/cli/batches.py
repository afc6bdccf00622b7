"""Many samples in bounded memory: a sampler run over ``batch_size`` rows at a time.

One generator is drawn from across the batches in order, so with ``batch_size >= num_samples`` (one batch) the
samples are those of a single call, and for any batch size they repeat exactly under the same seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..base import SampleOutput

__all__ = ["batch_sizes", "generate_in_batches"]


def batch_sizes(total: int, batch_size: int) -> list[int]:
    """Sizes of the batches that make ``total`` rows: full ``batch_size`` ones, then the rest."""
    if total < 1 or batch_size < 1:
        raise ValueError(f"need total >= 1 and batch_size >= 1, got total={total}, batch_size={batch_size}")
    return [batch_size] * (total // batch_size) + ([total % batch_size] if total % batch_size else [])


def generate_in_batches(sampler: Any, model: Any, row: list[int], num_samples: int, batch_size: int, *,
                        num_steps: int, generator: torch.Generator,
                        callback: Callable[[int, Tensor], None] | None = None) -> Iterator[SampleOutput]:
    """``sampler.generate`` on ``num_samples`` copies of the canvas ``row`` (token ids, ``FREE`` where to generate),
    ``batch_size`` at a time; yields each batch's output as it is done (``callback`` sees the first batch only)."""
    for index, size in enumerate(batch_sizes(num_samples, batch_size)):
        canvas = torch.tensor([row] * size, dtype=torch.long)
        yield sampler.generate(model, canvas=canvas, num_steps=num_steps, generator=generator,
                               callback=callback if index == 0 else None)
