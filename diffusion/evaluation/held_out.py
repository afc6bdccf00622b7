"""What an evaluation scores: the blocks of the right documents, and a line that says which they are.

A model trained by ``ddlm-train`` carries its data record (``data_split.json``, :mod:`diffusion.data.split_record`);
with no data set named, the run's own held-out documents are scored, found again by the recorded source, rule,
seed and fraction.  A data set named explicitly is scored whole, or by the split asked for, and documents it
shares with the run's training split are counted and warned about.

Documents are tokenized, each followed by EOS, and packed into blocks of ``L`` tokens (the training packing); when
more blocks exist than are asked for, an evenly spaced subset is scored (block ``floor(k n / m)`` for
``k < m``), so the score spans every document rather than the first ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..data.loading import load_documents, load_split, source_name
from ..data.packing import pack, tokenize_documents
from ..data.split_record import document_hash, read_record, reload_split

__all__ = ["SPLITS", "EvalData", "bits_per_byte", "evaluation_data", "scored_bytes", "spread_blocks"]

SPLITS = ("all", "train", "validation")


@dataclass(frozen=True)
class EvalData:
    """Blocks ``[N, L]`` to score and what they are."""

    blocks: Tensor
    description: str  # the data in words: source, split, documents
    document_ids: list[int] | None  # ids of the documents scored (the run's held-out split), when known
    num_documents: int  # documents the blocks were packed from
    documents_scored: int  # documents with at least one token in a scored block
    blocks_available: int
    warnings: list[str] = field(default_factory=list)


def spread_blocks(num_blocks: int, max_blocks: int) -> Tensor:
    """Indices of ``min(n, m)`` evenly spaced blocks of ``n``: ``floor(k n / m)`` for ``k = 0 .. m - 1``."""
    if max_blocks >= num_blocks:
        return torch.arange(num_blocks)
    return torch.arange(max_blocks) * num_blocks // max_blocks


def bits_per_byte(nats_per_token: float, num_tokens: int, num_bytes: int) -> float:
    """``(nats/token) * tokens / (bytes * ln 2)``: the same loss per UTF-8 byte, in bits, comparable across
    tokenizers (which cut the same text into different numbers of tokens)."""
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be positive, got num_bytes={num_bytes}")
    return nats_per_token * num_tokens / (num_bytes * math.log(2))


def scored_bytes(blocks: Tensor, tokenizer: Any, *, skip_first: bool = False) -> tuple[int, int]:
    """``(tokens, UTF-8 bytes)`` of the scored positions of ``blocks`` ``[N, L]``: all of them, or all but the
    first of each block (``skip_first``: a causal LM scores ``L - 1``).  Special tokens (EOS) count as tokens and
    as no bytes.  Each block is decoded whole, without clean-up of spaces; a character whose bytes a block
    boundary splits is decoded as a replacement character (3 bytes) on each side, an error of a few bytes per
    block at most."""
    rows = blocks[:, 1:] if skip_first else blocks
    num_bytes = sum(len(tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                        .encode("utf-8")) for row in rows.tolist())
    return rows.numel(), num_bytes


def _pack_and_cover(docs: list[str], tokenizer: Any, seq_len: int, max_blocks: int) -> tuple[Tensor, int, int]:
    """(chosen blocks, blocks available, documents with a token of their own text in a chosen block)."""
    token_lists = list(tokenize_documents(docs, tokenizer))
    blocks = list(pack(token_lists, seq_len, tokenizer.eos_token_id))
    if not blocks:
        raise ValueError(f"the data hold fewer than {seq_len} tokens (one block): nothing to score")
    chosen = spread_blocks(len(blocks), max_blocks)
    lengths = torch.tensor([len(t) for t in token_lists])
    ends = (lengths + 1).cumsum(0)  # document i's text is [ends[i] - 1 - len_i, ends[i] - 1), then its EOS
    text_starts, text_ends = ends - 1 - lengths, ends - 1
    touched = torch.zeros(len(docs) + 1, dtype=torch.long)
    for block in chosen.tolist():  # documents overlapping [first, last) form one run: [lo, hi)
        first, last = block * seq_len, (block + 1) * seq_len
        lo = int(torch.searchsorted(text_ends, first, right=True))  # first document whose text ends after first
        hi = int(torch.searchsorted(text_starts, last))  # documents starting before last
        if lo < hi:
            touched[lo] += 1
            touched[hi] -= 1
    covered = (touched.cumsum(0)[:-1] > 0) & (lengths > 0)
    return torch.tensor(blocks, dtype=torch.long)[chosen], len(blocks), int(covered.sum())


def evaluation_data(model: str, tokenizer: Any, seq_len: int, max_blocks: int, *, dataset: str | None = None,
                    split: str = "all", dataset_config: str | None = None, text_column: str = "text",
                    valid_fraction: float | None = None, split_seed: int | None = None,
                    text_split: str | None = None, encoding: str | None = None) -> EvalData:
    """The blocks to score for ``model`` (a folder or Hub id) and a description of them.

    ``dataset=None``: the run's held-out documents (its ``data_split.json``; a ValueError when it has none).
    Otherwise ``dataset`` (as ``ddlm-train --dataset``), its ``split``: ``all`` (every document, one is enough),
    ``train`` or ``validation`` (a source without a validation split is divided by ``valid_fraction`` and
    ``split_seed``: the run's own when ``dataset`` is the run's data, else 0.02 and 0).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got split={split!r}")
    record = read_record(model)
    warnings: list[str] = []
    if dataset is None:
        if record is None:
            raise ValueError(f"--model {model!r} has no record of its data (data_split.json, written by ddlm-train): "
                             "pass --dataset to say what to score")
        run_split = reload_split(record)
        docs, ids = list(run_split.validation), list(record["held_out_ids"])
        what = (f"the run's held-out split of {record['dataset']} ({record['rule']}, seed {record['seed']}, "
                f"fraction {record['valid_fraction']})")
    else:
        runs_data = record is not None and record["dataset"] == source_name(dataset)
        run_text = record if runs_data else {}  # .txt rules: the run's own for its own data
        text = {"text_split": text_split or run_text.get("text_split", "paragraph"),
                "encoding": encoding or run_text.get("encoding", "utf-8")}
        ids = None
        if split == "all":
            docs = load_documents(dataset, dataset_config=dataset_config, text_column=text_column, **text)
        else:
            fraction = valid_fraction if valid_fraction is not None else (
                record["valid_fraction"] if runs_data else 0.02)
            seed = split_seed if split_seed is not None else (record["seed"] if runs_data else 0)
            source = load_split(dataset, dataset_config=dataset_config, text_column=text_column,
                                valid_fraction=fraction, seed=seed, **text)
            docs = list(source.train) if split == "train" else list(source.validation)
            if split == "validation" and source.held_out_ids is not None:
                ids = list(source.held_out_ids)
        what = f"{dataset}, split {split}"
        if record is not None and record.get("held_out_ids") is not None:
            try:
                trained = {document_hash(d) for d in reload_split(record).train}
            except (ValueError, FileNotFoundError) as err:  # the run's data moved or changed: say so, score anyway
                trained = set()
                warnings.append(f"overlap with the run's training documents not checked: {err}")
            overlap = sum(document_hash(d) in trained for d in docs)
            if overlap:
                warnings.append(f"{overlap} of the {len(docs)} documents scored are training documents of this run "
                                f"({record['dataset']}): the score is not a held-out one")
    blocks, available, touched = _pack_and_cover(docs, tokenizer, seq_len, max_blocks)
    if len(blocks) < available:
        warnings.append(f"{available - len(blocks)} of the {available} blocks are not scored (--max-blocks "
                        f"{max_blocks}; the {len(blocks)} scored are spread evenly over the documents)")
    if touched < len(docs):
        warnings.append(f"{len(docs) - touched} of the {len(docs)} documents have no token in a scored block")
    description = (f"{what}: {len(docs)} documents, {len(blocks)} of {available} blocks of {seq_len} tokens")
    return EvalData(blocks=blocks, description=description, document_ids=ids, num_documents=len(docs),
                    documents_scored=touched, blocks_available=available, warnings=warnings)
