"""Sampler benchmark: network calls, wall time and tokens/s of every sampler, plus a quality proxy.

    python scripts/bench_samplers.py [--model runs/shakespeare/final] [--json bench_samplers.json]

Without ``--model`` a randomly initialised time-free masked model (256 wide, 4 blocks, vocabulary
4096 + MASK) is timed: speed does not depend on the weights.  Quality is the unigram entropy of the
samples in nats (the mean over samples of each one's own token entropy, as in
``diffusion.sample_quality``; it falls when a sampler repeats itself); generative perplexity against network calls, on a
trained model, is ``ddlm-eval calls`` (samplers/sweep.py).  Rows:

* every sampler at length 128 with 128 steps;
* the exact cache at 1024 steps for one sequence: ancestral with and without it (same tokens is asserted);
* plain semi-autoregressive decoding (block 32, one token per step) against threshold decoding with the
  dual KV cache at the same length.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a trained model folder (default: random small model)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-steps", type=int, default=1024, help="steps of the exact-cache comparison")
    parser.add_argument("--json", default="bench_samplers.json")
    parser.add_argument("--smoke", action="store_true", help="a toy model and few steps: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.batch_size, args.cache_steps = 2, 16
    torch.set_num_threads(args.threads)

    from diffusion import DDiTConfig, DDiTModel
    from diffusion.evaluation.sample_quality import unigram_entropy
    from samplers import get_sampler

    if args.model:
        model = DDiTModel.from_pretrained(args.model).eval()
    else:
        torch.manual_seed(0)
        size = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2) if args.smoke else \
            dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4)
        model = DDiTModel(DDiTConfig(vocab_size=4097, max_position_embeddings=1024, attn_implementation="eager",
                                     **size)).eval()
    length = min(32 if args.smoke else 128, model.config.max_position_embeddings)
    rows = []

    def run(label: str, name: str, steps: int, batch: int | None = None, **kwargs: object) -> torch.Tensor:
        sampler = get_sampler(name, **kwargs)
        batch = batch or args.batch_size
        start = time.perf_counter()
        out = sampler.generate(model, batch_size=batch, length=length, num_steps=steps,
                               generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
        rows.append({"run": label, "sampler": name, "options": kwargs, "batch": batch, "length": length,
                     "steps": steps, "nfe": out.nfe, "seconds": seconds, "tokens_per_s": batch * length / seconds,
                     "unigram_entropy": unigram_entropy(out.tokens)})
        print(f"{label:<34} {name:<10} steps {steps:>5} nfe {out.nfe:>5} {seconds:>8.2f} s "
              f"{rows[-1]['tokens_per_s']:>8.0f} tok/s  entropy {rows[-1]['unigram_entropy']:.2f}", flush=True)
        return out.tokens

    for name, kwargs in [("ancestral", {}), ("remask", {"strategy": "low_confidence"}), ("remask", {"strategy": "margin"}),
                         ("remask", {"strategy": "entropy"}), ("remask", {"strategy": "random"}),
                         ("threshold", {"threshold": 0.9}), ("analytic", {}), ("euler", {})]:
        run(f"{name} {kwargs or ''}".strip(), name, length, **kwargs)

    # One sequence, so that the expected call count is n (1 - (1 - 1/n)^L).
    cached = run("exact cache: on (1 sequence)", "ancestral", args.cache_steps, batch=1)
    plain = run("exact cache: off (1 sequence)", "ancestral", args.cache_steps, batch=1, cache=False)
    if not torch.equal(cached, plain):
        raise SystemExit("the cached ancestral sampler gave different tokens from the uncached one")
    run("semi-AR, block 32, 1 token/step", "remask", length, block_length=32)
    run("threshold 0.9 + dual KV cache", "threshold", length, threshold=0.9, block_length=32, kv_cache="dual")

    on, off = rows[-4], rows[-3]
    semi, fast = rows[-2], rows[-1]
    summary = {
        "exact_cache_call_ratio": off["nfe"] / on["nfe"],
        "exact_cache_speedup": off["seconds"] / on["seconds"],
        "expected_calls": args.cache_steps * (1 - (1 - 1 / args.cache_steps) ** length),
        "threshold_kv_speedup": semi["seconds"] / fast["seconds"],
        "threshold_kv_entropy_change": fast["unigram_entropy"] - semi["unigram_entropy"],
    }
    print(json.dumps(summary, indent=2))
    with open(args.json, "w") as f:
        json.dump({"model": args.model or "random small", "batch_size": args.batch_size, "rows": rows,
                   "summary": summary}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
