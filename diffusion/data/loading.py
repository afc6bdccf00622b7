"""Documents from a data source, split into training and held-out documents.

Sources (``dataset`` argument of :func:`load_texts`):

* ``builtin:shakespeare`` (default) or ``builtin:shakespeare-full``: the shipped corpus;
* a local file or folder: ``.txt`` (one document per file), ``.json``/``.jsonl`` or ``.parquet``
  (one document per row, text in ``text_column``);
* any other string is passed to ``datasets.load_dataset`` (a Hub name), optionally streaming.

When a source has no validation split, whole documents are held out (a seeded choice), so the two
splits never share a document.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from .corpus import BUILTIN_CORPORA, builtin_corpus

__all__ = ["load_texts"]

_LOCAL_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


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

    Non-streaming sources give lists of strings; ``streaming=True`` (Hub datasets only) gives
    ``datasets.IterableDataset`` objects with the one column ``text_column`` and needs a validation split.
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
        return {  # datasets.IterableDataset objects: StreamingBlockBatches shards them with split_dataset_by_node
            "train": splits["train"].shuffle(seed=seed, buffer_size=10_000).select_columns([text_column]),
            "validation": splits[valid_name].select_columns([text_column]),
        }
    if valid_name is not None:
        return {"train": list(splits["train"][text_column]), "validation": list(splits[valid_name][text_column])}
    return _split_documents(list(splits["train"][text_column]), valid_fraction, seed)
