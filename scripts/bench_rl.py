"""Benchmark the RL objectives, likelihood estimators and rollouts on a synthetic task: reward before/after a budget.

    python scripts/bench_rl.py --task sort --steps 300 --json benchmarks/bench_rl.json
    python scripts/bench_rl.py --task sudoku --steps 150 --settings coupled,spg --json benchmarks/bench_rl_sudoku.json

Every setting starts from the same supervised warm-up (a masked DDiT; SEPO's rows a uniform SEDD model warmed up on
score entropy) and runs the same number of steps, once per seed (``--seeds``: the rollouts, masks and prompt or pair
order change; the warm-up does not).  The table shows the held-out reward (one sample per prompt, 512 prompts) and
the exact-match rate after training (mean over seeds, then min and max; the reward is the task's, also for the
row that trains on the entropy reward too), the variance of the estimator's sequence
log-likelihood over 4 mask draws on the current batch (averaged over the run and the seeds), the network calls per
estimate, the rollout row-calls per step (rows times batched calls) and the seconds per step.  DPO trains on
preference pairs built from the task's reward (the answer chosen, the answer with one position changed rejected)
and rolls nothing out; its row-calls are those of its ELBO estimates.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rl import DPOConfig, DPOTrainer
from rl.config import GRPOConfig
from rl.rewards import entropy_reward
from rl.sft import small_model, supervised_warmup
from rl.tasks import TASKS, char_tokenizer
from rl.trainer import GRPOTrainer

SETTINGS = {  # label: GRPOConfig overrides; "kind" picks another trainer or starting model
    "one_step": {"estimator": "one_step"},
    "coupled": {"estimator": "coupled"},
    "quadrature, token ratio": {"estimator": "quadrature", "num_points": 2, "level": "token"},
    "quadrature, sequence ratio": {"estimator": "quadrature", "num_points": 2, "level": "sequence"},
    "monte_carlo, token ratio": {"estimator": "monte_carlo", "num_points": 2, "level": "token"},
    "wd1, coupled": {"objective": "wd1", "estimator": "coupled"},
    "wd1, quadrature": {"objective": "wd1", "estimator": "quadrature", "num_points": 2},
    "spg, coupled": {"objective": "spg", "estimator": "coupled"},
    "tree 2x3, sibling advantages, coupled": {"estimator": "coupled", "rollout": "tree", "tree_branches": 2,
                                              "tree_depth": 3},
    "tree 2x3, group advantages, coupled": {"estimator": "coupled", "rollout": "tree", "tree_branches": 2,
                                            "tree_depth": 3, "tree_advantages": "group"},
    "coupled + entropy reward (RENT, weight 0.5)": {"estimator": "coupled", "kind": "rent"},
    "sepo (uniform SEDD model)": {"estimator": "sepo", "sampler": "analytic", "lr": 3e-4, "kind": "sedd"},
    "dpo, VRPO (monte_carlo 4, antithetic)": {"kind": "dpo"},
}


def _grpo_config(task, args, seed, overrides, **extra):
    steps = 2 * task.completion_length if overrides.get("sampler") == "analytic" else task.completion_length
    base = dict(output_dir=tempfile.mkdtemp(prefix="bench-rl-"), max_steps=args.steps, prompts_per_step=8,
                group_size=8, completion_length=task.completion_length, sampler="remask", sampling_steps=steps,
                lr=args.lr, save_every=0, log_every=1 if args.smoke else 10, variance_draws=4, progress=False,
                seed=seed)
    return GRPOConfig(**{**base, **{k: v for k, v in overrides.items() if k != "kind"}, **extra})


def _run(label, overrides, task, tokenizer, starts, records, held_out, args, seed):
    kind = overrides.get("kind", "grpo")
    if kind == "dpo":
        pairs = task.preference_records(5000, torch.Generator().manual_seed(seed + 11))
        config = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-dpo-"), max_steps=args.steps, pairs_per_step=8,
                           completion_length=task.completion_length, lr=args.lr, beta=0.5, num_points=4,
                           save_every=0, progress=False, seed=seed)
        trainer = DPOTrainer(copy.deepcopy(starts["mdlm"]), tokenizer, config, pairs)
        judge = GRPOTrainer(trainer.model, tokenizer, _grpo_config(task, args, seed, {}), task.reward_functions,
                            records, task.reward_weights)  # samples and rewards the held-out prompts
        before = judge.evaluate(held_out)
        began = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - began
        after = judge.evaluate(held_out)
        calls = 4 * config.num_points * config.pairs_per_step  # policy and reference, chosen and rejected
        return before, after, float("nan"), seconds, calls, config.num_points
    model = copy.deepcopy(starts["sedd" if kind == "sedd" else "mdlm"])
    functions, weights = list(task.reward_functions), list(task.reward_weights)
    if kind == "rent":
        functions, weights = functions + [entropy_reward], weights + [0.5]
    config = _grpo_config(task, args, seed, overrides)
    trainer = GRPOTrainer(model, tokenizer, config, functions, records, weights)
    before = trainer.evaluate(held_out)
    began = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - began
    after = trainer.evaluate(held_out)
    variances = [m["estimator_variance"] for m in history if "estimator_variance" in m]
    row_calls = statistics.mean(m["rollout_row_calls"] for m in history)
    return before, after, statistics.mean(variances), seconds, row_calls, trainer.estimator.calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sort", choices=sorted(TASKS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated (default: %(default)s)")
    parser.add_argument("--settings", default=None, help="labels to run, comma-separated prefixes (default: all)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="two steps per setting: checks that the script runs")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.smoke:
        args.steps, args.sft_steps, seeds = 2, 2, seeds[:1]
    wanted = [s.strip() for s in args.settings.split(",")] if args.settings else None
    settings = {k: v for k, v in SETTINGS.items() if wanted is None or any(k.startswith(w) for w in wanted)}
    if not settings:
        raise SystemExit(f"--settings {args.settings!r} names no setting; labels: {list(SETTINGS)}")
    torch.set_num_threads(2)
    task, tokenizer = TASKS[args.task](), char_tokenizer()
    length = task.prompt_length + task.completion_length
    starts = {}
    for kind in ("mdlm", "sedd"):
        if kind == "sedd" and not any(v.get("kind") == "sedd" for v in settings.values()):
            continue
        model = small_model(tokenizer, length, kind=kind)
        supervised_warmup(model, lambda g: task.sft_batch(tokenizer, 64, g), steps=args.sft_steps, lr=3e-3,
                          progress=False)
        starts[kind] = model
    records = task.records(20_000, torch.Generator().manual_seed(1))
    held_out = task.records(16 if args.smoke else 512, torch.Generator().manual_seed(2))
    exact = task.reward_functions[0].__name__
    rows = []
    for label, overrides in settings.items():
        runs = []
        for seed in seeds:
            before, after, variance, seconds, row_calls, calls = _run(label, overrides, task, tokenizer, starts,
                                                                      records, held_out, args, seed)
            task_reward = lambda result: sum(w * result[f"reward/{getattr(f, '__name__', j)}"]  # noqa: E731
                                             for j, (f, w) in enumerate(zip(task.reward_functions, task.reward_weights)))
            runs.append({"seed": seed, "reward_before": task_reward(before), "reward_after": task_reward(after),
                         "exact_before": before[f"reward/{exact}"], "exact_after": after[f"reward/{exact}"],
                         "estimator_variance": variance, "seconds_per_step": seconds / args.steps,
                         "row_calls_per_step": row_calls})
            print(f"{label}, seed {seed}: reward {runs[-1]['reward_after']:.3f} in {seconds:.0f} s", flush=True)
        rows.append({"setting": label, "calls_per_estimate": calls, "runs": runs,
                     **{key: statistics.mean(r[key] for r in runs) for key in runs[0] if key != "seed"}})
    header = ("| setting | calls | reward before -> after: mean (min-max) | exact match after: mean (min-max) | "
              "estimator variance | rollout row-calls / step | s/step |")
    print(header + "\n|---|---|---|---|---|---|---|")
    for r in rows:
        span = lambda key: f"{min(x[key] for x in r['runs']):.3f}-{max(x[key] for x in r['runs']):.3f}"
        variance = "-" if r["estimator_variance"] != r["estimator_variance"] else f"{r['estimator_variance']:.2f}"
        print(f"| {r['setting']} | {r['calls_per_estimate']} | {r['reward_before']:.3f} -> {r['reward_after']:.3f} "
              f"({span('reward_after')}) | {r['exact_after']:.3f} ({span('exact_after')}) | {variance} | "
              f"{r['row_calls_per_step']:.0f} | {r['seconds_per_step']:.3f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"task": args.task, "steps": args.steps, "sft_steps": args.sft_steps,
                                               "lr": args.lr, "seeds": seeds, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
