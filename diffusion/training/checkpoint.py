"""Atomic, pickle-free training checkpoints.

Layout of ``<root>/step-00000500/``::

    model/            config.json + model.safetensors (the trained weights, whole; loadable with from_pretrained)
    ema/              the same for the EMA weights (when EMA is on)
    tokenizer/        the tokenizer the run used
    state/            weights, optimizer and EMA state as safetensors shards (torch.distributed.checkpoint),
    optimizer.json    and the optimizer's param groups: what a resume loads, at any number of processes
    rng-<rank>.safetensors                    (torch CPU and CUDA generator states of every rank)
    trainer_state.json                        (step, LR-scheduler state, train config, counters, data position)
    COMPLETE                                  (written last)

Every file a run writes into a checkpoint records the run's id (``COMPLETE``, ``trainer_state.json``,
``optimizer.json`` and the metadata of each ``rng-*.safetensors``); :func:`checkpoint_run_id` refuses a
checkpoint whose files name different runs, so a folder two runs wrote into can never be resumed.

A checkpoint is written under a temporary name and renamed into place, so a crash never leaves a
half-written ``step-*`` folder; :func:`find_latest_checkpoint` also requires the ``COMPLETE`` marker and
reports any folder without it.  Nothing is ever unpickled: tensors go through safetensors and
everything else through JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "apply_umask",
    "atomic_directory",
    "check_resumable",
    "checkpoint_name",
    "checkpoint_run_id",
    "find_latest_checkpoint",
    "is_complete",
    "load_tensors",
    "load_train_state",
    "load_weights",
    "mark_complete",
    "new_run_id",
    "optimizer_from_files",
    "optimizer_to_files",
    "prune_checkpoints",
    "read_json",
    "refuse_nonfinite_weights",
    "save_train_state",
    "save_weights",
    "write_json",
]

logger = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step-(\d+)$")
COMPLETE = "COMPLETE"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the run."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything below it) the modes a plain ``open()`` would:
    ``0o666 & ~umask`` for files, ``0o777 & ~umask`` for folders.

    safetensors writes its files 0600 (private to their owner) while every other file of a folder gets the
    process umask; a model folder shared with a group would then be unreadable by the group.
    """
    mask = _umask()
    paths = [path] if path.is_file() else [path, *path.rglob("*")]
    for item in paths:
        if item.is_symlink():
            continue
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def find_latest_checkpoint(root: Path) -> Path | None:
    """The newest complete ``step-*`` folder under ``root`` (None if there is none).

    Incomplete folders (no ``COMPLETE`` marker) are logged as skipped, never used.
    """
    if not root.is_dir():
        return None
    candidates = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))),
        reverse=True,
    )
    for _, path in candidates:
        if is_complete(path):
            return path
        logger.warning("skipping incomplete checkpoint %s (no %s marker)", path, COMPLETE)
    return None


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints."""
    complete = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and is_complete(p)
    )
    for _, path in complete[: max(0, len(complete) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)


class atomic_directory:
    """Context manager: build a folder under a temporary name and rename it to ``target`` on success.

    On an exception the temporary folder is removed and ``target`` (if any) is left as it was.  With
    ``complete=True`` the ``COMPLETE`` marker is written last, just before the rename.

    Several processes can build one folder together: pass ``barrier`` (a callable every rank calls) and
    ``is_main``.  The main process creates and renames the folder; every rank writes into it between.
    """

    def __init__(self, target: Path, *, complete: bool = False, barrier: Any = None, is_main: bool = True,
                 run_id: str | None = None) -> None:
        self.target, self.complete, self.run_id = Path(target), complete, run_id
        self.barrier, self.is_main = barrier or (lambda: None), is_main
        # One process: a private name, so that two runs writing the same target never share a folder.
        private = "" if barrier is not None else f"-{os.getpid()}"
        self.tmp = self.target.parent / f".tmp-{self.target.name}{private}"

    def __enter__(self) -> Path:
        if self.is_main:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True)
        self.barrier()
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            if self.is_main:
                shutil.rmtree(self.tmp, ignore_errors=True)
            return
        self.barrier()
        if self.is_main:
            if self.complete:
                mark_complete(self.tmp, self.run_id)
            apply_umask(self.tmp)
            if self.target.exists():
                shutil.rmtree(self.target)
            os.replace(self.tmp, self.target)
        self.barrier()


def check_resumable(saved: dict[str, Any], current: dict[str, Any], may_change: Any, path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``current`` equals the checkpoint's ``saved`` config outside ``may_change``.

    The one rule both trainers resume by: every field that shapes the run must match; the error names
    each differing field with both values (``seq_len: checkpoint 32 vs run 48``).
    """
    diffs = [f"{key}: checkpoint {saved.get(key)!r} vs run {value!r}"
             for key, value in current.items() if key not in may_change and saved.get(key) != value]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was written by a different run configuration: " + "; ".join(diffs))


