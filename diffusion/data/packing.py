"""Tokens -> fixed-length blocks, and the deterministic batches a run reads from them.

Packing: documents are tokenized, each followed by the separator (EOS) token, concatenated and cut
into blocks of ``block_size`` tokens; the incomplete last block is dropped.  Every token of the kept
stream appears exactly once, in order.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["BlockBatches", "StreamingBlockBatches", "build_blocks", "pack", "tokenize_documents"]


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


def tokenize_documents(texts: Iterable[str], tokenizer: Any, chunk: int = 256) -> Iterator[list[int]]:
    """Token ids of each document (no special tokens added), tokenized ``chunk`` documents at a time."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == chunk:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
            batch = []
    if batch:
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def build_blocks(texts: Iterable[str], tokenizer: Any, block_size: int, what: str = "the data") -> Tensor:
    """Tokenize and pack documents into ``LongTensor[num_blocks, block_size]``.

    Raises:
        ValueError: the documents (``what`` names them in the message) do not fill one block.
    """
    counts = {"documents": 0, "tokens": 0}

    def counted() -> Iterator[list[int]]:
        for ids in tokenize_documents(texts, tokenizer):
            counts["documents"] += 1
            counts["tokens"] += len(ids) + 1  # and its separator
            yield ids

    blocks = list(pack(counted(), block_size, tokenizer.eos_token_id))
    if not blocks:
        raise ValueError(f"{what} holds {counts['tokens']} tokens in {counts['documents']} document(s), fewer than "
                         f"one block of seq_len={block_size} tokens: give more text or a smaller --seq-len")
    return torch.tensor(blocks, dtype=torch.long)


@dataclass
class BlockBatches:
    """Deterministic batches of in-memory (or memory-mapped) blocks ``[n, L]``.

    Block ``k`` of the run's sequence is ``blocks[perm_e[k mod n]]`` with ``e = k // n`` and ``perm_e`` the seeded
    permutation of epoch ``e``.  A batch is a stretch ``[position, position + size)`` of that sequence, so the
    data position is one number (blocks consumed), the same whatever the number of processes; a resumed run
    continues the sequence exactly where the checkpoint says, even after a change of world size.
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

    def batch_at(self, position: int, size: int) -> Tensor:
        """Blocks ``position .. position + size - 1`` of the run's sequence: ``LongTensor[size, block_size]``."""
        n = len(self.blocks)
        indices = []
        for k in range(position, position + size):
            epoch, offset = divmod(k, n)
            indices.append(int(self._permutation(epoch)[offset]))
        return torch.as_tensor(self.blocks[indices], dtype=torch.long)

    def batch(self, step: int, size: int) -> Tensor:
        """The ``size`` blocks of global step ``step`` when every step takes ``size`` blocks."""
        return self.batch_at(step * size, size)

    def token_counts(self, num_states: int, chunk: int = 4096) -> Tensor:
        """How often each id ``0..num_states-1`` occurs in the blocks: ``LongTensor[num_states]`` (read in chunks of
        ``chunk`` blocks, so memory-mapped blocks stay on disk)."""
        counts = torch.zeros(num_states, dtype=torch.long)
        for start in range(0, len(self.blocks), chunk):
            ids = torch.as_tensor(self.blocks[start : start + chunk], dtype=torch.long).reshape(-1)
            counts += torch.bincount(ids, minlength=num_states)[:num_states]
        return counts


def _shard(stream: Any, index: int, count: int) -> Iterator[Any]:
    """Shard ``index`` of ``count`` of a stream: ``datasets.distributed.split_dataset_by_node`` for a
    ``datasets.IterableDataset``, every ``count``-th item otherwise."""
    try:
        from datasets import IterableDataset
        from datasets.distributed import split_dataset_by_node
    except ImportError:  # pragma: no cover - datasets is a dependency
        IterableDataset = ()  # type: ignore[assignment]
    if isinstance(stream, IterableDataset):
        return iter(split_dataset_by_node(stream, rank=index, world_size=count))
    return itertools.islice(iter(stream), index, None, count)


class StreamingBlockBatches:
    """Blocks from a document stream too large for memory, cut into ``num_shards`` shards dealt to the ranks.

    Shard ``j`` holds the documents ``split_dataset_by_node(stream, rank=j, world_size=num_shards)`` gives and is
    tokenized and packed on its own; rank ``r`` of ``world_size`` reads the shards ``j = r, r + world_size, ...``,
    taking its rows from them in turn.  ``positions[j]`` counts the blocks taken from shard ``j`` (a shard starts
    another pass when it runs out).  The positions are the data position a checkpoint stores: a resume, with
    any number of processes, deals the shards anew and continues each one where it stopped, so no block is
    read twice or skipped.

    Args:
        make_stream: a callable returning the document stream (the same each time: a seeded shuffle); its items
            are strings, or dicts with ``text_column``.
        positions: ``[num_shards]`` blocks already taken from each shard (a resumed run).
    """

    def __init__(self, make_stream: Any, tokenizer: Any, block_size: int, *, text_column: str = "text",
                 num_shards: int = 8, rank: int = 0, world_size: int = 1, positions: list[int] | None = None) -> None:
        if not 0 <= rank < world_size <= num_shards:
            raise ValueError(f"need 0 <= rank < world_size <= num_shards, got rank={rank}, world_size={world_size}, "
                             f"num_shards={num_shards}")
        if positions is not None and len(positions) != num_shards:
            raise ValueError(f"positions holds {len(positions)} entries for num_shards={num_shards}")
        self.make_stream, self.tokenizer, self.block_size = make_stream, tokenizer, block_size
        self.text_column, self.num_shards = text_column, num_shards
        self.owned = list(range(rank, num_shards, world_size))
        self.positions = list(positions) if positions is not None else [0] * num_shards
        self._iterators: dict[int, Iterator[list[int]]] = {}
        self._turn = sum(self.positions[j] for j in self.owned)  # rows this rank has taken: where its turn stands

    def _texts(self, shard: int) -> Iterator[str]:
        for item in _shard(self.make_stream(), shard, self.num_shards):
            yield item[self.text_column] if isinstance(item, dict) else item

    def _blocks(self, shard: int) -> Iterator[list[int]]:
        return pack(tokenize_documents(self._texts(shard), self.tokenizer), self.block_size, self.tokenizer.eos_token_id)

    def _next(self, shard: int) -> list[int]:
        if shard not in self._iterators:  # first use: replay the blocks taken before (a resumed run)
            self._iterators[shard] = self._blocks(shard)
            for _ in range(self.positions[shard]):
                self._pull(shard)
        block = self._pull(shard)
        self.positions[shard] += 1
        return block

    def _pull(self, shard: int) -> list[int]:
        try:
            return next(self._iterators[shard])
        except StopIteration:  # the shard ran out: start another pass over it
            self._iterators[shard] = self._blocks(shard)
            try:
                return next(self._iterators[shard])
            except StopIteration:
                raise ValueError(f"stream shard {shard} of {self.num_shards} holds fewer than block_size="
                                 f"{self.block_size} tokens: use fewer --stream-shards") from None

    def local_rows(self, count: int) -> Tensor:
        """This rank's next ``count`` blocks, ``LongTensor[count, block_size]``, taken from its shards in turn."""
        rows = []
        for _ in range(count):
            shard = self.owned[self._turn % len(self.owned)]
            self._turn += 1
            rows.append(self._next(shard))
        return torch.tensor(rows, dtype=torch.long)
