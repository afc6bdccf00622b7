"""DPO on preference pairs (``ddlm-dpo``), with VRPO's variance reduction, from a model or on the built-in task.

    ddlm-dpo --output-dir runs/dpo-sort                    # SFT warm-up of a small model, then DPO on sort pairs
    ddlm-dpo --model runs/rl-sort/final --data prefs.jsonl --output-dir runs/dpo
    ddlm-dpo --model my/hub-model --data my/preference-dataset --split train

``--data`` is ``builtin:sort`` (the sorting task's pairs: the sorted digits chosen, the same with one digit changed
rejected), a local .json/.jsonl/.parquet file or folder, or a ``datasets`` Hub name, with the columns ``prompt``,
``chosen`` and ``rejected``.  The last ``--eval-pairs`` rows are held out.  Every DPOConfig field is a flag.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from diffusion.cli.errors import console_command

BUILTIN_SORT = "builtin:sort"
DEFAULTS = {"max_steps": 150, "lr": 1e-3, "beta": 0.5}  # this command's settings for the sorting task


def _parser() -> Any:
    from diffusion.cli.args import ArgumentParser, Derived, add_dataclass_arguments

    from .dpo_config import DPOConfig

    p = ArgumentParser(prog="ddlm-dpo", description=__doc__)
    data = p.add_argument_group("data and starting model")
    data.add_argument("--data", default=BUILTIN_SORT, help="preference pairs: builtin:sort, a local file or folder, "
                                                           "or a Hub dataset (default: %(default)s)")
    data.add_argument("--split", default="train", help="the Hub dataset's split (default: %(default)s)")
    data.add_argument("--dataset-config", default=None, help="the Hub dataset's configuration (default: none)")
    data.add_argument("--eval-pairs", type=int, default=64, help="pairs held out for the before/after check "
                                                                  "(default: %(default)s)")
    data.add_argument("--num-digits", type=int, default=5, help="builtin:sort: digits to sort (default: %(default)s)")
    data.add_argument("--model", default=None, help="start from this model folder or Hub id (default: a new small "
                                                    "model with a supervised warm-up; builtin:sort only)")
    data.add_argument("--trust-remote-code", action="store_true", help="allow --model's own code to run")
    data.add_argument("--sft-steps", type=int, default=150,
                      help="supervised warm-up steps for a new model (default: %(default)s)")
    data.add_argument("--hidden-size", type=int, default=64, help="width of a new model (default: %(default)s)")
    data.add_argument("--num-layers", type=int, default=2, help="depth of a new model (default: %(default)s)")
    defaults = {**DEFAULTS, "output_dir": Derived("a new folder runs/dpo, runs/dpo-2, ...; never the input model's"),
                "completion_length": Derived("builtin:sort: num_digits + 1 (digits and EOS); else 32")}
    add_dataclass_arguments(p.add_argument_group("DPO"), DPOConfig, defaults=defaults)
    return p


@console_command("ddlm-dpo")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    from diffusion.data.preferences import check_preference_rows, load_preference_rows

    from .cli import _check_output_dir, _new_run_folder, starting_model, train_and_report
    from .dpo import DPOTrainer
    from .dpo_config import DPOConfig
    from .tasks import SortTask

    # Everything that needs no model is checked before one is built or loaded.
    builtin = args.data == BUILTIN_SORT
    if args.data.startswith("builtin:") and not builtin:
        raise ValueError(f"unknown built-in preference data --data {args.data!r}; valid: [{BUILTIN_SORT!r}]")
    if not builtin and args.model is None:
        raise ValueError(f"--data {args.data!r} needs --model (a new small model only knows the sorting task's "
                         "characters)")
    if args.eval_pairs < 1:
        raise ValueError(f"--eval-pairs must be >= 1, got {args.eval_pairs}")
    if args.output_dir is None and args.resume is not None:
        raise ValueError("--resume needs --output-dir: the run folder to continue")
    if args.output_dir is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("several processes need --output-dir: they must agree on the run folder")
    task = SortTask(args.num_digits) if builtin else None
    derived = {"completion_length": args.completion_length or (task.completion_length if task else 32),
               "output_dir": args.output_dir or _new_run_folder("runs/dpo")}
    fields = set(DPOConfig.__dataclass_fields__)
    config = DPOConfig(**{**{k: v for k, v in vars(args).items() if k in fields}, **derived})
    _check_output_dir(config.output_dir, args.model)
    if builtin:
        rows = task.preference_records(5000, torch.Generator().manual_seed(config.seed + 1))
        held_out = task.preference_records(args.eval_pairs, torch.Generator().manual_seed(config.seed + 2))
    else:
        rows = load_preference_rows(args.data, split=args.split, dataset_config=args.dataset_config)
        if len(rows) <= args.eval_pairs:
            raise ValueError(f"--data {args.data!r} has {len(rows)} rows: too few to hold out --eval-pairs "
                             f"{args.eval_pairs} and train on the rest")
        rows, held_out = rows[: -args.eval_pairs], rows[-args.eval_pairs:]
    check_preference_rows(held_out, args.data)
    model, tokenizer, resuming = starting_model("ddlm-dpo", args, config, task)
    trainer = DPOTrainer(model, tokenizer, config, rows)
    return train_and_report(trainer, held_out, resuming)


if __name__ == "__main__":
    sys.exit(main())
