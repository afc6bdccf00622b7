"""What a training run leaves on disk and how it stops: ``metrics.jsonl``, ``train_config.json``, atomic
checkpoints (with the run's id in every file), the final ``from_pretrained`` folder, and the signals
(SIGTERM, Ctrl-C) that end a run cleanly.  :mod:`diffusion.training.loop` drives them step by step.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..adapters import DiffusionLMAdapter
from ..data.split_record import write_record
from ..evaluation.held_out import bits_per_byte
from .checkpoint import (
    atomic_directory,
    checkpoint_name,
    find_latest_checkpoint,
    new_run_id,
    prune_checkpoints,
    refuse_nonfinite_weights,
    save_train_state,
    save_weights,
    write_json,
)
from .config import TrainConfig
from .distributed import full_state
from .run_data import RunData

if TYPE_CHECKING:
    from .loop import _State

__all__ = ["Preemption", "RunOutput", "consolidated", "export_final", "log_eval", "save_model_folder",
           "shared_run_id", "stop_diverged"]


def consolidated(state: _State) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """Whole weights and EMA weights (every rank must call it: FSDP gathers the shards)."""
    model_state = full_state(state.model.state_dict()) if state.mode == "fsdp" else None
    ema_state = (full_state(state.ema.shadow) if state.mode == "fsdp" else state.ema.state_dict()) \
        if state.ema is not None else None
    if ema_state is not None:  # EMA shadows the parameters only: the persistent buffers go with them as they are
        ema_state = {**persistent_buffers(state.model), **ema_state}
    return model_state, ema_state


def persistent_buffers(model: torch.nn.Module) -> dict[str, Tensor]:
    """The buffers a model's ``state_dict`` holds (a bridge model's data marginal, say), by state-dict name."""
    found = {}
    for prefix, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                found[f"{prefix}.{name}" if prefix else name] = buffer.detach()
    return found


def save_model_folder(folder: Path, state: _State, weights: dict[str, Tensor] | None) -> None:
    """A ``from_pretrained`` folder of ``weights`` (None: the model's own, unsharded weights).

    A converted causal LM writes its own architecture's folder plus its conversion record."""
    model = state.model
    if isinstance(model, DiffusionLMAdapter) or (weights is None and state.mode != "fsdp"):
        model.save_pretrained(folder, state_dict=weights, safe_serialization=True)
        return
    from torch.distributed.fsdp import FSDPModule
    from transformers import PreTrainedModel

    cls = next(c for c in type(model).__mro__ if issubclass(c, PreTrainedModel) and not issubclass(c, FSDPModule))
    with torch.random.fork_rng(devices=[]):  # building a model draws initial weights: keep the run's RNG stream
        whole = cls(model.config)
    whole.load_state_dict(weights, strict=False)  # tied targets follow their source
    whole.save_pretrained(folder, safe_serialization=True)


class Preemption:
    """Turns SIGTERM (a scheduler's pre-emption notice) and a first Ctrl-C (SIGINT) into a flag the loop checks
    once per step: the step finishes, a checkpoint is written, the run says how to resume.

    A second Ctrl-C stops the process at once (exit 130) with one line naming the last complete checkpoint.  It
    may land inside a checkpoint write, whose folder is then never marked complete (checkpoints are atomic), and
    the run folder's lock is left to be found stale.  Only the main thread can install handlers; elsewhere this
    does nothing.  With several ranks the flag is combined across them, so every rank stops after the same step.
    """

    def __init__(self, ckpt_root: Path) -> None:
        self.flag, self.signal_name, self.previous, self.ckpt_root = False, "SIGTERM", {}, ckpt_root
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        main = os.environ.get("RANK", "0") == "0"
        # The messages go straight to file descriptor 2: a second Ctrl-C can run this handler in the middle of
        # another write to sys.stderr, whose buffer is then locked (a reentrant print raises).
        if signum == signal.SIGINT and self.flag:  # the second Ctrl-C
            try:
                if main:
                    latest = find_latest_checkpoint(self.ckpt_root)
                    os.write(2, (f"\nddlm-train: stopped by Ctrl-C; the last complete checkpoint is {latest} "
                                 f"({'continue with --resume auto' if latest else 'none was written: start again'})"
                                 f"\n").encode())
            finally:
                os._exit(130)
        self.flag, self.signal_name = True, signal.Signals(signum).name
        if signum == signal.SIGINT and main:
            os.write(2, b"\nddlm-train: Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to stop "
                        b"at once)\n")

    def requested(self, acc: Any) -> bool:
        if acc.num_processes == 1:
            return self.flag
        flag = torch.tensor(float(self.flag), device=acc.device)
        return acc.reduce(flag, reduction="sum").item() > 0

    def restore(self) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.previous = {}


class RunOutput:
    """The run's folder: ``metrics.jsonl``, ``train_config.json``, ``checkpoints/`` and ``final/``."""

    def __init__(self, config: TrainConfig, accelerator: Any, run_id: str) -> None:
        self.config, self.acc, self.run_id = config, accelerator, run_id
        self.root = Path(config.output_dir)
        self.ckpt_root = self.root / "checkpoints"
        self.metrics_path = self.root / "metrics.jsonl"

    def write_config(self) -> None:
        if self.acc.is_main_process:
            write_json(self.root / "train_config.json", self.config.to_dict())

    def log(self, record: dict[str, Any]) -> None:
        if self.acc.is_main_process:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.config.report_to != "none":
                self.acc.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def save(self, state: _State, tokenizer: Any, data: RunData) -> Path:
        """Write ``checkpoints/step-N`` atomically; a failed write leaves the previous checkpoint intact."""
        acc = self.acc
        refuse_nonfinite_weights(state.model, state.step, self.ckpt_root, acc)
        final = self.ckpt_root / checkpoint_name(state.step)
        try:
            with atomic_directory(final, complete=True, barrier=acc.wait_for_everyone,
                                  is_main=acc.is_main_process, run_id=self.run_id) as tmp:
                self._write(tmp, state, tokenizer, data)
        except OSError as err:  # disk full, read-only file system
            previous = find_latest_checkpoint(self.ckpt_root)
            raise OSError(err.errno, f"could not write checkpoint {final.name} in {self.ckpt_root} "
                          f"({err.strerror or err}); the previous checkpoint {previous} is intact") from err
        if acc.is_main_process:
            prune_checkpoints(self.ckpt_root, self.config.keep_last)
        return final

    def _write(self, tmp: Path, state: _State, tokenizer: Any, data: RunData) -> None:
        """Every rank: its RNG state, its shards of the train state; the main process: the whole weights."""
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        save_weights(rng, tmp / f"rng-{self.acc.process_index}.safetensors", metadata={"run_id": self.run_id})
        save_train_state(tmp, state.model, state.optimizer, state.ema, is_main=self.acc.is_main_process,
                         run_id=self.run_id)
        model_state, ema_state = consolidated(state)
        positions = data.stream_positions(self.acc)
        if not self.acc.is_main_process:
            return
        save_model_folder(tmp / "model", state, model_state)
        if ema_state is not None:
            save_model_folder(tmp / "ema", state, ema_state)
        tokenizer.save_pretrained(tmp / "tokenizer")
        counters = {**state.counters, "stream_positions": positions}
        write_json(tmp / "trainer_state.json", {
            "step": state.step, "run_id": self.run_id, "scheduler": state.scheduler.state_dict(),
            "config": self.config.to_dict(),
            "num_processes": self.acc.num_processes, "distributed": state.mode,
            "ema_updates": state.ema.num_updates if state.ema else 0, **counters,
        })


def export_final(run: RunOutput, state: _State, data: RunData) -> Path:
    """``output_dir/final``: the EMA weights (or raw weights), the tokenizer and the data record
    (``data_split.json``), loadable with from_pretrained."""
    final = run.root / "final"
    acc = run.acc
    refuse_nonfinite_weights(state.model, state.step, run.ckpt_root, acc)
    model_state, ema_state = consolidated(state)
    with atomic_directory(final, complete=True, barrier=acc.wait_for_everyone, is_main=acc.is_main_process) as tmp:
        if acc.is_main_process:
            save_model_folder(tmp, state, ema_state if ema_state is not None else model_state)
            data.tokenizer.save_pretrained(tmp)
            if data.split_record is not None:
                write_record(tmp, data.split_record)
    return final


def stop_diverged(run: RunOutput, consecutive: int, done: int) -> FloatingPointError:
    latest = find_latest_checkpoint(run.ckpt_root)
    return FloatingPointError(
        f"{consecutive} consecutive steps had a non-finite loss or gradient norm (the last at step {done}); "
        f"nothing was updated by them. Look at the loss and grad_norm before step {done - consecutive + 1} in "
        f"{run.metrics_path}; the last good checkpoint is {latest}. Lower --lr, raise --warmup-steps or use "
        "--precision no, then --resume from it."
    )


def log_eval(run: RunOutput, step: int, loss: float, config: TrainConfig,
             tokens_and_bytes: tuple[int, int] | None = None) -> None:
    """Record and print a held-out loss; with ``tokens_and_bytes`` (the scored tokens of the held-out blocks and
    their UTF-8 bytes, :func:`~diffusion.evaluation.held_out.scored_bytes`) also in bits per byte, which compares
    across tokenizers."""
    record = {"step": step, "eval_loss": loss, "eval_ppl_bound": math.exp(min(loss, 50.0))}
    label = "perplexity" if config.objective == "autoregressive" else "perplexity bound"
    per_byte = ""
    if tokens_and_bytes is not None:
        record["eval_bits_per_byte"] = bits_per_byte(loss, *tokens_and_bytes)
        per_byte = f", {record['eval_bits_per_byte']:.3f} bits/byte"
    run.log(record)
    run.acc.print(f"\nstep {step}: held-out loss {loss:.4f} nats/token ({label} {math.exp(min(loss, 50)):.1f}"
                  f"{per_byte})")


def shared_run_id(acc: Any) -> str:
    """A fresh run id, the main process's on every rank."""
    value = torch.tensor(int(new_run_id(), 16) >> 1 if acc.is_main_process else 0, dtype=torch.int64,
                         device=acc.device)  # 63 bits: a positive int64
    if acc.num_processes > 1:
        value = acc.reduce(value, reduction="sum")
    return f"{int(value.item()):016x}"
