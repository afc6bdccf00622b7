"""Loaders of the shipped lm-evaluation-harness tasks (referenced from the YAML files beside this one as
``!function ddlm_tasks.<name>``): each reads its JSON-lines file from this folder, so no download is needed."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _rows(name: str) -> datasets.DatasetDict:
    path = HERE / f"{name}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def next_line(**_: object) -> datasets.DatasetDict:
    return _rows("next_line")


def next_word(**_: object) -> datasets.DatasetDict:
    return _rows("next_word")
