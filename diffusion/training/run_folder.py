"""One run per folder: a fresh run never lands on a previous one, and two runs never write one folder at once.

- A fresh run (no ``--resume``) into a folder that holds a run (checkpoints, a final model or metrics) is refused
  unless ``--overwrite true`` asks to replace it (its checkpoints, final model, metrics and records are deleted).
- The folder is locked for the run's lifetime: ``output_dir/.lock`` holds the owner's pid, host and start time.
  A second writer is refused in one line; a lock whose process is gone (same host) is stale and taken over.
- Before any compute, the folder and its ``checkpoints/`` are probed with a write, so that a read-only place is
  found at start-up, not at the first checkpoint.  A folder the run created and left empty (a run refused at
  start-up) is removed again.

The main process decides; with several ranks its verdict is shared, so that every rank stops or none does.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["LOCK_FILE", "RunFolderLock", "claim_run_folder"]

LOCK_FILE = ".lock"
_PREVIOUS_RUN = ("checkpoints", "final", "metrics.jsonl")  # what a run leaves
_REPLACED = (*_PREVIOUS_RUN, "train_config.json", "data_split.json", "tokenizer")  # what --overwrite deletes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


class RunFolderLock:
    """The exclusive lock on a run folder (``None`` path: a rank that holds no lock)."""

    def __init__(self, path: Path | None, created: bool = False) -> None:
        self.path, self.created = path, created

    @classmethod
    def acquire(cls, folder: Path) -> RunFolderLock:
        path, host = folder / LOCK_FILE, socket.gethostname()
        for _ in range(3):  # a stale lock removed by a racing process: try again
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = json.loads(path.read_text())
                except (OSError, ValueError):  # being written, or gone already
                    time.sleep(0.1)
                    continue
                if owner.get("host") == host and not _alive(int(owner.get("pid", -1))):
                    path.unlink(missing_ok=True)  # its process is gone: stale
                    continue
                raise ValueError(f"output_dir={str(folder)!r} is in use by process {owner.get('pid')} on "
                                 f"{owner.get('host')} (since {owner.get('started')}): wait for that run, or delete "
                                 f"{path} if it is gone")
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            return cls(path)
        raise ValueError(f"output_dir={str(folder)!r}: could not take its lock {path}")

    def release(self) -> None:
        if self.path is None:
            return
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
            if self.created and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()
        except (OSError, ValueError):
            pass
        self.path = None


def _probe_writable(folder: Path) -> None:
    """Create ``folder`` if needed and write and delete a file in it, or raise a one-line PermissionError."""
    probe = folder / f".probe-{os.getpid()}"
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder: choose another --output-dir or move the file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"{folder} cannot be written ({err.strerror or err}): fix its permissions or "
                              "choose another --output-dir") from err


def _check_and_lock(folder: Path, *, fresh: bool, overwrite: bool) -> RunFolderLock:
    created = not folder.exists()
    _probe_writable(folder)
    lock = RunFolderLock.acquire(folder)
    lock.created = created
    try:
        if (folder / "checkpoints").exists():
            _probe_writable(folder / "checkpoints")
        previous = [name for name in _PREVIOUS_RUN if (folder / name).exists()
                    and not (name == "checkpoints" and not any((folder / name).iterdir()))]
        if fresh and previous and not overwrite:
            raise ValueError(f"output_dir={str(folder)!r} already holds a run ({', '.join(previous)}): continue it "
                             "with --resume auto, replace it with --overwrite true, or choose another --output-dir")
        if fresh and previous:
            for name in _REPLACED:
                target = folder / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    except BaseException:
        lock.release()
        raise
    return lock


def claim_run_folder(folder: Path, *, fresh: bool, overwrite: bool, accelerator: Any) -> RunFolderLock:
    """Check and lock ``folder`` for a run (``fresh``: not a resume); the caller releases the lock at the end."""
    error: BaseException | None = None
    lock = RunFolderLock(None)
    if accelerator.is_main_process:
        try:
            lock = _check_and_lock(folder, fresh=fresh, overwrite=overwrite)
        except (ValueError, OSError) as err:
            error = err
    if accelerator.num_processes > 1:  # every rank learns the verdict before any of them goes on
        failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device),
                                    reduction="sum").item() > 0
        if failed and error is None:
            error = ValueError(f"output_dir={str(folder)!r} was refused by the main process (its message says why)")
    if error is not None:
        raise error
    return lock
