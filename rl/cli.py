"""RL fine-tuning with GRPO (``ddlm-rl``) on a built-in task (sorting, 4x4 Sudoku), from scratch or from a model.

    ddlm-rl --output-dir runs/rl-sort                      # SFT warm-up of a small model, then GRPO
    ddlm-rl --model runs/rl-sort/final --estimator quadrature --output-dir runs/rl-q
    ddlm-rl --reward mypkg.rewards:brevity --reward-weight 0.5   # your own reward, from ./mypkg/rewards.py
    ddlm-rl --reward rl.rewards:entropy_reward --task-rewards false   # RENT: the model's confidence alone
    ddlm-rl --task sudoku --output-dir runs/rl-sudoku      # complete 4x4 Sudoku grids (--blanks empty cells)
    ddlm-rl --new-model sedd --estimator sepo --sampler analytic --lr 3e-4   # SEPO on a uniform SEDD model

Every GRPOConfig field is a flag (see --help).  Rewards are ``(prompts, completions, **fields) -> list``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from diffusion.cli.errors import console_command


DEFAULTS = {"max_steps": 150, "lr": 1e-3}  # this command's own settings for the sorting task; --help shows them


def _parser() -> Any:
    from diffusion.cli.args import ArgumentParser, Derived, parse_bool, add_dataclass_arguments

    from .config import GRPOConfig

    p = ArgumentParser(prog="ddlm-rl", description=__doc__)
    task = p.add_argument_group("task and starting model")
    task.add_argument("--task", default="sort", choices=["sort", "sudoku"], help="the built-in task (default: "
                                                                                "%(default)s)")
    task.add_argument("--num-digits", type=int, default=5, help="sort: digits to sort (default: %(default)s)")
    task.add_argument("--blanks", type=int, default=6, help="sudoku: empty cells per puzzle (default: %(default)s)")
    task.add_argument("--model", default=None, help="start from this model folder or Hub id (default: a new small "
                                                    "model with a supervised warm-up)")
    task.add_argument("--trust-remote-code", action="store_true", help="allow --model's own code to run")
    task.add_argument("--sft-steps", type=int, default=150,
                      help="supervised warm-up steps for a new model (default: %(default)s)")
    task.add_argument("--new-model", default="mdlm", choices=["mdlm", "sedd"],
                      help="without --model, the kind of new model: a masked denoiser, or a uniform SEDD score model "
                           "(for --estimator sepo --sampler analytic) (default: %(default)s)")
    task.add_argument("--hidden-size", type=int, default=64, help="width of a new model (default: %(default)s)")
    task.add_argument("--num-layers", type=int, default=2, help="depth of a new model (default: %(default)s)")
    task.add_argument("--reward", action="append", default=[], metavar="MODULE:FUNCTION",
                      help="an extra reward callable, imported from the working directory first; repeatable (default: none)")
    task.add_argument("--reward-weight", action="append", type=float, default=[],
                      help="weight of each --reward, in order; repeatable (default: none, so 1.0 for each)")
    task.add_argument("--task-rewards", type=parse_bool, default=True,
                      help="score with the task's rewards (false: only the --reward functions; the held-out check "
                           "still reports the task's) (default: %(default)s)")
    task.add_argument("--eval-prompts", type=int, default=256,
                      help="held-out prompts for the before/after check (default: %(default)s)")
    defaults = {**DEFAULTS, "completion_length": Derived("the task's: sort num_digits + 1, sudoku 17 (the "
                                                                   "answer and EOS)"),
                "sampling_steps": Derived("completion_length: one token per step"),
                "output_dir": Derived("a new folder runs/rl, runs/rl-2, ...; never the input model's")}
    add_dataclass_arguments(p.add_argument_group("GRPO"), GRPOConfig, defaults=defaults)
    return p


def _new_run_folder(base: str = "runs/rl") -> str:
    """``base``, or ``base-2``, ``base-3``, ...: the first that does not exist yet."""
    candidate, n = base, 1
    while Path(candidate).exists():
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def _check_output_dir(output_dir: str, model: str | None) -> None:
    """Refuse an output folder whose final/ would replace the input model."""
    if model is None or not Path(model).expanduser().exists():
        return
    out, source = Path(output_dir).expanduser().resolve(), Path(model).expanduser().resolve()
    if source == out / "final" or source == out or out in source.parents:
        raise ValueError(f"--output-dir {output_dir!r} holds the input model {model!r}, which the run's final/ would "
                         "replace; choose another --output-dir")


def _import_reward(spec: str) -> Any:
    """``module:function`` imported as ``python -m`` would: the working directory comes first on the path."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--reward must look like module:function, got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import --reward {spec!r}: {err}") from err
    if not callable(function):
        raise ValueError(f"--reward {spec!r} is not callable")
    return function