def mark_complete(path: Path, run_id: str | None = None) -> None:
    """Write the ``COMPLETE`` marker (holding ``run_id`` when the folder belongs to a run)."""
    (path / COMPLETE).write_text(f"run {run_id}\n" if run_id else "ok\n")


def refuse_nonfinite_weights(model: nn.Module, step: int, checkpoints: Path, accelerator: Any = None) -> None:
    """Raise FloatingPointError, before anything is written, when a weight of ``model`` holds NaN or infinity.

    Every rank calls it (with ``accelerator``, the verdict is shared: a shard's NaN stops every rank).  The message
    names the step and the newest complete checkpoint under ``checkpoints``, the one to resume from."""
    from ..weights import nonfinite_tensors

    bad = nonfinite_tensors(model.named_parameters())
    count = float(len(bad))
    if accelerator is not None and accelerator.num_processes > 1:
        count = accelerator.reduce(torch.tensor(count, device=accelerator.device), reduction="sum").item()
    if count > 0:
        where = f"e.g. {bad[0]}" if bad else "on another rank"
        raise FloatingPointError(
            f"the weights hold NaN or infinite values at step {step} ({where}): nothing was written; the last good "
            f"checkpoint is {find_latest_checkpoint(checkpoints)}. Lower --lr or use --precision no, then --resume "
            "from it.")


def new_run_id() -> str:
    """A fresh run's id: 16 random hex digits."""
    import uuid

    return uuid.uuid4().hex[:16]


def checkpoint_run_id(path: Path) -> str | None:
    """The id of the run that wrote checkpoint ``path``, after checking that every file of it names that run.

    Returns None for a checkpoint written before run ids were recorded (no file names one).

    Raises:
        CheckpointError: the files name different runs, or some name one and others none (a mixed folder).
    """
    marker = (path / COMPLETE).read_text().strip() if (path / COMPLETE).is_file() else ""
    found = {COMPLETE: marker[len("run "):] if marker.startswith("run ") else None,
             "trainer_state.json": read_json(path / "trainer_state.json").get("run_id"),
             "optimizer.json": read_json(path / "optimizer.json").get("run_id")}
    for rng in sorted(path.glob("rng-*.safetensors")):
        try:
            with safe_open(str(rng), framework="pt") as f:
                found[rng.name] = (f.metadata() or {}).get("run_id")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"corrupt safetensors file {rng}: {err}") from err
    ids = set(found.values())
    if ids == {None}:
        return None
    if len(ids) > 1:
        listing = ", ".join(f"{name}: {value or 'none'}" for name, value in found.items())
        raise CheckpointError(f"checkpoint {path} mixes the files of different runs ({listing}): it cannot be "
                              "resumed; resume from an earlier checkpoint with --resume PATH")
    return ids.pop()


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint file missing: {path}") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint file is not valid JSON: {path} ({err})") from err


def load_tensors(path: Path) -> dict[str, Tensor]:
    """Read a safetensors file, turning a missing or corrupt file into a :class:`CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"corrupt safetensors file {path}: {err}") from err


def save_weights(state: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors, with the file mode of the process umask (see :func:`apply_umask`)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path),
              metadata={"format": "pt", **(metadata or {})})
    apply_umask(Path(path))


def load_weights(model: nn.Module, path: Path, tied: dict[str, str] | None = None) -> None:
    """Load ``path`` (safetensors) into ``model`` strictly: every key must match in name and shape.

    ``tied`` maps parameters that may be absent because they share storage with another (target -> source).
    """
    state = load_tensors(path)
    expected = model.state_dict()
    tied = tied or {}
    missing = [k for k in expected if k not in state and k not in tied]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"weights in {path} do not fit the model: missing {missing}, unexpected {unexpected}, shape mismatches {wrong}"
        )
    model.load_state_dict(state, strict=False)  # the key sets were checked above; tied targets follow their source


def _flat_train_state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: Any) -> tuple[dict[str, Tensor], list]:
    """The tensors of a run's state, flat (``model.*``, ``optim.<param>.<key>``, ``ema.*``), and the optimizer's
    param groups.  Sharded (FSDP) or whole, as the model holds them; the optimizer state is created if empty."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    aliases = _tied_aliases(model_state)
    flat = {f"model.{k}": v for k, v in model_state.items() if k not in aliases}
    for name, entries in optim_state["state"].items():
        for key, value in entries.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"optimizer state {name}.{key} is a {type(value).__name__}; only tensors are stored")
            flat[f"optim.{name}.{key}"] = value
    if ema is not None:
        flat.update({f"ema.{k}": v for k, v in ema.shadow.items()})
    return flat, optim_state["param_groups"]


