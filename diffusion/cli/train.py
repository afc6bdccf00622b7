"""The training half of ``ddlm-train``: parse every :class:`~diffusion.training.TrainConfig` field, train.

The console command (:mod:`samplers.cli.train`) adds the samples printed after training, which need the
samplers, a layer above this package.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .args import ArgumentParser, add_dataclass_arguments, dataclass_from_namespace
from .errors import console_command

__all__ = ["build_parser", "main"]


def build_parser(description: str | None = None) -> ArgumentParser:
    """The ``ddlm-train`` parser: every TrainConfig field plus what to sample after training."""
    from ..training.config import TrainConfig

    parser = ArgumentParser(prog="ddlm-train", description=description or __doc__)
    add_dataclass_arguments(parser, TrainConfig)
    samples = parser.add_argument_group("samples printed after training")
    samples.add_argument("--num-samples", type=int, default=4,
                         help="samples printed after training, 0 for none (default: %(default)s)")
    samples.add_argument("--sample-length", type=int, default=None, help="tokens per sample (default: seq_len)")
    samples.add_argument("--sampling-steps", type=int, default=128, help="sampling steps (default: %(default)s)")
    parser.add_argument("--no-plot", dest="plot", action="store_false",
                        help="do not draw OUTPUT_DIR/training.png after training (ddlm-plot draws it later)")
    return parser


@console_command("ddlm-train")
def main(argv: list[str] | None = None, *, after_training: Callable[[Any, argparse.Namespace, Any], int] | None = None,
         description: str | None = None) -> int:
    """Parse, train, then ``after_training(result, args, config)`` on the main process (exit code 0, 1 or 2).

    Bad values are one-line errors before any work (exit 2); a checkpoint that cannot be written or a run
    that diverged exits 1 with its message.
    """
    from ..training.config import TrainConfig

    parser = build_parser(description)
    args = parser.parse_args(argv)
    try:
        config = dataclass_from_namespace(TrainConfig, args)
    except ValueError as err:
        parser.error(str(err))
    for name in ("num_samples", "sample_length", "sampling_steps"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "num_samples" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'num_samples' else 1}, got {value}")

    from transformers.utils import logging as hf_logging

    from ..training import train

    hf_logging.disable_progress_bar()  # keep the terminal for our own progress bar
    result = train(config)  # a bad --dataset or --resume: exit 2; a disk that fills or a diverged run: exit 1
    if result.final_dir is None or not _is_main_process():
        return 0
    if args.plot:
        from ..evaluation.run_plot import plot_training

        print(f"\ntraining curves: {plot_training(config.output_dir)} (redraw with ddlm-plot {config.output_dir})")
    if after_training is None:
        return 0
    return after_training(result, args, config)


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0
