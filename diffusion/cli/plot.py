"""Draw a training run (``ddlm-plot``): loss, held-out loss, tokens/s and learning rate from its metrics.jsonl.

    ddlm-plot runs/shakespeare                       # writes runs/shakespeare/training.png
    ddlm-plot runs/shakespeare --calls quality.json  # also redraws quality.png from ddlm-eval calls' rows

A ``quality_vs_calls.json`` inside the run folder (``ddlm-eval calls --out RUN/quality_vs_calls``) is redrawn too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import console_command

QUALITY_FILE = "quality_vs_calls.json"


@console_command("ddlm-plot")
def main(argv: list[str] | None = None) -> int:
    from .args import ArgumentParser

    parser = ArgumentParser(prog="ddlm-plot", description=__doc__)
    parser.add_argument("run_dir", help="a training run's folder (the --output-dir of ddlm-train or ddlm-sft)")
    parser.add_argument("--out", default=None, help="where to write the PNG (default: RUN_DIR/training.png)")
    parser.add_argument("--calls", default=None,
                        help=f"rows written by ddlm-eval calls (default: RUN_DIR/{QUALITY_FILE} when present)")
    args = parser.parse_args(argv)

    from ..evaluation.run_plot import plot_training

    calls = Path(args.calls).expanduser() if args.calls else Path(args.run_dir).expanduser() / QUALITY_FILE
    if args.calls and not calls.is_file():
        raise FileNotFoundError(f"--calls {args.calls!r} does not exist")
    print(f"wrote {plot_training(Path(args.run_dir).expanduser(), args.out)}")
    if calls.is_file():
        print(f"wrote {plot_calls(calls)}")
    return 0


def plot_calls(path: Path) -> Path:
    """Redraw ``STEM.png`` from ``STEM.json`` as ``ddlm-eval calls`` wrote it."""
    from ..evaluation.plots import plot_quality_vs_calls

    try:
        result = json.loads(path.read_text())
        rows = result["rows"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"--calls {str(path)!r} is not a ddlm-eval calls result (a JSON object with 'rows')") from None
    real = result.get("real_text")
    references = {} if not real else {"held-out text": (real["gen_ppl"], real["unigram_entropy"])}
    return plot_quality_vs_calls(rows, path.with_suffix(".png"), references=references,
                                 title=f"{result.get('model', path.stem)}: {result.get('num_samples')} samples of "
                                       f"{result.get('length')} tokens per point")


if __name__ == "__main__":
    sys.exit(main())
