"""KV cache policies on a trained bidirectional model: speed against generative perplexity.

    python scripts/bench_kv_cache.py --model runs/shakespeare/final --scorer runs/ar/final \
        [--length 64 --block-length 16 --num-samples 128 --json benchmarks/bench_kv_cache.json]

Every row draws ``--num-samples`` unconditional samples of ``--length`` tokens with the same seeds, times them
(float32, the threads given) and scores them under ``--scorer`` (a causal LM on the same tokenizer).  The
baseline is the uncached semi-autoregressive sampler (confidence remasking, blocks of ``--block-length``, one
token per call).  Each row reports its speed-up over the baseline and its generative perplexity's change, with a
95% bootstrap interval over samples.  The recommended policy is the fastest cached row whose generative
perplexity is at most ``--tolerance`` (5%) above the uncached sampler's with the same decoding rule.  Rows without a
cache at fewer steps show what the same time buys without one.  ``refresh 1`` rows must reproduce their uncached
row token for token (checked).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch


def policies(block: int) -> list[tuple[str, str, dict, float]]:
    """(label, sampler, options, steps as a fraction of the length)."""
    rows = []
    for name, rule in (("remask", {}), ("threshold", {"threshold": 0.9})):
        base = {"block_length": block, **rule}
        rows.append((f"{name} uncached", name, base, 1.0))
        rows.append((f"{name} dual, refresh 1 (exact)", name, {**base, "kv_cache": "dual", "cache_refresh_every": 1},
                     1.0))
        for mode in ("prefix", "dual", "delayed"):
            rows.append((f"{name} {mode}", name, {**base, "kv_cache": mode}, 1.0))
        for mode in ("dual", "delayed"):
            for every in (2, 4):
                rows.append((f"{name} {mode}, refresh every {every}", name,
                             {**base, "kv_cache": mode, "cache_refresh_every": every}, 1.0))
            rows.append((f"{name} {mode}, refresh at 25% changed", name,
                         {**base, "kv_cache": mode, "cache_refresh_changed": 0.25}, 1.0))
    rows.append(("remask uncached, half the steps", "remask", {"block_length": block}, 0.5))
    rows.append(("remask uncached, a quarter of the steps", "remask", {"block_length": block}, 0.25))
    return rows


def per_sample_nats(tokens: torch.Tensor, scorer: Any) -> torch.Tensor:
    """``[N]`` mean negative log-likelihood per scored token of each sample under the causal LM ``scorer``."""
    from diffusion.evaluation.autoregressive import causal_nll

    out = []
    with torch.inference_mode():
        for chunk in tokens.split(32):
            nll, scored = causal_nll(scorer, chunk)
            out.append(nll / scored)
    return torch.cat(out).double()


def ppl_ratio_interval(nats: torch.Tensor, base: torch.Tensor, draws: int = 2000) -> tuple[float, float]:
    """95% paired bootstrap interval of gen-ppl(nats) / gen-ppl(base): sample i of both rows comes from the same
    seed, so the same resampled indices serve both (identical rows give exactly [1, 1])."""
    if nats.shape != base.shape:
        raise ValueError(f"paired rows must have the same samples, got {tuple(nats.shape)} and {tuple(base.shape)}")
    g = torch.Generator().manual_seed(0)
    n = len(nats)
    index = torch.randint(0, n, (draws, n), generator=g)
    ratios = (nats[index] - base[index]).mean(-1).exp().sort().values
    return float(ratios[int(0.025 * draws)]), float(ratios[int(0.975 * draws) - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a trained masked diffusion model folder")
    parser.add_argument("--scorer", required=True, help="a causal LM folder on the same tokenizer")
    parser.add_argument("--length", type=int, default=64, help="tokens per sample (default: %(default)s)")
    parser.add_argument("--block-length", type=int, default=16, help="semi-AR block (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=128, help="samples per row (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per call (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="largest generative-perplexity increase a recommended policy may have (default: 5%%)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--json", default="bench_kv_cache.json", help="where to write the results")
    parser.add_argument("--smoke", action="store_true", help="8 samples, to check that the script runs")
    args = parser.parse_args()
    for name in ("model", "scorer"):
        if not Path(getattr(args, name)).is_dir():
            parser.error(f"--{name} {getattr(args, name)!r} is not a folder")
    for name in ("length", "block_length", "num_samples", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.tolerance < 1:
        parser.error(f"--tolerance must be a fraction in [0, 1), got {args.tolerance}")
    if args.length % args.block_length:
        parser.error(f"--length {args.length} must be a multiple of --block-length {args.block_length}")
    if round(args.length * 0.25) < args.length // args.block_length:
        parser.error(f"--block-length {args.block_length}: the quarter-of-the-steps row needs at least one step per "
                     f"block, so --block-length must be >= 4")
    if args.smoke:
        args.num_samples, args.batch_size = 8, 8
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from diffusion import load_denoiser
    from samplers import get_sampler

    model, tokenizer = load_denoiser(args.model)
    model = model.eval()
    scorer = AutoModelForCausalLM.from_pretrained(args.scorer).eval()
    if not getattr(model, "supports_kv_cache", False):
        parser.error(f"--model {args.model!r} has no block KV cache (a DDiT model has one)")
    if scorer.config.vocab_size < len(tokenizer) - 1:  # the scorer reads the model's real tokens (not MASK)
        parser.error(f"--scorer {args.scorer!r} has {scorer.config.vocab_size} tokens, fewer than the model's "
                     f"{len(tokenizer) - 1}: it must use the model's tokenizer")
    with torch.inference_mode():  # one untimed batch first, so the baseline row does not pay the warm-up
        get_sampler("remask", block_length=args.block_length).generate(
            model, batch_size=min(args.batch_size, args.num_samples), length=args.length, num_steps=args.length,
            generator=torch.Generator().manual_seed(0))
    rows, tokens = [], {}
    for label, sampler, options, fraction in policies(args.block_length):
        steps = max(1, round(args.length * fraction))
        samples, seconds, calls = [], 0.0, 0
        for first in range(0, args.num_samples, args.batch_size):
            batch = min(args.batch_size, args.num_samples - first)
            start = time.perf_counter()
            with torch.inference_mode():
                out = get_sampler(sampler, **options).generate(
                    model, batch_size=batch, length=args.length, num_steps=steps,
                    generator=torch.Generator().manual_seed(first))
            seconds += time.perf_counter() - start
            samples.append(out.tokens)
            calls += out.nfe
        tokens[label] = torch.cat(samples)
        nats = per_sample_nats(tokens[label], scorer)
        rows.append({"label": label, "sampler": sampler, "options": options, "steps": steps, "seconds": seconds,
                     "calls": calls, "nats": nats.tolist(), "gen_ppl": math.exp(float(nats.mean()))})
        print(f"{label:48s} {seconds:6.2f} s {calls:4d} calls  gen-ppl {rows[-1]['gen_ppl']:8.1f}", flush=True)

    baseline = rows[0]
    for row in rows:
        uncached = next(r for r in rows if r["label"] == f"{row['sampler']} uncached")
        row["speedup"] = baseline["seconds"] / row["seconds"]
        row["gen_ppl_change"] = row["gen_ppl"] / uncached["gen_ppl"] - 1
        low, high = ppl_ratio_interval(torch.tensor(row["nats"]), torch.tensor(uncached["nats"]))
        row["gen_ppl_change_95"] = [low - 1, high - 1]
        if "refresh 1" in row["label"] and not torch.equal(tokens[row["label"]], tokens[uncached["label"]]):
            sys.exit(f"error: {row['label']!r} did not reproduce {uncached['label']!r} token for token")
    cached = [r for r in rows if "kv_cache" in r["options"] and r["gen_ppl_change"] <= args.tolerance]
    best = max(cached, key=lambda r: r["speedup"]) if cached else None

    print(f"\n{'policy':48s} {'seconds':>8s} {'speed-up':>9s} {'calls':>6s} {'gen-ppl':>8s}  change vs its uncached "
          f"sampler (95%)")
    for row in rows:
        low, high = row["gen_ppl_change_95"]
        print(f"{row['label']:48s} {row['seconds']:8.2f} {row['speedup']:8.2f}x {row['calls']:6d} "
              f"{row['gen_ppl']:8.1f}  {row['gen_ppl_change']:+7.1%} ({low:+.1%} .. {high:+.1%})")
    if best:
        print(f"\nfastest cached policy at most {args.tolerance:.0%} above its uncached sampler: {best['label']} "
              f"({best['speedup']:.2f}x over {baseline['label']}, gen-ppl {best['gen_ppl_change']:+.1%})")
    else:
        print(f"\nno cached policy stays within {args.tolerance:.0%} above its uncached sampler")
    result = {"model": args.model, "scorer": args.scorer, "length": args.length, "block_length": args.block_length,
              "num_samples": args.num_samples, "threads": args.threads, "tolerance": args.tolerance,
              "recommended": best["label"] if best else None,
              "rows": [{k: v for k, v in r.items() if k != "nats"} for r in rows]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
