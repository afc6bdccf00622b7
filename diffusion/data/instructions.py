"""Instruction data for supervised fine-tuning: (prompt ids, completion ids) pairs, and their batches.

Sources (``source`` of :func:`load_instruction_rows`): ``builtin:shakespeare-dialogue`` (each speech of the built-in
corpus as a user turn and the next speech as the reply), a local ``.json``/``.jsonl``/``.parquet`` file or folder,
or a ``datasets`` Hub name.  A row holds either

- ``messages``: ``[{"role": ..., "content": ...}, ...]`` whose last message is the assistant's answer; or
- ``prompt`` and ``completion`` strings.

Formatting (:func:`encode_example`): chat rows go through the tokenizer's chat template exactly as
``tokenizer.apply_chat_template`` renders them: the prompt is the template of every message but the last with the
generation prompt, the whole sequence the template of all messages, and the completion the tokens after the
prompt (the template's own end-of-turn tokens included).  Prompt/completion rows are formatted as a two-message
chat when the tokenizer has a template (``format="auto"`` or ``"chat"``), else as the prompt's ids followed by the
completion's and EOS (``format="plain"``).

:func:`collate` pads a batch on the right.  LLaDA (Nie et al. 2025) pads with EOS and trains on those EOS too, so
that the model learns to end its answer (``pad_with_eos=True``); otherwise padding is excluded from attention and
from the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["BUILTIN_DIALOGUE", "FORMATS", "InstructionBatch", "InstructionExample", "collate", "encode_example",
           "encode_examples", "load_instruction_rows", "read_rows"]

BUILTIN_DIALOGUE = "builtin:shakespeare-dialogue"
FORMATS = ("auto", "chat", "plain")
_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class InstructionExample:
    prompt: list[int]
    completion: list[int]


@dataclass(frozen=True)
class InstructionBatch:
    """``sequences [B, L]`` (prompt then completion then padding), ``completion [B, L]`` (positions that carry loss
    and may be masked), ``attention_mask [B, L]`` (None when nothing is excluded)."""

    sequences: Tensor
    completion: Tensor
    attention_mask: Tensor | None


def _dialogue(split: str) -> list[dict[str, Any]]:
    """Consecutive speeches of the built-in plays as one-turn chats."""
    from .corpus import builtin_corpus

    docs = builtin_corpus("shakespeare")["validation" if split in ("validation", "test") else "train"]
    rows = []
    for doc in docs:
        speeches = [s.strip() for s in doc.split("\n\n") if s.strip() and s.strip().split("\n", 1)[0].endswith(":")]
        for question, answer in zip(speeches, speeches[1:]):
            rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


def read_rows(source: str, *, split: str = "train", dataset_config: str | None = None) -> list[dict]:
    """The rows of a local ``.json``/``.jsonl``/``.parquet`` file or folder, or of a ``datasets`` Hub name (its
    ``split``); at least one row."""
    from datasets import load_dataset

    path = Path(source).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in _FILE_FORMATS) if path.is_dir() else [path]
        kinds = {_FILE_FORMATS.get(p.suffix) for p in files}
        if not files or None in kinds or len(kinds) != 1:
            raise ValueError(f"data={source!r}: give .json, .jsonl or .parquet files (one format), got "
                             f"{sorted({p.suffix for p in files}) or 'no files'}")
        rows = list(load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train"))
    else:
        rows = list(load_dataset(source, dataset_config, split=split))
    if not rows:
        raise ValueError(f"data={source!r} (split {split!r}) has no rows")
    return rows


def load_instruction_rows(source: str, *, split: str = "train", dataset_config: str | None = None) -> list[dict]:
    """The rows of ``source`` (see the module docstring), checked for ``messages`` or ``prompt``/``completion``."""
    if source == BUILTIN_DIALOGUE:
        rows = _dialogue(split)
    elif source.startswith("builtin:"):
        raise ValueError(f"unknown built-in instruction data {source!r}; valid: [{BUILTIN_DIALOGUE!r}]")
    else:
        rows = read_rows(source, split=split, dataset_config=dataset_config)
    columns = set(rows[0])
    if "messages" not in columns and not {"prompt", "completion"} <= columns:
        raise ValueError(f"data={source!r} has the columns {sorted(columns)}: instruction data needs a 'messages' "
                         "column (chat) or 'prompt' and 'completion' columns")
    return rows


def _template_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=False)
    return list(ids)


def encode_example(row: dict[str, Any], tokenizer: Any, *, format: str = "auto") -> InstructionExample:
    """``(prompt ids, completion ids)`` of one row (see the module docstring)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got format={format!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    messages = row.get("messages")
    if messages is None:
        if format == "plain" or (format == "auto" and not has_template):
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            return InstructionExample(list(prompt), list(completion) + [tokenizer.eos_token_id])
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    elif format == "plain":
        raise ValueError("format='plain' needs prompt/completion rows; these rows hold 'messages' (use chat or auto)")
    if not has_template:
        raise ValueError("chat rows need a tokenizer with a chat template, and this tokenizer has none: give "
                         "prompt/completion rows with format='plain', or a tokenizer that has a template")
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError(f"the last message must be the assistant's answer, got role="
                         f"{(messages[-1].get('role') if messages else None)!r}")
    prompt = _template_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    full = _template_ids(tokenizer, messages, add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template renders the conversation without its generation prompt as a prefix, so "
                         "prompt and answer cannot be separated")
    return InstructionExample(prompt, full[len(prompt) :])


def encode_examples(rows: list[dict], tokenizer: Any, *, max_length: int, format: str = "auto",
                    ) -> tuple[list[InstructionExample], int]:
    """Encoded rows that fit ``max_length`` (a long completion is cut at it) and how many were dropped (their prompt
    alone leaves no room for an answer token)."""
    kept, dropped = [], 0
    for row in rows:
        example = encode_example(row, tokenizer, format=format)
        room = max_length - len(example.prompt)
        if room < 1:
            dropped += 1
            continue
        kept.append(InstructionExample(example.prompt, example.completion[:room]))
    return kept, dropped


def collate(examples: list[InstructionExample], *, eos_id: int, pad_with_eos: bool, max_length: int | None = None,
            ) -> InstructionBatch:
    """Right-pad to the longest example (or ``max_length`` with ``pad_with_eos``, as LLaDA's fixed-length SFT)."""
    lengths = [len(e.prompt) + len(e.completion) for e in examples]
    width = max_length if (pad_with_eos and max_length is not None) else max(lengths)
    sequences = torch.full((len(examples), width), eos_id, dtype=torch.long)
    completion = torch.zeros(len(examples), width, dtype=torch.bool)
    real = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, e in enumerate(examples):
        sequences[i, : lengths[i]] = torch.tensor(e.prompt + e.completion, dtype=torch.long)
        completion[i, len(e.prompt) : (width if pad_with_eos else lengths[i])] = True
        real[i, : lengths[i]] = True
    if pad_with_eos:
        return InstructionBatch(sequences, completion, None)
    return InstructionBatch(sequences, completion, None if bool(real.all()) else real.long())
