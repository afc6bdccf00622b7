"""Duo's consistency distillation in rounds, and what it buys at few sampling steps.

    python scripts/bench_duo_distill.py --teacher runs/results/duo/final --reference runs/results/autoregressive/final \
        [--rounds 4 --steps-per-round 200 --json benchmarks/bench_duo_distill.json]

Round r (r = 0, 1, ...) is one ``ddlm-train --objective duo_distill`` run with ``dt = dt0 * 2^r`` (Duo's doubling;
``dt0 = 1/64``) whose teacher is the previous round's student (round 0: ``--teacher``).  The teacher and every
round's student then draw ``--num-samples`` samples of ``--length`` tokens with the ``d3pm`` sampler (the
x0-parameterised ancestral chain) at each of ``--sampling-steps`` steps, with the same seed, scored by
``--reference`` (a causal LM on the same tokenizer).  The table gives generative perplexity and unigram entropy
per row and step count; the JSON holds the same with each round's training seconds.  Data and batch are the
built-in corpus at the results table's settings (64-token blocks, 32 a step).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="a uniform x0 model folder (e.g. ddlm-train --objective duo)")
    parser.add_argument("--reference", required=True, help="a causal LM folder on the same tokenizer")
    parser.add_argument("--output-dir", default="runs/distill")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps-per-round", type=int, default=200)
    parser.add_argument("--dt0", type=float, default=1 / 64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--sampling-steps", type=int, nargs="+", default=[4, 8, 64])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="2 rounds of 2 steps, 2 samples: checks that it runs")
    args = parser.parse_args()
    for name in ("teacher", "reference"):
        if not (Path(getattr(args, name)) / "config.json").is_file():
            parser.error(f"--{name} {getattr(args, name)!r} is not a model folder (no config.json)")
    if args.rounds < 1 or args.steps_per_round < 1 or not 0 < args.dt0 * 2 ** (args.rounds - 1) <= 1:
        parser.error(f"--rounds and --steps-per-round must be >= 1 and dt0 * 2^(rounds - 1) <= 1, got rounds="
                     f"{args.rounds}, steps={args.steps_per_round}, dt0={args.dt0}")
    if args.smoke:
        args.rounds, args.steps_per_round, args.num_samples, args.sampling_steps = 2, 2, 2, [4]

    from transformers import AutoModelForCausalLM

    from diffusion import DDiTModel
    from diffusion.evaluation.sample_quality import generative_perplexity, unigram_entropy
    from diffusion.training import train
    from diffusion.training.config import TrainConfig
    from samplers import get_sampler

    reference = AutoModelForCausalLM.from_pretrained(args.reference).eval()
    models, seconds = {"teacher": Path(args.teacher)}, {}
    previous = Path(args.teacher)
    for r in range(args.rounds):
        dt = args.dt0 * 2 ** r
        config = TrainConfig(output_dir=str(Path(args.output_dir) / f"round-{r}"), objective="duo_distill",
                             init_from=str(previous), distill_dt=dt, seq_len=args.length, batch_size=32,
                             max_steps=args.steps_per_round, warmup_steps=min(20, args.steps_per_round), lr=args.lr,
                             eval_every=args.steps_per_round, save_every=args.steps_per_round, eval_blocks=64,
                             progress=False, overwrite=True, attention="eager")
        start = time.perf_counter()
        previous = train(config).final_dir
        seconds[f"round {r} (dt {dt:.4g})"] = round(time.perf_counter() - start, 1)
        models[f"round {r} (dt {dt:.4g})"] = previous
        print(f"distilled round {r} (dt {dt:.4g}) in {seconds[f'round {r} (dt {dt:.4g})']:.0f} s", flush=True)

    rows = []
    for label, folder in models.items():
        model = DDiTModel.from_pretrained(folder).eval()
        row = {"model": label, "train_seconds": seconds.get(label), "samples": []}
        for steps in args.sampling_steps:
            out = get_sampler("d3pm").generate(model, batch_size=args.num_samples, length=args.length,
                                               num_steps=steps, generator=torch.Generator().manual_seed(0))
            row["samples"].append({"steps": steps, "nfe": out.nfe, **generative_perplexity(out.tokens, reference),
                                   "unigram_entropy": unigram_entropy(out.tokens)})
        rows.append(row)
    print("\n| model | " + " | ".join(f"gen-ppl / entropy @ {s} steps" for s in args.sampling_steps) + " |")
    print("|---|" + "---|" * len(args.sampling_steps))
    for row in rows:
        cells = [f"{s['gen_ppl']:.0f} / {s['unigram_entropy']:.2f}" for s in row["samples"]]
        print(f"| {row['model']} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "json"},
                                               "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
