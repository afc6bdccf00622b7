"""Training curves of one run, read from its ``metrics.jsonl`` and drawn with matplotlib as a PNG.

A training run appends one JSON object per line (``diffusion/training/run_output.py``):

- a training record every ``log_every`` steps: ``step``, ``loss`` (mean over the window), ``lr``, ``tokens_per_s``;
- a held-out record after each evaluation: ``step``, ``eval_loss`` (nats/token: the bound for diffusion models);
- a skipped-step record when a step's loss or gradient was not finite: ``step``, ``skipped: true``.

A run resumed from step k logs again every step after k that it had logged before it stopped, and resumes
bit-exactly, so the later record of a step replaces the earlier one (:func:`read_training_curves`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .plots import require_matplotlib, save_figure

__all__ = ["TrainingCurves", "plot_training", "read_training_curves", "training_figure"]

Series = tuple[list[int], list[float]]


@dataclass(frozen=True)
class TrainingCurves:
    """Each curve as (steps, values), steps increasing and each step once."""

    loss: Series = field(default_factory=lambda: ([], []))
    eval_loss: Series = field(default_factory=lambda: ([], []))
    tokens_per_s: Series = field(default_factory=lambda: ([], []))
    lr: Series = field(default_factory=lambda: ([], []))
    skipped_steps: list[int] = field(default_factory=list)


def _series(by_step: dict[int, float]) -> Series:
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def read_training_curves(metrics_path: str | os.PathLike) -> TrainingCurves:
    """Parse ``metrics.jsonl``; for a step logged twice (a resumed run) the later record wins.

    Raises FileNotFoundError when the file is missing and ValueError naming the line when a line is not a JSON
    object with an integer ``step``, or when the file holds no training or held-out record.
    """
    path = Path(metrics_path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {str(path)!r} (a training run writes metrics.jsonl)")
    kinds: dict[str, dict[int, float]] = {"loss": {}, "eval_loss": {}, "tokens_per_s": {}, "lr": {}}
    skipped: dict[int, bool] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number} has no integer 'step': {line[:80]!r}")
        step = record["step"]
        if record.get("skipped"):
            skipped[step] = True
            continue
        if "loss" in record:  # a training record: a later one replaces this step's skipped mark too
            skipped.pop(step, None)
        for key, values in kinds.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                values[step] = float(value)
    if not kinds["loss"] and not kinds["eval_loss"]:
        raise ValueError(f"{path} holds no training or held-out loss record")
    return TrainingCurves(loss=_series(kinds["loss"]), eval_loss=_series(kinds["eval_loss"]),
                          tokens_per_s=_series(kinds["tokens_per_s"]), lr=_series(kinds["lr"]),
                          skipped_steps=sorted(skipped))


def training_figure(curves: TrainingCurves, *, title: str | None = None) -> Any:
    """A matplotlib figure of three panels: training and held-out loss (skipped steps marked with a red x on the
    step axis), tokens per second, learning rate.  Each curve is one ``Line2D`` whose data are the curve's."""
    plt = require_matplotlib()
    figure, (loss_axis, speed_axis, lr_axis) = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    loss_axis.plot(*curves.loss, label="training (window mean)", linewidth=1.2)
    loss_axis.plot(*curves.eval_loss, label="held out", marker="o", linewidth=1.5)
    if curves.skipped_steps:
        bottom = min(curves.loss[1] + curves.eval_loss[1])
        loss_axis.plot(curves.skipped_steps, [bottom] * len(curves.skipped_steps), linestyle="none", marker="x",
                       color="red", label="skipped step (non-finite)")
    loss_axis.set(xlabel="step", ylabel="nats / token", title="loss")
    loss_axis.legend(fontsize=8)
    speed_axis.plot(*curves.tokens_per_s, label="tokens/s", color="tab:green")
    speed_axis.set(xlabel="step", ylabel="tokens / s", title="throughput")
    lr_axis.plot(*curves.lr, label="lr", color="tab:purple")
    lr_axis.set(xlabel="step", ylabel="learning rate", title="learning rate")
    for axis in (loss_axis, speed_axis, lr_axis):
        axis.grid(True, alpha=0.3)
    if title:
        figure.suptitle(title)
    return figure


def plot_training(run_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Draw ``run_dir/metrics.jsonl`` to ``path`` (default ``run_dir/training.png``), written to a temporary name
    and renamed.  Returns the path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {str(run)!r} does not exist")
    out = Path(path) if path is not None else run / "training.png"
    if out.suffix.lower() != ".png":
        raise ValueError(f"the picture is a PNG: path must end in .png, got {str(out)!r}")
    curves = read_training_curves(run / "metrics.jsonl")
    return save_figure(training_figure(curves, title=str(run)), out)
