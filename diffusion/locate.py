"""Where a model argument points: a local model folder, a Hub id, or a mistake worth one clear line.

A name is read as a local path when it exists, starts with ``.``, ``/`` or ``~``, or contains a path
separator without having the Hub's ``owner/name`` form; a missing local path is reported as missing instead
of being sent to the Hub.  A training run folder or a training checkpoint passed where a model folder belongs
is reported with the folder that holds the model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["locate_model", "looks_local"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a Hub id (``owner/name`` or ``name``)."""
    if name.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(name)):
        return True
    separators = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return any(sep in name for sep in separators) and not _HUB_ID.match(name)


def _newest_checkpoint(run: Path) -> Path | None:
    steps = sorted(run.glob("checkpoints/step-*"))
    return steps[-1] if steps else None


def locate_model(name: str, *, flag: str = "--model") -> str:
    """The location to load ``name`` from: an existing local model folder (user-expanded) or a Hub id (unchanged).

    Raises:
        FileNotFoundError: ``name`` looks local and does not exist, is a file, or holds no ``config.json``.
        ValueError: ``name`` is a training run folder or a training checkpoint (the message names the model folder).
    """
    if not looks_local(name):
        return name
    path = Path(os.path.expanduser(name))
    if not path.exists():
        raise FileNotFoundError(f"{flag} folder does not exist: {name!r}")
    if not path.is_dir():
        raise FileNotFoundError(f"{flag} {name!r} is a file, not a model folder")
    if (path / "trainer_state.json").is_file():
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        raise ValueError(f"{flag} {name!r} is a training checkpoint, not a model folder: pass the run's final model "
                         f"{str(run / 'final')!r}, or export this checkpoint with `ddlm-push {name} --out DIR --dry-run` "
                         "and pass DIR")
    if (path / "train_config.json").is_file() or (path / "grpo_config.json").is_file() or (path / "checkpoints").is_dir():
        if (path / "final" / "config.json").is_file():
            raise ValueError(f"{flag} {name!r} is a training run folder: its model is {str(path / 'final')!r}")
        newest = _newest_checkpoint(path)
        hint = f"; export its newest checkpoint with `ddlm-push {newest} --out DIR --dry-run`" if newest else ""
        raise ValueError(f"{flag} {name!r} is a training run folder without a final model (the run has not "
                         f"finished){hint}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {name!r} holds no config.json: not a model folder")
    return str(path)
