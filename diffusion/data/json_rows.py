"""Documents from local ``.json`` / ``.jsonl`` files, every bad row refused by file, row and field.

A ``.jsonl`` file holds one JSON object per line (blank lines are skipped); a ``.json`` file holds either a JSON
array of objects or, like ``.jsonl``, one object per line.  The document is the row's ``text_column`` field,
which must be a string.  Rows are numbered from 1 as an editor numbers lines (for a ``.jsonl`` file the row
number is the line number).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .encoding import read_text_file

__all__ = ["read_json_documents"]


def _rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """``(row number, parsed row)`` of one file."""
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno} ({err.msg})") from err
        yield from enumerate(rows, start=1)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number} is not valid JSON (column {err.colno}: {err.msg})") from err


def read_json_documents(files: list[Path], text_column: str, encoding: str = "utf-8") -> list[str]:
    """The ``text_column`` string of every row of ``files``, in order.

    Raises:
        ValueError: a line that is not JSON, a row that is not an object, a row without ``text_column`` or whose
            value is not a string (null, a number, a list), naming the file, the row and the field; or files
            that hold no rows at all.
    """
    documents: list[str] = []
    for path in files:
        for number, row in _rows(path, read_text_file(path, encoding)):
            where = f"{path}: row {number}"
            if not isinstance(row, dict):
                raise ValueError(f"{where} is a JSON {type(row).__name__}, not an object with a {text_column!r} field")
            if text_column not in row:
                raise ValueError(f"{where} has no {text_column!r} field (its fields: {sorted(row)}); choose the "
                                 "column with --text-column")
            value = row[text_column]
            if not isinstance(value, str):
                kind = "null" if value is None else type(value).__name__
                raise ValueError(f"{where}: field {text_column!r} is {kind}, not a string")
            documents.append(value)
    if not documents:
        raise ValueError(f"dataset file{'s' if len(files) > 1 else ''} {', '.join(map(str, files))} hold"
                         f"{'' if len(files) > 1 else 's'} no rows")
    return documents
