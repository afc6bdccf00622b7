"""Pictures of evaluation results, drawn with matplotlib (a dependency of ddlm), written as PNG.

- :func:`plot_quality_vs_calls`: generative perplexity (log scale) and unigram entropy against network calls per
  sample (log scale), one line per sampler, from the rows :func:`samplers.sweep.sweep` returns.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_quality_vs_calls", "require_matplotlib", "save_figure"]


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or an ImportError that says how to install it."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("drawing a picture needs matplotlib: pip install matplotlib") from error
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_quality_vs_calls(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str | None = None,
                          references: Mapping[str, tuple[float, float]] | None = None) -> Path:
    """Write the quality-versus-calls picture to ``path`` (PNG, written to a temporary name and renamed).

    ``rows``: dicts with ``label``, ``calls``, ``gen_ppl`` and ``unigram_entropy``; rows of one label form a line,
    in order of calls.  ``references``: name -> (gen_ppl, unigram_entropy) drawn as dashed horizontal lines (real
    text, say).  Returns the path.
    """
    if not rows:
        raise ValueError("plot_quality_vs_calls needs at least one row")
    missing = [key for key in ("label", "calls", "gen_ppl", "unigram_entropy") if key not in rows[0]]
    if missing:
        raise ValueError(f"rows need the keys label, calls, gen_ppl and unigram_entropy; the first lacks {missing}")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"the picture is a PNG: path must end in .png, got path={str(path)!r}")
    plt = require_matplotlib()
    figure, (ppl_axis, entropy_axis) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    labels = list(dict.fromkeys(row["label"] for row in rows))
    for label in labels:
        line = sorted((row for row in rows if row["label"] == label), key=lambda row: row["calls"])
        calls = [row["calls"] for row in line]
        ppl_axis.plot(calls, [row["gen_ppl"] for row in line], marker="o", label=label)
        entropy_axis.plot(calls, [row["unigram_entropy"] for row in line], marker="o", label=label)
    for name, (ppl, entropy) in (references or {}).items():
        ppl_axis.axhline(ppl, color="gray", linestyle="--", linewidth=1, label=name)
        entropy_axis.axhline(entropy, color="gray", linestyle="--", linewidth=1, label=name)
    ppl_axis.set(xscale="log", yscale="log", xlabel="network calls per sample", ylabel="generative perplexity",
                 title="generative perplexity (lower is better)")
    entropy_axis.set(xscale="log", xlabel="network calls per sample", ylabel="unigram entropy (nats)",
                     title="unigram entropy (too low: repetition)")
    for axis in (ppl_axis, entropy_axis):
        axis.grid(True, which="both", alpha=0.3)
    entropy_axis.legend(fontsize=8, loc="best")
    if title:
        figure.suptitle(title)
    return save_figure(figure, path, dpi=110)


def save_figure(figure: Any, path: Path, *, dpi: int = 100) -> Path:
    """Write ``figure`` to the PNG ``path`` under a temporary name, rename it into place and close the figure:
    a reader never sees half a picture.  Returns the path."""
    plt = require_matplotlib()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.png")
    figure.savefig(temporary, dpi=dpi)
    plt.close(figure)
    temporary.replace(path)
    return path
