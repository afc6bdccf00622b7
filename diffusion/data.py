"""Text -> tokens -> fixed-length blocks, through ``datasets`` and ``transformers`` tokenizers.

Sources (``dataset`` argument of :func:`load_texts`):

* ``builtin:shakespeare`` (default) or ``builtin:shakespeare-full``: the shipped corpus;
* a local file or folder: ``.txt`` (one document per file), ``.json``/``.jsonl`` or ``.parquet``
  (one document per row, text in ``text_column``);
* any other string is passed to ``datasets.load_dataset`` (a Hub name), optionally streaming.

Packing: documents are tokenized, each followed by the separator (EOS) token, concatenated and cut
into blocks of ``block_size`` tokens; the incomplete last block is dropped.  Every token of the kept
stream appears exactly once, in order.  When a source has no validation split, whole documents are
held out (a seeded choice), so the two splits never share a document.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .corpus import BUILTIN_CORPORA, builtin_corpus, builtin_tokenizer_path

__all__ = [
    "MASK_TOKEN",
    "BlockBatches",
    "StreamingBlockBatches",
    "build_blocks",
    "load_texts",
    "load_tokenizer",
    "pack",
]

MASK_TOKEN = "<|mask|>"
_LOCAL_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_tokenizer(name_or_path: str = "builtin") -> Any:
    """Load a tokenizer (``builtin``, a local folder or a Hub id) ready for absorbing diffusion.

    Guarantees a document separator (EOS, added as ``<|endoftext|>`` if missing) and a MASK token whose
    id is the *last* id, ``len(tokenizer) - 1``: if the tokenizer has no mask token, or its mask token
    sits elsewhere (BERT's ``[MASK]``), a new ``<|mask|>`` is appended and made the mask token.
    """
    from transformers import AutoTokenizer

    path = builtin_tokenizer_path() if name_or_path == "builtin" else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    if tokenizer.mask_token is None or tokenizer.mask_token_id != len(tokenizer) - 1:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    if tokenizer.mask_token_id != len(tokenizer) - 1:
        raise ValueError(
            f"tokenizer {name_or_path!r}: could not make the mask token the last id "
            f"(mask id {tokenizer.mask_token_id}, {len(tokenizer)} tokens)"
        )
    return tokenizer


def _local_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.suffix in _LOCAL_FORMATS) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no .txt/.json/.jsonl/.parquet files under dataset={str(path)!r}")
    kinds = {_LOCAL_FORMATS.get(p.suffix) for p in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(
            f"dataset={str(path)!r}: files must all be one of the formats {sorted(set(_LOCAL_FORMATS))}, got "
            f"{sorted({p.suffix for p in files})}"
        )
    return files


def _split_documents(docs: list[str], valid_fraction: float, seed: int) -> dict[str, list[str]]:
    """Hold out whole documents (at least one) chosen by a seeded permutation; order is kept within splits."""
    if len(docs) < 2:
        raise ValueError(
            f"cannot hold out a validation split from {len(docs)} document(s): give a dataset with a "
            "validation split or more documents"
        )
    num_valid = min(len(docs) - 1, max(1, round(valid_fraction * len(docs))))
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:num_valid])
    return {
        "train": [d for i, d in enumerate(docs) if i not in held_out],
        "validation": [d for i, d in enumerate(docs) if i in held_out],
    }


def load_texts(
    dataset: str = "builtin:shakespeare",
    *,
    dataset_config: str | None = None,
    text_column: str = "text",
    valid_fraction: float = 0.02,
    seed: int = 0,
    streaming: bool = False,
) -> dict[str, Iterable[str]]:
    """Documents of a data source, as ``{"train": ..., "validation": ...}``.

    Non-streaming sources give lists; ``streaming=True`` (Hub datasets only) gives lazy iterables and
    needs a validation split in the source.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got valid_fraction={valid_fraction!r}")
    if dataset.startswith("builtin:"):
        name = dataset.split(":", 1)[1]
        if name not in BUILTIN_CORPORA:
            raise ValueError(f"unknown built-in corpus dataset={dataset!r}; valid: {['builtin:' + n for n in BUILTIN_CORPORA]}")
        return builtin_corpus(name)

    from datasets import load_dataset

    path = Path(dataset).expanduser()
    if path.exists():
        files = _local_files(path)
        kind = _LOCAL_FORMATS[files[0].suffix]
        extra = {"sample_by": "document"} if kind == "text" else {}
        ds = load_dataset(kind, data_files=[str(f) for f in files], split="train", **extra)
        if text_column not in ds.column_names:
            raise ValueError(f"text_column={text_column!r} not in the columns {ds.column_names} of {dataset!r}")
        return _split_documents(list(ds[text_column]), valid_fraction, seed)
    if dataset.startswith((".", "/", "~")):
        raise FileNotFoundError(f"dataset path does not exist: dataset={dataset!r}")

    splits = load_dataset(dataset, dataset_config, streaming=streaming)
    valid_name = next((s for s in ("validation", "valid", "test") if s in splits), None)
    if "train" not in splits:
        raise ValueError(f"dataset={dataset!r} has no 'train' split (splits: {list(splits)})")
    column = splits["train"].column_names
    if column is not None and text_column not in column:
        raise ValueError(f"text_column={text_column!r} not in the columns {column} of {dataset!r}")
    if streaming:
        if valid_name is None:
            raise ValueError(f"streaming dataset={dataset!r} needs a validation/test split (splits: {list(splits)})")
        return {
            "train": (row[text_column] for row in splits["train"].shuffle(seed=seed, buffer_size=10_000)),
            "validation": (row[text_column] for row in splits[valid_name]),
        }
    if valid_name is not None:
        return {"train": list(splits["train"][text_column]), "validation": list(splits[valid_name][text_column])}
    return _split_documents(list(splits["train"][text_column]), valid_fraction, seed)


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
