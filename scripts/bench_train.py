"""Training throughput benchmark: tokens/s, model-FLOPs utilisation and peak memory at a few model sizes.

    python scripts/bench_train.py [--steps 10] [--batch-size 8] [--seq-len 128] [--json bench_train.json]

Every (size, precision) runs in its own subprocess so that its peak resident memory is its own.  The
float32 and bfloat16 matmul rates (2048 x 2048, the same threads) are measured in the same run, and
MFU = 6 x parameters x tokens/s / matmul rate, with all parameters and with non-embedding ones.
One step = forward + backward of the masked-diffusion loss + AdamW, as in training.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

import torch

from bench_common import matmul_rate, time_training_steps

SIZES = {
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4),
    "base": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6),
    "medium": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8),
    "tiny": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2),  # --smoke only
}


def run_one(size: str, precision: str, steps: int, batch_size: int, seq_len: int, attention: str) -> dict:
    from diffusion import DDiTConfig, DDiTModel

    torch.manual_seed(0)
    config = DDiTConfig(vocab_size=4097, cond_dim=128, max_position_embeddings=seq_len, attn_implementation=attention,
                        **SIZES[size])
    model = DDiTModel(config)
    x0 = torch.randint(0, 4096, (batch_size, seq_len))
    times = time_training_steps(model, x0, precision, steps, warmup=3)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed_tokens.weight.numel() + (0 if config.tie_word_embeddings else model.lm_head.weight.numel())
    return {
        "size": size, "precision": precision, "params": total, "non_embedding_params": total - embedding,
        "step_s": statistics.median(times), "tokens_per_s": batch_size * seq_len / statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (after 3 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sizes", default="small,base,medium", help=f"comma-separated, from {list(SIZES)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa", help="attention implementation")
    parser.add_argument("--json", default="bench_train.json", help="where to write the results")
    parser.add_argument("--smoke", action="store_true", help="a toy size and one step: checks that the script runs")
    parser.add_argument("--single", nargs=2, metavar=("SIZE", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.steps, args.batch_size, args.seq_len = "tiny", 1, 2, 16
    torch.set_num_threads(args.threads)

    if args.single:
        print(json.dumps(run_one(args.single[0], args.single[1], args.steps, args.batch_size, args.seq_len, args.attention)))
        return

    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown --sizes {unknown}; valid: {list(SIZES)}")
    rates = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    rows = []
    for size in sizes:
        for precision in ("fp32", "bf16"):
            cmd = [sys.executable, __file__, "--single", size, precision, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--threads", str(args.threads),
                   "--attention", args.attention]
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            flops = 6 * row["tokens_per_s"]
            row["mfu"] = flops * row["params"] / (rates[precision] * 1e9)
            row["mfu_non_embedding"] = flops * row["non_embedding_params"] / (rates[precision] * 1e9)
            rows.append(row)

    print(f"matmul 2048x2048, {args.threads} threads: float32 {rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} GFLOP/s")
    print(f"batch {args.batch_size} x {args.seq_len} tokens, masked-diffusion loss, AdamW, {args.attention} attention, "
          f"median of {args.steps} steps\n")
    header = f"{'size':<7} {'prec':<5} {'params':>8} {'non-emb':>8} {'step s':>7} {'tokens/s':>9} {'MFU':>6} {'MFU non-emb':>11} {'peak MB':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['size']:<7} {r['precision']:<5} {r['params'] / 1e6:>7.2f}M {r['non_embedding_params'] / 1e6:>7.2f}M "
              f"{r['step_s']:>7.3f} {r['tokens_per_s']:>9.0f} {r['mfu']:>6.1%} {r['mfu_non_embedding']:>11.1%} {r['peak_rss_mb']:>8.0f}")
    with open(args.json, "w") as f:
        json.dump({"matmul_gflops": rates, "threads": args.threads, "attention": args.attention, "batch_size": args.batch_size,
                   "seq_len": args.seq_len, "rows": rows}, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
