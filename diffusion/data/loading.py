"""Documents from a data source, split into training and held-out documents.

Sources (``dataset`` argument of :func:`load_texts`):

* ``builtin:shakespeare`` (default) or ``builtin:shakespeare-full``: the shipped corpus;
* a local file or folder: ``.txt``/``.md`` (cut into documents by ``text_split``: blank-line-separated
  paragraphs, lines, or whole files; decoded with ``encoding``), ``.json``/``.jsonl`` or ``.parquet`` (one
  document per row, text in ``text_column``);
* any other string is passed to ``datasets.load_dataset`` (a Hub name), optionally streaming.

When a source has no validation split, whole documents are held out (a seeded choice), so the two
splits never share a document.  :func:`load_split` also says which documents were held out (their ids), which
a run records (:mod:`diffusion.data.split_record`) so that evaluation can score exactly them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .corpus import BUILTIN_CORPORA, builtin_corpus
from .encoding import read_text_file
from .json_rows import read_json_documents

__all__ = ["TEXT_SPLITS", "DocumentSplit", "held_out_ids", "load_documents", "local_format", "load_split",
           "load_texts", "source_name", "split_text"]

TEXT_SPLITS = ("paragraph", "line", "file")  # how a .txt file becomes documents

HELD_OUT_RULE = "held-out documents"  # a seeded choice of whole documents of one list
SOURCE_RULE = "source validation split"  # the source's own validation split

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


@dataclass(frozen=True)
class DocumentSplit:
    """Training and held-out documents, and how they were divided.

    ``rule``: ``"source validation split"`` (the source's own; ``held_out_ids`` index it) or
    ``"held-out documents"`` (a seeded choice; ``held_out_ids`` index the source's one list of documents).
    ``held_out_ids`` is None when streaming (the documents are not known up front).
    """

    train: Iterable[str]
    validation: Iterable[str]
    rule: str
    held_out_ids: tuple[int, ...] | None


def split_text(text: str, rule: str) -> list[str]:
    """Documents of one text file: ``paragraph`` (runs of lines between blank lines), ``line`` (each non-blank
    line) or ``file`` (the whole text); blank documents are dropped, paragraphs lose their surrounding newlines."""
    if rule not in TEXT_SPLITS:
        raise ValueError(f"text_split must be one of {TEXT_SPLITS}, got text_split={rule!r}")
    if rule == "file":
        pieces = [text]
    elif rule == "line":
        pieces = text.splitlines()
    else:
        pieces = [p.strip("\r\n") for p in re.split(r"\n[ \t\r]*\n", text)]
    return [p for p in pieces if p.strip()]


def _read_text_files(files: list[Path], text_split: str, encoding: str) -> list[str]:
    docs: list[str] = []
    for path in files:
        docs.extend(split_text(read_text_file(path, encoding), text_split))
    return docs


def held_out_ids(num_documents: int, valid_fraction: float, seed: int) -> list[int]:
    """Ids (ascending) of the documents held out of ``num_documents``: ``round(valid_fraction * n)`` of them,
    at least one and at most ``n - 1``, the first of a permutation seeded by ``seed``."""
    if num_documents < 2:
        raise ValueError(
            f"cannot hold out a validation split from {num_documents} document(s): give a dataset with a "
            "validation split or more documents"
        )
    num_valid = min(num_documents - 1, max(1, round(valid_fraction * num_documents)))
    order = torch.randperm(num_documents, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:num_valid])


def _split_documents(docs: list[str], valid_fraction: float, seed: int) -> DocumentSplit:
    """Hold out whole documents (at least one) chosen by a seeded permutation; order is kept within splits."""
    ids = held_out_ids(len(docs), valid_fraction, seed)
    held_out = set(ids)
    return DocumentSplit(train=[d for i, d in enumerate(docs) if i not in held_out],
                         validation=[docs[i] for i in ids], rule=HELD_OUT_RULE, held_out_ids=tuple(ids))


def _source_split(train: Iterable[str], validation: Iterable[str], streaming: bool = False) -> DocumentSplit:
    ids = None if streaming else tuple(range(len(validation)))  # type: ignore[arg-type]
    return DocumentSplit(train=train, validation=validation, rule=SOURCE_RULE, held_out_ids=ids)


def load_texts(dataset: str = "builtin:shakespeare", *, dataset_config: str | None = None,
               text_column: str = "text", valid_fraction: float = 0.02, seed: int = 0,
               streaming: bool = False, text_split: str = "paragraph",
               encoding: str = "utf-8") -> dict[str, Iterable[str]]:
    """Documents of a data source, as ``{"train": ..., "validation": ...}`` (:func:`load_split` without the ids).

    Non-streaming sources give lists of strings; ``streaming=True`` (Hub datasets only) gives
    ``datasets.IterableDataset`` objects with the one column ``text_column`` and needs a validation split.
    """
    split = load_split(dataset, dataset_config=dataset_config, text_column=text_column,
                       valid_fraction=valid_fraction, seed=seed, streaming=streaming, text_split=text_split,
                       encoding=encoding)
    return {"train": split.train, "validation": split.validation}


def _read_source(dataset: str, *, dataset_config: str | None, text_column: str, seed: int, streaming: bool,
                 text_split: str = "paragraph", encoding: str = "utf-8") -> tuple[Iterable[str], Iterable[str] | None]:
    """``(documents, None)`` for a source of one list of documents; ``(train, validation)`` for a source with its
    own validation split."""
    if dataset.startswith("builtin:"):
        name = dataset.split(":", 1)[1]
        if name not in BUILTIN_CORPORA:
            raise ValueError(f"unknown built-in corpus dataset={dataset!r}; valid: {['builtin:' + n for n in BUILTIN_CORPORA]}")
        docs = builtin_corpus(name)
        return docs["train"], docs["validation"]

    from datasets import load_dataset

    path = Path(dataset).expanduser()
    if path.exists():
        files = _local_files(path)
        kind = _LOCAL_FORMATS[files[0].suffix]
        if kind == "text":
            return _read_text_files(files, text_split, encoding), None
        if kind == "json":
            return read_json_documents(files, text_column, encoding), None
        ds = load_dataset(kind, data_files=[str(f) for f in files], split="train")
        if text_column not in ds.column_names:
            raise ValueError(f"text_column={text_column!r} not in the columns {ds.column_names} of {dataset!r}")
        return list(ds[text_column]), None
    if dataset.startswith((".", "/", "~")) or path.suffix in _LOCAL_FORMATS:  # a data file's name is no Hub id
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
        return (  # datasets.IterableDataset objects: StreamingBlockBatches shards them by node
            splits["train"].shuffle(seed=seed, buffer_size=10_000).select_columns([text_column]),
            splits[valid_name].select_columns([text_column]))
    if valid_name is None:
        return list(splits["train"][text_column]), None
    return list(splits["train"][text_column]), list(splits[valid_name][text_column])


def load_split(
    dataset: str = "builtin:shakespeare",
    *,
    dataset_config: str | None = None,
    text_column: str = "text",
    valid_fraction: float = 0.02,
    seed: int = 0,
    streaming: bool = False,
    text_split: str = "paragraph",
    encoding: str = "utf-8",
) -> DocumentSplit:
    """The training and held-out documents of a data source, with the ids of the held-out ones.

    A source with its own validation split keeps it; otherwise ``valid_fraction`` of the documents are held out
    by :func:`held_out_ids` with ``seed``.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got valid_fraction={valid_fraction!r}")
    train, validation = _read_source(dataset, dataset_config=dataset_config, text_column=text_column, seed=seed,
                                     streaming=streaming, text_split=text_split, encoding=encoding)
    if validation is None:
        return _split_documents(list(train), valid_fraction, seed)
    return _source_split(train, validation, streaming=streaming)


def load_documents(dataset: str, *, dataset_config: str | None = None, text_column: str = "text",
                   text_split: str = "paragraph", encoding: str = "utf-8") -> list[str]:
    """Every document of a data source, in order (training split first where the source has two): what
    scoring a data set "whole" reads; one document is enough."""
    train, validation = _read_source(dataset, dataset_config=dataset_config, text_column=text_column, seed=0,
                                     streaming=False, text_split=text_split, encoding=encoding)
    return list(train) + list(validation or [])


def local_format(dataset: str) -> str | None:
    """``"text"`` (.txt/.md: ``text_split`` and ``encoding`` apply), ``"json"`` (``encoding`` applies) or
    ``"parquet"`` for local files; None for anything else."""
    path = Path(dataset).expanduser()
    if dataset.startswith("builtin:") or not path.exists():
        return None
    try:
        return _LOCAL_FORMATS[_local_files(path)[0].suffix]
    except (FileNotFoundError, ValueError):
        return None


def source_name(dataset: str) -> str:
    """``dataset`` as a run records it: a local path made absolute (so it is found from any folder), else as given."""
    path = Path(dataset).expanduser()
    return str(path.resolve()) if not dataset.startswith("builtin:") and path.exists() else dataset
