"""Recipe changes for the main job, each measured on the held-out bound: variants of README's main job, several seeds.

    python scripts/bench_recipe.py --variants before warmup200 --seeds 0 1 2 [--json benchmarks/bench_recipe.json]

Every run is ``ddlm-train`` on the built-in corpus (its own subprocess, one after the other, so the wall times
compare), with README's main-job flags changed as the variant says.  Each final model (EMA weights) is then
scored on the run's held-out blocks by the estimator ``ddlm-train`` prints (for a time-free masked model the
exact-count estimator of the masked-ELBO bound, see ``held_out_objective`` in diffusion/training/loop.py), averaged
over ``--eval-seeds`` draws, so that a difference between variants is not a difference of one evaluation draw.
The held-out curve of each run (one draw per evaluation, as printed) and its wall time go to the JSON too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

BASE = {"--hidden-size": "128", "--num-layers": "2", "--num-heads": "4", "--seq-len": "64", "--batch-size": "32",
        "--lr": "2e-3", "--max-steps": "1000", "--warmup-steps": "50", "--eval-every": "250", "--attention": "eager"}
MAIN_JOB = {"--warmup-steps": "200", "--max-steps": "3000", "--eval-every": "500", "--init-scheme": "fan_in",
            "--constant-modulation": "true"}
VARIANTS = {  # name: (what changes, flags over BASE)
    "before": ("the main job until this change: lr 2e-3, 50 warm-up steps, 1000 steps", {}),
    "warmup200": ("200 warm-up steps", {"--warmup-steps": "200"}),
    "lr1e-3": ("peak lr 1e-3", {"--lr": "1e-3"}),
    "beta2-0.98": ("AdamW beta2 0.98", {"--adam-beta2": "0.98"}),
    "wd0.1": ("weight decay 0.1", {"--weight-decay": "0.1"}),
    "ema0": ("no EMA (raw weights)", {"--ema-decay": "0"}),
    "ardm": ("the exact-count (ARDM) training objective", {"--objective": "ardm"}),
    "min-lr0": ("cosine decay to 0 instead of 0.1 of the peak", {"--min-lr-ratio": "0"}),
    "lr4e-3": ("peak lr 4e-3", {"--lr": "4e-3"}),
    "no-stratified": ("independent training times instead of stratified ones", {"--antithetic": "false"}),
    "batch64": ("64 blocks a step, 500 steps, warm-up 200 (the tokens of 1000 steps at 32)",
                {"--batch-size": "64", "--max-steps": "500", "--warmup-steps": "200", "--eval-every": "125"}),
    "fan-in": ("the reference code's model: fan-in initialisation, constant adaLN modulation",
               {"--init-scheme": "fan_in", "--constant-modulation": "true"}),
    "main-job": ("README's main job now: fan-in init, constant modulation, warm-up 200, 4000 steps",
                 {"--warmup-steps": "200", "--max-steps": "4000", "--eval-every": "500", "--init-scheme": "fan_in",
                  "--constant-modulation": "true"}),
    "128x2-3500": ("warm-up 200, 3500 steps (about 4 minutes)", {"--warmup-steps": "200", "--max-steps": "3500",
                                                                 "--eval-every": "500"}),
    "256x2-1600": ("256 wide, lr 1e-3, warm-up 200, 1600 steps (about the same time)",
                   {"--hidden-size": "256", "--lr": "1e-3", "--warmup-steps": "200", "--max-steps": "1600",
                    "--eval-every": "400"}),
    "128x4-2600": ("4 blocks, warm-up 200, 2600 steps (about the same time)",
                   {"--num-layers": "4", "--warmup-steps": "200", "--max-steps": "2600", "--eval-every": "650"}),
    **{f"main-job-{name}": (f"README's main job (3000 steps) with {what}",
                            {**MAIN_JOB, "--tokenizer": spec}) for name, what, spec in (
        ("builtin", "the built-in 4096-token BPE", "builtin"),
        ("bpe1024", "a 1024-token byte-level BPE trained on the training plays", "train:1024"),
        ("bpe512", "a 512-token byte-level BPE trained on the training plays", "train:512"),
        ("bytes", "bytes (a BPE with no merges: 256 bytes and EOS)", "train:257"))},
    "main-job-seq128": ("README's main job (3000 steps) with 128-token blocks, 16 a step (the same tokens)",
                        {**MAIN_JOB, "--seq-len": "128", "--batch-size": "16"}),
    "main-job-clip": ("README's main job (3000 steps) with the gradient clipped at 1/64 (what a loss summed over "
                      "64 positions clipped at 1 is, as SEDD's code does)", {**MAIN_JOB, "--grad-clip": str(1 / 64)}),
    "main-job-ema0.99": ("README's main job (3000 steps) with EMA decay 0.99 instead of 0.999",
                         {**MAIN_JOB, "--ema-decay": "0.99"}),
}


def flags(variant: str, seed: int, output_dir: Path) -> list[str]:
    merged = {**BASE, **VARIANTS[variant][1], "--seed": str(seed), "--output-dir": str(output_dir)}
    return [item for pair in merged.items() for item in pair] + [
        "--overwrite", "true", "--num-samples", "0", "--no-plot", "--progress", "false"]


def score(run_dir: Path, eval_seeds: int) -> tuple[list[float], tuple[int, int]]:
    """The final model's held-out bound (nats/token) under ``eval_seeds`` evaluation draws, and the scored tokens
    and UTF-8 bytes of the held-out blocks (for bits per byte: token counts differ between tokenizers)."""
    from accelerate import Accelerator

    from diffusion.evaluation.held_out import scored_bytes
    from diffusion.modeling_ddit import DDiTModel
    from diffusion.training.config import TrainConfig
    from diffusion.training.loop import build_model_and_objective, evaluate_loss, held_out_objective
    from diffusion.training.run_data import load_run_data

    config = TrainConfig(**json.loads((run_dir / "train_config.json").read_text()))
    model = DDiTModel.from_pretrained(str(run_dir / "final")).float()
    data = load_run_data(config, Accelerator(cpu=True))
    _, trained = build_model_and_objective(config, None, model)  # every variant here is a masked model
    objective = held_out_objective(trained, not model.config.needs_sigma)
    scores = [evaluate_loss(model, objective, data.valid_blocks, config.eval_batch_size, seed)
              for seed in range(eval_seeds)]
    return scores, scored_bytes(data.valid_blocks, data.tokenizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["before", "warmup200"], choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-seeds", type=int, default=4)
    parser.add_argument("--work", default="runs/recipe")
    parser.add_argument("--json", default="benchmarks/bench_recipe.json")
    args = parser.parse_args(argv)
    from diffusion.evaluation.held_out import bits_per_byte

    if args.eval_seeds < 1:
        parser.error(f"--eval-seeds must be >= 1, got {args.eval_seeds}")
    report: dict = {"base": BASE, "eval_seeds": args.eval_seeds, "runs": []}
    for variant in args.variants:
        for seed in args.seeds:
            run_dir = Path(args.work) / f"{variant}-{seed}"
            start = time.perf_counter()
            proc = subprocess.run(["ddlm-train", *flags(variant, seed, run_dir)], capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"{variant} seed {seed} failed:\n{proc.stderr[-2000:]}")
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            curve = [[r["step"], r["eval_loss"]] for r in rows if "eval_loss" in r]
            speed = statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
            scores, tokens_and_bytes = score(run_dir, args.eval_seeds)
            per_byte = bits_per_byte(statistics.fmean(scores), *tokens_and_bytes)
            report["runs"].append({"variant": variant, "change": VARIANTS[variant][0], "seed": seed, "wall_s": wall,
                                   "tokens_per_s": speed, "curve": curve, "final_scores": scores,
                                   "final_mean": statistics.fmean(scores),
                                   "final_bits_per_byte": per_byte})
            print(f"{variant:>12} seed {seed}: {wall:5.0f} s, {speed:6.0f} tok/s, held-out "
                  f"{statistics.fmean(scores):.3f} nats/token (draws {min(scores):.3f}-{max(scores):.3f}), "
                  f"{per_byte:.3f} bits/byte", flush=True)
            Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"\n{'variant':>12} {'mean over seeds':>16} {'seeds':>24} {'bits/byte':>9} {'wall s':>7}")
    for variant in args.variants:
        runs = [r for r in report["runs"] if r["variant"] == variant]
        means = [r["final_mean"] for r in runs]
        print(f"{variant:>12} {statistics.fmean(means):>16.3f} {' '.join(f'{m:.3f}' for m in means):>24} "
              f"{statistics.fmean(r['final_bits_per_byte'] for r in runs):>9.3f} "
              f"{statistics.fmean(r['wall_s'] for r in runs):>7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
