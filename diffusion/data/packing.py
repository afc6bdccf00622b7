"""Tokens -> fixed-length blocks, and the deterministic batches a run reads from them.

Packing: documents are tokenized, each followed by the separator (EOS) token, concatenated and cut
into blocks of ``block_size`` tokens; the incomplete last block is dropped.  Every token of the kept
stream appears exactly once, in order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["BlockBatches", "StreamingBlockBatches", "build_blocks", "pack"]


def pack(token_lists: Iterable[list[int]], block_size: int, separator_id: int) -> Iterator[list[int]]:
    """Concatenate documents, each followed by ``separator_id``, and cut the stream into full blocks."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got block_size={block_size!r}")
    buffer: list[int] = []
    for tokens in token_lists:
        buffer.extend(tokens)
        buffer.append(separator_id)
        while len(buffer) >= block_size:
            yield buffer[:block_size]
            del buffer[:block_size]


def _tokenize(texts: Iterable[str], tokenizer: Any, chunk: int = 256) -> Iterator[list[int]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == chunk:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
            batch = []
    if batch:
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def build_blocks(texts: Iterable[str], tokenizer: Any, block_size: int) -> Tensor:
    """Tokenize and pack documents into ``LongTensor[num_blocks, block_size]``."""
    blocks = list(pack(_tokenize(texts, tokenizer), block_size, tokenizer.eos_token_id))
    if not blocks:
        raise ValueError(f"the data holds fewer than block_size={block_size} tokens")
    return torch.tensor(blocks, dtype=torch.long)


@dataclass
class BlockBatches:
    """Deterministic batches of in-memory blocks: epoch ``e`` visits the blocks in ``randperm(seed + e)``.

    ``batch(step, size)`` is a pure function of ``(seed, step, size)``, so a resumed run sees exactly
    the batches an uninterrupted one would.
    """

    blocks: Tensor
    seed: int = 0

    def __post_init__(self) -> None:
        self._perm_epoch = -1
        self._perm: Tensor | None = None

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.blocks), generator=gen)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int, size: int) -> Tensor:
        """The ``size`` blocks of global step ``step``: ``LongTensor[size, block_size]``."""
        n = len(self.blocks)
        indices = []
        for position in range(step * size, (step + 1) * size):
            epoch, offset = divmod(position, n)
            indices.append(int(self._permutation(epoch)[offset]))
        return self.blocks[indices]


class StreamingBlockBatches:
    """Batches from a stream of documents too large for memory, tokenized and packed on the fly.

    ``make_texts`` must return the same document stream each time it is called (a seeded shuffle);
    resuming at ``step`` replays and skips the ``step * size`` blocks already consumed.
    """

    def __init__(self, make_texts: Any, tokenizer: Any, block_size: int) -> None:
        self.make_texts, self.tokenizer, self.block_size = make_texts, tokenizer, block_size
        self._iterator: Iterator[list[int]] | None = None
        self._position = 0

    def _blocks(self) -> Iterator[list[int]]:
        return pack(_tokenize(self.make_texts(), self.tokenizer), self.block_size, self.tokenizer.eos_token_id)

    def _next_block(self) -> list[int]:
        try:
            return next(self._iterator)
        except StopIteration:  # the stream is exhausted: start another pass
            self._iterator = self._blocks()
            return next(self._iterator)

    def batch(self, step: int, size: int) -> Tensor:
        """The ``size`` blocks of global step ``step`` (replaying the stream when resuming)."""
        if self._iterator is None or self._position != step * size:
            self._iterator, self._position = self._blocks(), 0
            for _ in range(step * size):
                self._next_block()
        rows = [self._next_block() for _ in range(size)]
        self._position = (step + 1) * size
        return torch.tensor(rows, dtype=torch.long)
