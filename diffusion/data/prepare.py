"""Tokenize and pack a corpus once (``ddlm-prepare``); training then reads memory-mapped blocks.

A prepared folder holds, for the ``train`` and ``validation`` splits, ``<split>.tokens``: the packed blocks as
raw little-endian int32, ``num_blocks x seq_len`` of them, exactly what :func:`~diffusion.data.build_blocks`
gives for the same documents, tokenizer and length; ``prepared.json`` records the length, the counts, the
source and the tokenizer's fingerprint, and ``tokenizer/`` the tokenizer itself.  Documents are tokenized
in parallel by ``datasets.map(num_proc=...)`` and packed in their order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .loading import load_texts
from .packing import pack

__all__ = ["MARKER", "is_prepared", "load_prepared", "prepare_dataset", "tokenizer_fingerprint"]

MARKER = "prepared.json"
FORMAT = "ddlm-prepared-v1"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of what decides the token ids: the vocabulary, merges and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([len(tokenizer), tokenizer.eos_token_id, tokenizer.mask_token_id])
    return hashlib.sha256((body + extra).encode()).hexdigest()[:16]


def is_prepared(path: str | Path) -> bool:
    return (Path(path).expanduser() / MARKER).is_file()


def _write_blocks(texts: list[str], tokenizer: Any, seq_len: int, path: Path, num_proc: int) -> int:
    """Tokenize with ``datasets.map`` and write the packed blocks to ``path``; returns the number of blocks."""
    from datasets import Dataset

    docs = Dataset.from_dict({"text": list(texts)})
    ids = docs.map(lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
                   batched=True, num_proc=num_proc if len(docs) >= num_proc > 1 else None, remove_columns=["text"],
                   desc=f"tokenize {path.stem}")
    count = 0
    with path.open("wb") as f:
        for block in pack((row["ids"] for row in ids), seq_len, tokenizer.eos_token_id):
            f.write(np.asarray(block, dtype="<i4").tobytes())
            count += 1
    if count == 0:
        raise ValueError(f"the {path.stem} split holds fewer than seq_len={seq_len} tokens")
    return count


def prepare_dataset(output_dir: str | Path, *, dataset: str, tokenizer: Any, seq_len: int,
                    dataset_config: str | None = None, text_column: str = "text", valid_fraction: float = 0.02,
                    seed: int = 0, num_proc: int = 1) -> Path:
    """Tokenize and pack ``dataset`` into ``output_dir`` (see the module docstring); returns the folder."""
    from ..training.checkpoint import atomic_directory, write_json

    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got seq_len={seq_len}")
    if num_proc < 1:
        raise ValueError(f"num_proc must be >= 1, got num_proc={num_proc}")
    texts = load_texts(dataset, dataset_config=dataset_config, text_column=text_column,
                       valid_fraction=valid_fraction, seed=seed)
    target = Path(output_dir).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(target, complete=False) as tmp:
        counts = {split: _write_blocks(texts[split], tokenizer, seq_len, tmp / f"{split}.tokens", num_proc)
                  for split in ("train", "validation")}
        tokenizer.save_pretrained(tmp / "tokenizer")
        write_json(tmp / MARKER, {
            "format": FORMAT, "seq_len": seq_len, "num_blocks": counts, "dtype": "int32",
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
            "dataset": dataset, "dataset_config": dataset_config, "text_column": text_column,
            "valid_fraction": valid_fraction, "seed": seed,
        })
    return target


def load_prepared(path: str | Path, *, tokenizer: Any, seq_len: int) -> dict[str, Tensor]:
    """``{"train": [n, L], "validation": [m, L]}`` memory-mapped blocks of a prepared folder.

    Raises ``ValueError`` (naming both values) when the folder was made with another tokenizer or length.
    """
    folder = Path(path).expanduser()
    meta = json.loads((folder / MARKER).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(folder)!r} is not a prepared dataset this version reads (format {meta.get('format')!r})")
    if meta["seq_len"] != seq_len:
        raise ValueError(f"prepared dataset {str(folder)!r} holds blocks of seq_len={meta['seq_len']}, the run asks "
                         f"for seq_len={seq_len}: prepare it again with --seq-len {seq_len}")
    fingerprint = tokenizer_fingerprint(tokenizer)
    if meta["tokenizer_fingerprint"] != fingerprint:
        raise ValueError(f"prepared dataset {str(folder)!r} was tokenized with another tokenizer (fingerprint "
                         f"{meta['tokenizer_fingerprint']}, {meta['vocab_size']} tokens) than the run's ({fingerprint}, "
                         f"{len(tokenizer)} tokens): pass --tokenizer {str(folder / 'tokenizer')!r} or prepare it again")
    splits = {}
    for split in ("train", "validation"):
        data = np.memmap(folder / f"{split}.tokens", dtype="<i4", mode="c")
        expected = meta["num_blocks"][split] * seq_len
        if data.size != expected:
            raise ValueError(f"{str(folder / (split + '.tokens'))!r} holds {data.size} tokens, prepared.json says "
                             f"{expected}: the folder is damaged; prepare it again")
        splits[split] = torch.from_numpy(data.reshape(-1, seq_len))
    return splits