def _tied_aliases(state: dict[str, Tensor]) -> dict[str, str]:
    """Keys of ``state`` whose tensor is an earlier key's (tied weights: an output head sharing the embedding),
    mapped to that key.  safetensors stores a tensor once, so the alias is left out of the files and restored
    from its source on load."""
    first: dict[tuple, str] = {}
    aliases = {}
    for key, value in state.items():
        local = value.to_local() if hasattr(value, "to_local") else value
        ident = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape), local.dtype)
        if local.numel() and ident in first:
            aliases[key] = first[ident]
        else:
            first.setdefault(ident, key)
    return aliases


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextmanager
def _single_process_is_meant() -> Iterator[None]:
    """Silence torch.distributed.checkpoint's notice that it runs in one process: one process is what we ask for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_train_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: Any,
                     is_main: bool = True, run_id: str | None = None) -> None:
    """Write weights, optimizer and EMA state to ``directory/state`` (safetensors, each rank its own shards,
    through ``torch.distributed.checkpoint``) and the optimizer's param groups to ``directory/optimizer.json``.

    Every rank calls it.  Whole (DDP, one process) and sharded (FSDP) runs write the same format, which loads
    back into either at any number of processes (:func:`load_train_state`).  Nothing is pickled.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    flat, groups = _flat_train_state(model, optimizer, ema)
    with _single_process_is_meant():
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(directory / "state"), save_distributed=True),
                 no_dist=not _distributed())
    if is_main:
        write_json(directory / "optimizer.json", {"param_groups": groups, **({"run_id": run_id} if run_id else {})})
    if _distributed():
        torch.distributed.barrier()
    if is_main:
        apply_umask(directory / "state")


def load_train_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ema: Any) -> None:
    """Read what :func:`save_train_state` wrote into ``model``, ``optimizer`` and ``ema``, resharding as needed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_state_dict

    if not (directory / "state").is_dir():
        raise CheckpointError(f"checkpoint {directory} has no state/ folder (weights, optimizer and EMA state)")
    groups = read_json(directory / "optimizer.json")["param_groups"]
    flat, _ = _flat_train_state(model, optimizer, ema)
    try:
        with _single_process_is_meant():
            dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(directory / "state")),
                     no_dist=not _distributed())
    except (RuntimeError, ValueError, KeyError, OSError, SafetensorError, CheckpointException) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        first = lines[-1] if lines else type(err).__name__  # the root cause closes a checkpoint exception
        raise CheckpointError(f"the state in {directory / 'state'} cannot be read into this run (a corrupt file, or "
                              f"another model's): {first}") from err
    model_state = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    model_state.update({alias: model_state[source] for alias, source in
                        _tied_aliases(get_model_state_dict(model)).items()})
    optim_state: dict[str, dict[str, Tensor]] = {}
    for key, value in flat.items():
        if key.startswith("optim."):
            name, entry = key[len("optim."):].rsplit(".", 1)
            optim_state.setdefault(name, {})[entry] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict={"state": optim_state, "param_groups": groups})


def optimizer_to_files(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Write ``optimizer.state_dict()`` as ``optimizer.safetensors`` (tensors) + ``optimizer.json`` (the rest)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    save_weights(tensors, directory / "optimizer.safetensors")
    write_json(directory / "optimizer.json", {"param_groups": state["param_groups"], "scalars": scalars})


def optimizer_from_files(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    tensors = load_tensors(directory / "optimizer.safetensors")
    meta = read_json(directory / "optimizer.json")
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"optimizer state in {directory} does not fit this optimizer: {err}") from err
