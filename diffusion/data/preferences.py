"""Preference data for DPO: rows of ``prompt``, ``chosen`` and ``rejected`` (TRL's column names).

A source is a local ``.json``/``.jsonl``/``.parquet`` file or folder or a ``datasets`` Hub name
(:func:`diffusion.data.instructions.read_rows`).  ``chosen`` and ``rejected`` are answer strings; each is encoded
with the prompt exactly as an instruction row ``{"prompt", "completion"}`` is
(:func:`diffusion.data.instructions.encode_example`: the chat template when the tokenizer has one, else the
prompt's ids, the answer's and EOS).  :func:`preference_batch` lays a batch out for the likelihood estimators:
prompts left-padded to one fixed width, answers right-padded with EOS to one fixed length (LLaDA's fixed-length
layout, so every row has the same number of scored tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .instructions import encode_example, read_rows

__all__ = ["PreferenceExample", "encode_preferences", "load_preference_rows", "preference_batch"]

COLUMNS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferenceExample:
    """Token ids of one preference row: the prompt and the two answers (each ending as its format ends it)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def load_preference_rows(source: str, *, split: str = "train", dataset_config: str | None = None) -> list[dict]:
    """The rows of ``source``, checked: the three columns present, every answer a non-empty string."""
    rows = read_rows(source, split=split, dataset_config=dataset_config)
    check_preference_rows(rows, source)
    return rows


def check_preference_rows(rows: list[dict[str, Any]], source: str = "rows") -> None:
    """Refuse rows without ``prompt``/``chosen``/``rejected`` strings, or with an empty answer, naming the row."""
    if not rows:
        raise ValueError(f"data={source!r} has no rows")
    missing = [c for c in COLUMNS if c not in rows[0]]
    if missing:
        raise ValueError(f"data={source!r} has the columns {sorted(rows[0])}: preference data needs 'prompt', "
                         f"'chosen' and 'rejected' (missing {missing})")
    for i, row in enumerate(rows):
        for column in COLUMNS:
            value = row.get(column)
            if not isinstance(value, str):
                raise ValueError(f"data={source!r} row {i}: {column!r} must be a string, got {value!r}")
            if column != "prompt" and not value.strip():
                raise ValueError(f"data={source!r} row {i}: {column!r} is empty")


def encode_preferences(rows: list[dict[str, Any]], tokenizer: Any, *, answer_length: int,
                       format: str = "auto") -> list[PreferenceExample]:
    """Encoded rows; an answer longer than ``answer_length`` tokens is refused (cutting it would change what is
    preferred), naming the row."""
    check_preference_rows(rows)
    examples = []
    for i, row in enumerate(rows):
        chosen = encode_example({"prompt": row["prompt"], "completion": row["chosen"]}, tokenizer, format=format)
        rejected = encode_example({"prompt": row["prompt"], "completion": row["rejected"]}, tokenizer, format=format)
        for name, answer in (("chosen", chosen.completion), ("rejected", rejected.completion)):
            if len(answer) > answer_length:
                raise ValueError(f"row {i}: {name!r} has {len(answer)} tokens, more than "
                                 f"completion_length={answer_length}")
        examples.append(PreferenceExample(chosen.prompt, chosen.completion, rejected.completion))
    return examples


def preference_batch(examples: list[PreferenceExample], *, prompt_width: int, answer_length: int, pad_id: int,
                     eos_id: int) -> tuple[Tensor, Tensor]:
    """``(sequences [2B, P + C], completion [2B, P + C] bool)``: row 2k is pair k's chosen answer, row 2k + 1 its
    rejected one; prompts left-padded with ``pad_id`` to ``P = prompt_width``, answers right-padded with ``eos_id``
    to ``C = answer_length``; ``completion`` marks the last C positions.  A fixed P keeps the layout of a pair the
    same whatever batch it is in."""
    rows = []
    for e in examples:
        if len(e.prompt) > prompt_width:
            raise ValueError(f"a prompt has {len(e.prompt)} tokens, more than prompt_width={prompt_width}")
        for answer in (e.chosen, e.rejected):
            rows.append([pad_id] * (prompt_width - len(e.prompt)) + e.prompt + answer
                        + [eos_id] * (answer_length - len(answer)))
    sequences = torch.tensor(rows, dtype=torch.long)
    completion = torch.zeros_like(sequences, dtype=torch.bool)
    completion[:, prompt_width:] = True
    return sequences, completion
