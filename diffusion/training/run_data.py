"""The data of one training run: its tokenizer, where each step's global batch comes from, the held-out blocks.

Three sources, one interface (:meth:`RunData.global_batch`):

- in memory: documents tokenized and packed at start (:class:`~diffusion.data.BlockBatches`);
- prepared: the memory-mapped blocks of a ``ddlm-prepare`` folder, nothing tokenized (same class);
- streaming: :class:`~diffusion.data.StreamingBlockBatches`, each rank packing its own shards of the stream; the
  ranks' rows are gathered so that every rank sees the global batch (and draws the same noise for it).

The data position a checkpoint stores: blocks consumed (in memory, prepared) or blocks per stream shard.
"""

from __future__ import annotations

import itertools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data import BlockBatches, StreamingBlockBatches, build_blocks, load_texts, load_tokenizer
from ..data.loading import load_split
from ..data.prepare import is_prepared, load_prepared
from ..data.split_record import make_record
from ..data.tokenizer import parse_trained_vocab, train_tokenizer
from .config import TrainConfig

__all__ = ["RunData", "load_run_data"]


@dataclass
class RunData:
    tokenizer: Any
    batches: Any
    valid_blocks: Tensor
    streaming: bool = False
    accum_steps: int = 1
    split_record: dict[str, Any] | None = None  # what the run trained on and held out (data_split.json)

    def global_batch(self, position: int, size: int, accelerator: Any) -> Tensor:
        """The ``size`` blocks of one optimizer step starting at ``position`` (blocks consumed so far)."""
        if not self.streaming:
            return self.batches.batch_at(position, size)
        world = accelerator.num_processes
        local = self.batches.local_rows(size // world)  # (accum * micro, L): this rank's rows, micro-batch by micro
        if world == 1:
            return local
        gathered = accelerator.gather(local.to(accelerator.device)).cpu()  # (world * accum * micro, L), rank-major
        micro_rows = size // world // self.accum_steps
        chunks = gathered.view(world, self.accum_steps, micro_rows, -1).transpose(0, 1)
        return chunks.reshape(size, -1)  # micro-step m, rank r -> rows (m * world + r) * micro

    def stream_positions(self, accelerator: Any) -> list[int] | None:
        """Every stream shard's position, combined from the ranks that own them (every rank must call it)."""
        if not self.streaming:
            return None
        mine = torch.zeros(len(self.batches.positions), dtype=torch.long)
        for shard in self.batches.owned:
            mine[shard] = self.batches.positions[shard]
        if accelerator.num_processes > 1:
            mine = accelerator.reduce(mine.to(accelerator.device), reduction="sum").cpu()
        return mine.tolist()


def _trained_tokenizer(config: TrainConfig, accelerator: Any, documents: Any, vocab_size: int) -> Any:
    """``train:N``: the main process trains the BPE on the training documents and saves it as
    ``output_dir/tokenizer`` (written aside, then renamed); the other ranks load that copy."""
    folder = Path(config.output_dir) / "tokenizer"
    with accelerator.main_process_first():
        if not accelerator.is_main_process:
            return load_tokenizer(str(folder))
        tokenizer = train_tokenizer(documents, vocab_size)
        tmp = folder.with_name(".tokenizer-tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        return tokenizer


def load_run_data(config: TrainConfig, accelerator: Any, stream_positions: list[int] | None = None,
                  tokenizer: Any = None) -> RunData:
    """Tokenizer, batches and held-out blocks as ``config`` says (the main process reads a Hub dataset first).

    ``tokenizer``: the one to use instead of ``config``'s (the tokenizer of an ``init_from`` model, or the one a
    resumed run trained).  A ``train:N`` tokenizer is trained here on the training documents only."""
    trained_vocab = parse_trained_vocab(config.resolved_tokenizer)
    if tokenizer is None and trained_vocab is None:
        tokenizer = load_tokenizer(config.resolved_tokenizer, trust_remote_code=config.trust_remote_code)
    if is_prepared(config.dataset):
        splits = load_prepared(config.dataset, tokenizer=tokenizer, seq_len=config.seq_len)
        return RunData(tokenizer, BlockBatches(splits["train"], seed=config.seed),
                       splits["validation"][: config.eval_blocks].long(), accum_steps=config.grad_accum_steps)
    with accelerator.main_process_first():
        split = load_split(config.dataset, dataset_config=config.dataset_config, text_column=config.text_column,
                           valid_fraction=config.valid_fraction, seed=config.seed, streaming=config.streaming,
                           text_split=config.text_split, encoding=config.encoding)
    record = make_record(split, dataset=config.dataset, dataset_config=config.dataset_config,
                         text_column=config.text_column, valid_fraction=config.valid_fraction, seed=config.seed,
                         text_split=config.text_split, encoding=config.encoding)
    if split.held_out_ids is not None:
        accelerator.print(f"data: {config.dataset}: {len(split.train) + len(split.validation):,} documents, held out "
                          f"{len(split.validation):,} ({split.rule}"
                          + (f"; .txt split by {config.text_split}" if record.get("text_split") else "") + ")")
    texts = {"train": split.train, "validation": split.validation}
    if tokenizer is None:
        tokenizer = _trained_tokenizer(config, accelerator, split.train, trained_vocab)
    if not config.streaming:
        source = f"dataset={config.dataset!r}"
        batches = BlockBatches(build_blocks(texts["train"], tokenizer, config.seq_len, f"the training split of {source}"),
                               seed=config.seed)
        held_out = f"the held-out split of {source}" + (
            f" (valid_fraction={config.valid_fraction}: raise it to hold out more)" if split.held_out_ids else "")
        valid_blocks = build_blocks(texts["validation"], tokenizer, config.seq_len, held_out)[: config.eval_blocks]
        return RunData(tokenizer, batches, valid_blocks, accum_steps=config.grad_accum_steps, split_record=record)

    def make_stream() -> Any:
        return load_texts(config.dataset, dataset_config=config.dataset_config, text_column=config.text_column,
                          seed=config.seed, streaming=True)["train"]

    if accelerator.num_processes > config.stream_shards:
        raise ValueError(f"stream_shards={config.stream_shards} is fewer than the {accelerator.num_processes} "
                         "processes: every rank needs a shard of the stream")
    batches = StreamingBlockBatches(make_stream, tokenizer, config.seq_len, text_column=config.text_column,
                                    num_shards=config.stream_shards, rank=accelerator.process_index,
                                    world_size=accelerator.num_processes, positions=stream_positions)
    valid_texts = (row[config.text_column] for row in itertools.islice(texts["validation"], 10 * config.eval_blocks))
    valid_blocks = build_blocks(valid_texts, tokenizer, config.seq_len)[: config.eval_blocks]
    return RunData(tokenizer, batches, valid_blocks, streaming=True, accum_steps=config.grad_accum_steps,
                   split_record=record)
