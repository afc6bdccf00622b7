"""The record of a run's data (``data_split.json``): where its documents came from and which it held out.

``ddlm-train`` writes it next to ``train_config.json`` and into ``final/``, so that ``ddlm-eval --model RUN/final``
scores exactly the documents the run held out (same source, rule, seed and fraction; the digest proves they
are the same texts), and warns when a data set it is given shares documents with the run's training split.

A document is identified by its index in the source: in the source's own validation split when it has one
(the built-in corpus, a Hub data set with a validation split), else in the one list of documents that the
seeded hold-out rule of :func:`diffusion.data.loading.load_split` divides.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .loading import DocumentSplit, load_split, local_format, source_name

__all__ = ["SPLIT_FILE", "check_unchanged", "document_digest", "document_hash", "make_record", "read_record", "reload_split",
           "write_record"]

SPLIT_FILE = "data_split.json"


def document_hash(text: str) -> bytes:
    """SHA-256 of one document's UTF-8 text: how documents are compared across data sets."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def document_digest(documents: Iterable[str]) -> str:
    """SHA-256 over the documents in order (each hashed, then the hashes chained): equal iff the same texts."""
    outer = hashlib.sha256()
    for text in documents:
        outer.update(document_hash(text))
    return outer.hexdigest()


def make_record(split: DocumentSplit, *, dataset: str, dataset_config: str | None, text_column: str,
                valid_fraction: float, seed: int, text_split: str = "paragraph",
                encoding: str = "utf-8") -> dict[str, Any]:
    """The JSON record of ``split``, loaded from ``dataset`` with these arguments (a local path recorded absolute;
    ``text_split`` only for local text files and ``encoding`` for local text or JSON files, the kinds they apply to)."""
    record: dict[str, Any] = {
        "dataset": source_name(dataset), "dataset_config": dataset_config, "text_column": text_column,
        "rule": split.rule, "valid_fraction": valid_fraction, "seed": seed,
    }
    kind = local_format(dataset)
    if kind == "text":
        record.update(text_split=text_split, encoding=encoding)
    elif kind == "json":
        record.update(encoding=encoding)
    if split.held_out_ids is None:  # streaming: the documents are not known up front
        return {**record, "held_out_ids": None}
    return {**record, "num_train_documents": len(split.train), "num_held_out_documents": len(split.validation),
            "held_out_ids": list(split.held_out_ids), "held_out_sha256": document_digest(split.validation),
            "train_sha256": document_digest(split.train)}


def write_record(folder: str | os.PathLike, record: dict[str, Any]) -> None:
    path = Path(folder) / SPLIT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def check_unchanged(folder: str | os.PathLike, record: dict[str, Any]) -> None:
    """A resumed run must see the data it started with: ValueError when ``folder``'s record names other
    documents (another source, other held-out ids, other texts) than ``record``."""
    path = Path(folder) / SPLIT_FILE
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    keys = ("dataset", "held_out_ids", "held_out_sha256", "train_sha256")
    changed = [k for k in keys if before.get(k) != record.get(k)]
    if changed:
        raise ValueError(f"the data differ from those the run started with ({', '.join(changed)} changed, see "
                         f"{path}): resume with the same data, or start a new run")


def read_record(model: str | os.PathLike) -> dict[str, Any] | None:
    """The record in a model folder, else in the run folder that holds it (``RUN/final`` -> ``RUN``); None
    for a model without one (a Hub id, a model trained elsewhere)."""
    folder = Path(model).expanduser()
    for candidate in (folder / SPLIT_FILE, folder.parent / SPLIT_FILE):
        if folder.is_dir() and candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def reload_split(record: dict[str, Any]) -> DocumentSplit:
    """The run's split, loaded again from its source; a ValueError when the source no longer gives the same
    held-out or training documents (the digests differ), since scores would then mean something else."""
    if record.get("held_out_ids") is None:
        raise ValueError(f"the run streamed dataset={record['dataset']!r}, so its held-out documents were not "
                         "recorded: pass --dataset (and --split) to say what to score")
    split = load_split(record["dataset"], dataset_config=record["dataset_config"],
                       text_column=record["text_column"], valid_fraction=record["valid_fraction"],
                       seed=record["seed"], text_split=record.get("text_split", "paragraph"),
                       encoding=record.get("encoding", "utf-8"))
    for name, docs in (("held_out", split.validation), ("train", split.train)):
        if document_digest(docs) != record[f"{name}_sha256"]:
            raise ValueError(f"dataset={record['dataset']!r} no longer holds the documents the run "
                             f"{'held out' if name == 'held_out' else 'trained on'} (their SHA-256 differs from "
                             f"{SPLIT_FILE}): restore the data, or pass --dataset to score other data")
    return split