def starting_model(prog: str, args: Any, config: Any, task: Any, kind: str = "mdlm") -> tuple[Any, Any, bool]:
    """``(model, tokenizer, resuming)``: ``--model`` loaded, or a new ``kind`` model warmed up on the task (not when
    the run resumes: its checkpoint holds the weights).  Announces the run folder on the main process."""
    from diffusion.cli.loading import load_denoiser_for
    from diffusion.training.checkpoint import find_latest_checkpoint

    from .sft import small_model
    from .tasks import char_tokenizer

    resuming = config.resume is not None and (
        config.resume != "auto" or find_latest_checkpoint(Path(config.output_dir) / "checkpoints") is not None)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{prog}: writing to {config.output_dir}", file=sys.stderr)
    if args.model:
        model, tokenizer = load_denoiser_for(args.model, trust_remote_code=args.trust_remote_code)
        return model, tokenizer, resuming
    tokenizer = char_tokenizer()
    model = small_model(tokenizer, task.prompt_length + config.completion_length, kind=kind,
                        hidden_size=args.hidden_size, num_layers=args.num_layers, seed=config.seed)
    if not resuming:
        warm_up(model, tokenizer, task, args.sft_steps, config)
    return model, tokenizer, resuming


def warm_up(model: Any, tokenizer: Any, task: Any, steps: int, config: Any) -> None:
    """The task's supervised warm-up of a new model, with one line saying how the loss went."""
    from .sft import supervised_warmup

    losses = supervised_warmup(model, lambda g: task.sft_batch(tokenizer, 64, g), steps=steps, seed=config.seed,
                               progress=config.progress)
    print(f"supervised warm-up: {steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses
          else "supervised warm-up: 0 steps")


def train_and_report(trainer: Any, held_out: list[dict[str, Any]], resuming: bool) -> int:
    """Held-out check, the run, the check again; the summary as JSON; the process group ended before exit."""
    before = None if resuming else trainer.evaluate(held_out)  # a resumed model loads inside train()
    history = trainer.train()
    after = trainer.evaluate(held_out)
    summary = {"steps_run": len(history), "held_out_before": before, "held_out_after": after,
               "final_model": str(trainer.output_dir / "final")}
    if trainer.accelerator.is_main_process:
        print(json.dumps(summary, indent=2))
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # destroy the process group before exit: a gloo group left alive can abort
    return 0


@console_command("ddlm-rl")
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch


    from .config import GRPOConfig
    from .rewards import check_weights
    from .tasks import SortTask, SudokuTask
    from .trainer import GRPOTrainer

    # Everything that needs no model is checked before one is built or loaded; errors end as console_command says.
    task = SortTask(args.num_digits) if args.task == "sort" else SudokuTask(args.blanks)
    if args.output_dir is None and args.resume is not None:
        raise ValueError("--resume needs --output-dir: the run folder to continue")
    if args.output_dir is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("several processes need --output-dir: they must agree on the run folder")
    completion_length = args.completion_length or task.completion_length
    derived = {"completion_length": completion_length,
               "sampling_steps": args.sampling_steps or completion_length,
               "output_dir": args.output_dir or _new_run_folder()}
    fields = {name for name in GRPOConfig.__dataclass_fields__}
    config = GRPOConfig(**{**{k: v for k, v in vars(args).items() if k in fields}, **derived})
    _check_output_dir(config.output_dir, args.model)
    extra = [_import_reward(spec) for spec in args.reward]
    if len(args.reward_weight) > len(extra):
        raise ValueError(f"{len(args.reward_weight)} --reward-weight values for {len(extra)} --reward functions")
    weights = list(args.reward_weight) + [1.0] * (len(extra) - len(args.reward_weight))
    if not args.task_rewards and not extra:
        raise ValueError("--task-rewards false needs at least one --reward: nothing would score the completions")
    check_weights(extra, weights)  # before any model is built
    model, tokenizer, resuming = starting_model("ddlm-rl", args, config, task, kind=args.new_model)
    records = task.records(20_000, torch.Generator().manual_seed(config.seed + 1))
    seen = {r["prompt"] for r in records}  # held-out prompts never appear in training
    held_out = [r for r in task.records(4 * args.eval_prompts + 100, torch.Generator().manual_seed(config.seed + 2))
                if r["prompt"] not in seen][: args.eval_prompts]
    task_weights = task.reward_weights if args.task_rewards else [0.0] * len(task.reward_functions)
    trainer = GRPOTrainer(model, tokenizer, config, task.reward_functions + extra, records, task_weights + weights)
    return train_and_report(trainer, held_out, resuming)


if __name__ == "__main__":
    sys.exit(main())
