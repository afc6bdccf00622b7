"""Side-by-side benchmark against the SEDD and MDLM reference implementations (issue 9).

    python scripts/bench_compare.py [--json benchmarks/bench_compare.json] [--parts train,sample,cache,decode]

One shared DiT configuration: hidden 384, 6 blocks, 6 heads, conditioning 128, sequence 128, batch 8,
vocabulary 4096 + MASK, two threads.  The reference figures (the issue's table, measured on a machine
like ours) are printed beside ours; the float32 and bfloat16 matmul rates (2048 x 2048, the same
threads) are measured in the same run, before and after, because this machine's speed drifts.

Parts:

* ``train``: tokens/s of forward + backward + AdamW for SEDD (absorbing score entropy, adaLN time
  conditioning) and MDLM (masked ELBO, time-free), float32 and bf16 autocast, each in its own
  subprocess; MFU = 6 x non-embedding parameters x tokens/s / matmul rate.
* ``sample``: 8 x 128 tokens in 128 steps: SEDD Euler and analytic (score model), MDLM ancestral
  without and with the per-sequence exact cache (time-free model), float32 and bf16.
* ``cache``: 8 x 128 tokens in 1024 steps with the per-sequence exact cache, float32, and the same run
  uncached; the tokens must be identical.
* ``decode``: plain semi-autoregressive decoding (block 32, one token per step) against threshold
  decoding with the dual block KV cache, at the same length, on a trained model (``--decode-model``),
  with the generative perplexity of both under ``--scorer`` (a causal LM).

The models are randomly initialised except in ``decode``: speed does not depend on the weights, but
how many tokens threshold decoding commits per step does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

CONFIG = dict(vocab_size=4097, hidden_size=384, num_hidden_layers=6, num_attention_heads=6, cond_dim=128)
SEQ_LEN, BATCH = 128, 8
MODELS = {"sedd": dict(parameterization="score"), "mdlm": dict(parameterization="subs")}

REFERENCE = {
    ("train", "sedd", "fp32"): 1608, ("train", "sedd", "bf16"): 3436,
    ("train", "mdlm", "fp32"): 1432, ("train", "mdlm", "bf16"): 3547,
    ("sample", "euler", "fp32"): 27.8, ("sample", "analytic", "fp32"): 32.3,
    ("sample", "ancestral", "fp32"): 34.1, ("sample", "ancestral cached", "fp32"): 37.3,
    ("cache", "ancestral cached", "fp32"): 163.0,
}
REFERENCE_NAMES = {"euler": "SEDD euler", "analytic": "SEDD analytic", "ancestral": "MDLM ddpm",
                   "ancestral cached": "MDLM ddpm_cache"}
TARGETS = {"train_speedup": 1.3, "mfu_fp32": 0.85, "mfu_bf16": 0.50, "sample_fp32_s": 15.0, "sample_bf16_s": 5.0,
           "cache_fp32_s": 20.0, "decode_speedup": 5.0}


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 9) -> float:
    """Median GFLOP/s of an n x n matmul."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def build_model(kind: str, attention: str = "eager") -> Any:
    from diffusion import DDiTConfig, DDiTModel

    torch.manual_seed(0)
    config = DDiTConfig(max_position_embeddings=SEQ_LEN, attn_implementation=attention, **CONFIG, **MODELS[kind])
    return DDiTModel(config)


def time_training(kind: str, precision: str, steps: int, attention: str) -> dict:
    """Median seconds of one training step (after warm-up) of ``kind`` in ``precision``."""
    from diffusion.objectives import DiffusionObjective

    model = build_model(kind, attention)
    objective = DiffusionObjective.from_config(model.config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x0 = torch.randint(0, 4096, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = objective(model, x0, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    total = sum(p.numel() for p in model.parameters())
    return {"params": total, "non_embedding_params": total - model.embed_tokens.weight.numel(),
            "step_s": statistics.median(times), "step_s_all": times,
            "tokens_per_s": BATCH * SEQ_LEN / statistics.median(times)}


def run_subprocess(*args: str) -> dict:
    cmd = [sys.executable, __file__, "--single", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def train_part(args: argparse.Namespace, rates: dict) -> list[dict]:
    rows = []
    for kind in ("sedd", "mdlm"):
        for precision in ("fp32", "bf16"):
            attention = args.attention or ("sdpa" if precision == "fp32" else "eager")
            row = run_subprocess("train", kind, precision, str(args.train_steps), attention, str(args.threads))
            row.update(kind=kind, precision=precision, attention=attention,
                       reference_tokens_per_s=REFERENCE[("train", kind, precision)])
            row["speedup"] = row["tokens_per_s"] / row["reference_tokens_per_s"]
            row["mfu"] = 6 * row["non_embedding_params"] * row["tokens_per_s"] / (rates[precision] * 1e9)
            rows.append(row)
            print(f"train {kind} {precision}: {row['tokens_per_s']:.0f} tokens/s ({row['speedup']:.2f}x reference), "
                  f"MFU {row['mfu']:.1%}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="train,sample,cache,decode", help="comma-separated subset to run")
    parser.add_argument("--train-steps", type=int, default=20, help="timed training steps (after 5 warm-up steps)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention", choices=("sdpa", "eager"), default=None,
                        help="attention for training (default: sdpa in float32, eager in bf16)")
    parser.add_argument("--json", default="bench_compare.json", help="where to write the results")
    parser.add_argument("--single", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.single:
        what, *rest = args.single
        if what == "train":
            kind, precision, steps, attention, threads = rest
            torch.set_num_threads(int(threads))
            print(json.dumps(time_training(kind, precision, int(steps), attention)))
        return

    parts = args.parts.split(",")
    rates_before = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    print(f"matmul 2048 x 2048, {args.threads} threads: float32 {rates_before['fp32']:.0f} GFLOP/s, "
          f"bf16 {rates_before['bf16']:.0f} GFLOP/s", flush=True)
    results: dict[str, Any] = {"config": {**CONFIG, "seq_len": SEQ_LEN, "batch": BATCH}, "threads": args.threads}
    if "train" in parts:
        results["train"] = train_part(args, rates_before)
    rates_after = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    results["matmul_gflops"] = {"before": rates_before, "after": rates_after}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
