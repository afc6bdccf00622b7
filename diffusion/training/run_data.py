"""The data of one training run: its tokenizer, the training batches and the held-out blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..data import BlockBatches, StreamingBlockBatches, build_blocks, load_texts, load_tokenizer
from .config import TrainConfig

__all__ = ["RunData", "load_run_data"]


@dataclass(frozen=True)
class RunData:
    """``batches.batch(step, size)`` gives the global batch of a step; ``valid_blocks [n, seq_len]`` the held-out set."""

    tokenizer: Any
    batches: Any
    valid_blocks: Tensor


def load_run_data(config: TrainConfig, accelerator: Any) -> RunData:
    """Tokenizer, batches and held-out blocks as ``config`` says (the main process reads a Hub dataset first)."""
    tokenizer = load_tokenizer(config.tokenizer)
    with accelerator.main_process_first():
        texts = load_texts(config.dataset, dataset_config=config.dataset_config, text_column=config.text_column,
                           valid_fraction=config.valid_fraction, seed=config.seed, streaming=config.streaming)
    if config.streaming:
        def make_texts() -> Any:
            return load_texts(config.dataset, dataset_config=config.dataset_config, text_column=config.text_column,
                              seed=config.seed, streaming=True)["train"]

        batches: Any = StreamingBlockBatches(make_texts, tokenizer, config.seq_len)
        valid_texts = (text for _, text in zip(range(10 * config.eval_blocks), texts["validation"]))
    else:
        batches = BlockBatches(build_blocks(texts["train"], tokenizer, config.seq_len), seed=config.seed)
        valid_texts = texts["validation"]
    valid_blocks = build_blocks(valid_texts, tokenizer, config.seq_len)[: config.eval_blocks]
    return RunData(tokenizer, batches, valid_blocks)
