"""Side-by-side benchmark against the SEDD and MDLM reference implementations at one shared configuration.

    python scripts/bench_compare.py [--json benchmarks/bench_compare.json] [--parts train,sample,cache,decode]

One shared DiT configuration: hidden 384, 6 blocks, 6 heads, conditioning 128, sequence 128, batch 8,
vocabulary 4096 + MASK, two threads.  The reference figures (REFERENCE below, measured on a machine
like ours) are printed beside ours; the float32 and bfloat16 matmul rates (2048 x 2048, the same
threads) are measured in the same run, before and after, because this machine's speed drifts.

Parts:

* ``train``: tokens/s of forward + backward + AdamW for SEDD (absorbing score entropy, adaLN time
  conditioning) and MDLM (masked ELBO, time-free), float32 and bf16 autocast, each in its own
  subprocess; MFU = 6 x non-embedding parameters x tokens/s / matmul rate.
* ``sample``: 8 x 128 tokens in 128 steps: SEDD Euler and analytic (score model), MDLM ancestral
  without and with the per-sequence exact cache (time-free model), float32 and bf16; each against its matmul
  floor, the FLOPs the run executes (torch's FLOP counter) over the matmul rate of the same run; ``--profile``
  adds each bf16 run's top operators by self time.
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

from bench_common import executed_flops, matmul_rate, profile_calls, time_training_steps

# --smoke (read here, so that the --single subprocesses see it too): every part at a toy size, to check that the
# script runs; its numbers mean nothing.
SMOKE = "--smoke" in sys.argv
CONFIG = dict(vocab_size=4097, hidden_size=384, num_hidden_layers=6, num_attention_heads=6, cond_dim=128)
SEQ_LEN, BATCH = 128, 8
if SMOKE:
    CONFIG = dict(vocab_size=4097, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, cond_dim=16)
    SEQ_LEN, BATCH = 16, 2
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


def build_model(kind: str, attention: str = "sdpa", context: int = SEQ_LEN, dropout: float = 0.0,
                attention_dropout: float | None = None) -> Any:
    from diffusion import DDiTConfig, DDiTModel

    torch.manual_seed(0)
    config = DDiTConfig(max_position_embeddings=context, attn_implementation=attention, dropout=dropout,
                        attention_dropout=attention_dropout, **CONFIG,
                        **MODELS[kind])
    return DDiTModel(config)


def time_training(kind: str, precision: str, steps: int, attention: str, dropout: float = 0.0) -> dict:
    """Median seconds of one training step (after warm-up) of ``kind`` in ``precision``."""
    model = build_model(kind, attention, dropout=dropout)
    x0 = torch.randint(0, 4096, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    times = time_training_steps(model, x0, precision, steps)
    total = sum(p.numel() for p in model.parameters())
    return {"params": total, "non_embedding_params": total - model.embed_tokens.weight.numel(),
            "step_s": statistics.median(times), "step_s_all": times,
            "tokens_per_s": BATCH * SEQ_LEN / statistics.median(times)}


def run_subprocess(*args: str) -> dict:
    cmd = [sys.executable, __file__, "--single", *args, *(["--smoke"] if SMOKE else [])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def train_part(args: argparse.Namespace, rates: dict) -> list[dict]:
    rows = []
    for kind in ("sedd", "mdlm"):
        for precision in ("fp32", "bf16"):
            attention = args.attention
            row = run_subprocess("train", kind, precision, str(args.train_steps), attention, str(args.threads))
            row.update(kind=kind, precision=precision, attention=attention,
                       reference_tokens_per_s=REFERENCE[("train", kind, precision)])
            row["speedup"] = row["tokens_per_s"] / row["reference_tokens_per_s"]
            row["mfu"] = 6 * row["non_embedding_params"] * row["tokens_per_s"] / (rates[precision] * 1e9)
            # The FLOPs the step executes: the head at the masked positions only (half of them on average).
            size = dict(CONFIG, seq_len=SEQ_LEN)
            row["mfu_executed"] = executed_flops(size, BATCH, 0.5) / row["step_s"] / (rates[precision] * 1e9)
            rows.append(row)
            print(f"train {kind} {precision}: {row['tokens_per_s']:.0f} tokens/s ({row['speedup']:.2f}x reference), "
                  f"MFU {row['mfu']:.1%} by 6N, {row['mfu_executed']:.1%} of the FLOPs executed", flush=True)
    return rows


SAMPLERS = [("euler", "sedd", {}), ("analytic", "sedd", {}), ("ancestral", "mdlm", {"cache": False}),
            ("ancestral cached", "mdlm", {"cache": True})]


def generate(model: Any, sampler: str, options: dict, steps: int, precision: str, length: int = SEQ_LEN,
             batch: int = BATCH) -> tuple[Any, float]:
    """(output, seconds) of one seeded generation, in bf16 autocast when ``precision`` says so."""
    from samplers import get_sampler

    name = sampler.split()[0]
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = get_sampler(name, **options).generate(model, batch_size=batch, length=length, num_steps=steps,
                                                    generator=torch.Generator().manual_seed(0))
    return out, time.perf_counter() - start


def _cpu_attention_flops(query: tuple, key: tuple, value: tuple, *_: Any, **__: Any) -> int:
    """FLOPs of SDPA's fused CPU kernel (forward): ``Q K^T`` and ``P V``, ``4 B H L_q L_k d``; torch's FLOP counter
    has no formula for this operator and would count it as 0."""
    *batch, length_q, dim = query
    heads = 1
    for size in batch:
        heads *= size
    return 4 * heads * length_q * key[-2] * dim


def sampling_flops(model: Any, sampler: str, options: dict, steps: int, precision: str) -> float:
    """FLOPs one seeded generation executes (torch's FLOP counter over every network call of the run, with the
    fused CPU attention counted by :func:`_cpu_attention_flops`)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        generate(model, sampler, options, steps, precision)
    return float(counter.get_total_flops())


def sample_part(rates: dict, profile: bool = False) -> list[dict]:
    """Each sampler at 128 steps, float32 and bf16: seconds, calls, and the matmul floor of the run = the FLOPs it
    executes over the matmul rate measured at the start of this run (``floor_ratio`` = seconds / floor); with
    ``profile``, the top operators of the bf16 run by self time."""
    rows = []
    models = {kind: build_model(kind, "sdpa").eval() for kind in MODELS}
    for precision in ("fp32", "bf16"):
        for sampler, kind, options in SAMPLERS:
            out, seconds = generate(models[kind], sampler, options, SEQ_LEN, precision)
            flops = sampling_flops(models[kind], sampler, options, SEQ_LEN, precision)
            floor = flops / (rates[precision] * 1e9)
            row = {"sampler": sampler, "model": kind, "precision": precision, "steps": SEQ_LEN, "nfe": out.nfe,
                   "seconds": seconds, "reference_seconds": REFERENCE.get(("sample", sampler, precision)),
                   "flops": flops, "floor_s": floor, "floor_ratio": seconds / floor}
            if profile and precision == "bf16":
                row["top_ops"] = profile_calls(
                    lambda: generate(models[kind], sampler, options, SEQ_LEN, precision), steps=1, warmup=0, top=8)
            rows.append(row)
            print(f"sample {sampler} {precision}: {seconds:.1f} s, {out.nfe} calls, {flops / 1e12:.2f} TFLOP, "
                  f"{seconds / floor:.2f}x its matmul floor ({floor:.1f} s)", flush=True)
    return rows


def cache_part(steps: int, verify: bool) -> dict:
    model = build_model("mdlm", "sdpa").eval()
    cached, seconds = generate(model, "ancestral cached", {"cache": True}, steps, "fp32")
    row = {"steps": steps, "nfe": cached.nfe, "seconds": seconds,
           "reference_seconds": REFERENCE[("cache", "ancestral cached", "fp32")],
           "expected_events_per_sequence": steps * (1 - (1 - 1 / steps) ** SEQ_LEN)}
    print(f"exact cache, {steps} steps: {seconds:.1f} s, {cached.nfe} calls", flush=True)
    if verify:
        plain, plain_seconds = generate(model, "ancestral", {"cache": False}, steps, "fp32")
        row.update(uncached_seconds=plain_seconds, uncached_nfe=plain.nfe,
                   same_tokens=bool(torch.equal(cached.tokens, plain.tokens)),
                   token_agreement=float((cached.tokens == plain.tokens).float().mean()))
        print(f"uncached, {steps} steps: {plain_seconds:.1f} s, {plain.nfe} calls; same tokens: {row['same_tokens']}",
              flush=True)
    return row


def decode_part(length: int, precision: str) -> dict:
    """Semi-AR (block 32, one token per step) against threshold 0.9 + dual KV cache, both ``length`` steps."""
    model = build_model("mdlm", "sdpa", context=max(SEQ_LEN, length)).eval()
    semi, semi_s = generate(model, "remask", {"block_length": 32}, length, precision, length=length)
    fast, fast_s = generate(model, "threshold", {"threshold": 0.9, "block_length": 32, "kv_cache": "dual"}, length,
                            precision, length=length)
    row = {"length": length, "precision": precision, "semi_ar_seconds": semi_s, "semi_ar_nfe": semi.nfe,
           "threshold_kv_seconds": fast_s, "threshold_kv_nfe": fast.nfe, "speedup": semi_s / fast_s}
    print(f"decode {length} tokens, {precision}: semi-AR {semi_s:.1f} s ({semi.nfe} calls), threshold + dual KV "
          f"{fast_s:.1f} s ({fast.nfe} calls): {row['speedup']:.2f}x", flush=True)
    return row


def quality_part(model_dir: str, scorer_dir: str, length: int, block: int) -> dict:
    """On a trained model: the decode speed-up and generative-perplexity change, and bf16 against float32
    (held-out negative ELBO and sample agreement)."""
    from transformers import AutoModelForCausalLM

    from diffusion import DDiTModel
    from diffusion.data import build_blocks, load_texts, load_tokenizer
    from diffusion.evaluation.likelihood import evaluate_likelihood
    from diffusion.evaluation.sample_quality import generative_perplexity

    model = DDiTModel.from_pretrained(model_dir).eval()
    scorer = AutoModelForCausalLM.from_pretrained(scorer_dir).eval()
    batch = 32
    result: dict[str, Any] = {"model": model_dir, "scorer": scorer_dir, "length": length, "block": block}
    samples = {}
    for label, sampler, options in [("semi-AR", "remask", {"block_length": block}),
                                    ("threshold 0.9 + dual KV", "threshold",
                                     {"threshold": 0.9, "block_length": block, "kv_cache": "dual"})]:
        out, seconds = generate(model, sampler, options, length, "fp32", length=length, batch=batch)
        samples[label] = out.tokens
        result[label] = {"seconds": seconds, "nfe": out.nfe, **generative_perplexity(out.tokens, scorer)}
        print(f"quality {label}: {seconds:.2f} s, {out.nfe} calls, gen-ppl {result[label]['gen_ppl']:.0f}", flush=True)
    result["speedup"] = result["semi-AR"]["seconds"] / result["threshold 0.9 + dual KV"]["seconds"]
    result["gen_ppl_change"] = result["threshold 0.9 + dual KV"]["gen_ppl"] / result["semi-AR"]["gen_ppl"] - 1

    blocks = build_blocks(load_texts("builtin:shakespeare")["validation"], load_tokenizer("builtin"), length)[:128]
    nelbo = {}
    for precision in ("fp32", "bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            nelbo[precision] = evaluate_likelihood(model, blocks, method="quadrature", num_points=8, batch_size=32,
                                                   progress=False).nats_per_token
    # Per-token log-probabilities of the held-out tokens at half the positions masked, bf16 against float32.
    x0 = blocks[:32]
    xt = torch.where(torch.rand(x0.shape, generator=torch.Generator().manual_seed(0)) < 0.5,
                     torch.full_like(x0, model.config.mask_token_id), x0)
    where = xt == model.config.mask_token_id
    with torch.no_grad():
        reference_lp = model(input_ids=xt, score_mask=where).logits.gather(-1, x0[where][:, None])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_lp = model(input_ids=xt, score_mask=where).logits.gather(-1, x0[where][:, None])
    difference = (bf16_lp - reference_lp).abs()
    ancestral = {p: generate(model, "ancestral cached", {"cache": True}, length, p, length=length, batch=batch)[0]
                 for p in ("fp32", "bf16")}
    result["bf16"] = {"nelbo_fp32": nelbo["fp32"], "nelbo_bf16": nelbo["bf16"],
                      "nelbo_relative_change": nelbo["bf16"] / nelbo["fp32"] - 1,
                      "log_prob_abs_diff_mean": float(difference.mean()), "log_prob_abs_diff_max": float(difference.max()),
                      "ancestral_token_agreement": float((ancestral["fp32"].tokens == ancestral["bf16"].tokens)
                                                         .float().mean())}
    print(f"bf16 vs float32: |log p| difference mean {difference.mean():.4f}, max {difference.max():.4f}; "
          f"held-out nats/token {nelbo['fp32']:.4f} -> {nelbo['bf16']:.4f}; ancestral samples agree "
          f"on {result['bf16']['ancestral_token_agreement']:.1%} of tokens", flush=True)
    return result


def report(results: dict) -> str:
    """The comparison as a markdown table with the targets' verdicts."""
    rates = results["matmul_gflops"]
    lines = [f"matmul 2048 x 2048, {results['threads']} threads: float32 {rates['before']['fp32']:.0f} -> "
             f"{rates['after']['fp32']:.0f} GFLOP/s, bf16 {rates['before']['bf16']:.0f} -> {rates['after']['bf16']:.0f} "
             "GFLOP/s (start -> end of the run)", "",
             "| work | reference | ours | ratio | target | met |", "|---|---|---|---|---|---|"]

    def row(work: str, reference: str, ours: str, ratio: str, target: str, met: bool) -> None:
        lines.append(f"| {work} | {reference} | {ours} | {ratio} | {target} | {'yes' if met else 'no'} |")

    for r in results.get("train", []):
        mfu_target = TARGETS["mfu_fp32" if r["precision"] == "fp32" else "mfu_bf16"]
        row(f"train {r['kind'].upper()} {r['precision']} (tokens/s)", f"{r['reference_tokens_per_s']:,}",
            f"{r['tokens_per_s']:,.0f} (MFU {r['mfu']:.0%})", f"{r['speedup']:.2f}x",
            f">= {TARGETS['train_speedup']}x, MFU >= {mfu_target:.0%}",
            r["speedup"] >= TARGETS["train_speedup"] and r["mfu"] >= mfu_target)
    for r in results.get("sample", []):
        limit = TARGETS["sample_fp32_s" if r["precision"] == "fp32" else "sample_bf16_s"]
        reference = r["reference_seconds"]
        row(f"sample {r['sampler']} ({r['model'].upper()}), 128 steps, {r['precision']}",
            f"{REFERENCE_NAMES[r['sampler']]} {reference} s" if reference else "-",
            f"{r['seconds']:.1f} s ({r['nfe']} calls; {r['floor_ratio']:.2f}x its matmul floor)",
            f"{reference / r['seconds']:.2f}x" if reference else "-",
            f"<= {limit:.0f} s", r["seconds"] <= limit)
    if "cache" in results:
        r = results["cache"]
        same = r.get("same_tokens")
        row(f"exact cache, {r['steps']} steps, fp32", f"MDLM ddpm_cache {r['reference_seconds']:.0f} s",
            f"{r['seconds']:.1f} s ({r['nfe']} calls; uncached {r.get('uncached_seconds', float('nan')):.0f} s, "
            f"same tokens: {same})", f"{r['reference_seconds'] / r['seconds']:.2f}x",
            f"<= {TARGETS['cache_fp32_s']:.0f} s, same tokens", r["seconds"] <= TARGETS["cache_fp32_s"] and bool(same))
    if "decode" in results:
        r = results["decode"]
        row(f"threshold 0.9 + dual KV vs semi-AR, {r['length']} tokens, {r['precision']} (random weights)", "-",
            f"{r['threshold_kv_seconds']:.1f} s vs {r['semi_ar_seconds']:.1f} s "
            f"({r['threshold_kv_nfe']} vs {r['semi_ar_nfe']} calls)", f"{r['speedup']:.2f}x",
            f">= {TARGETS['decode_speedup']:.0f}x", r["speedup"] >= TARGETS["decode_speedup"])
    if "quality" in results:
        q = results["quality"]
        fast, semi = q["threshold 0.9 + dual KV"], q["semi-AR"]
        row(f"same, trained model, {q['length']} tokens, block {q['block']}", "-",
            f"{fast['seconds']:.2f} s vs {semi['seconds']:.2f} s; gen-ppl {semi['gen_ppl']:.0f} -> {fast['gen_ppl']:.0f} "
            f"({q['gen_ppl_change']:+.1%})", f"{q['speedup']:.2f}x", f">= {TARGETS['decode_speedup']:.0f}x",
            q["speedup"] >= TARGETS["decode_speedup"])
        b = q["bf16"]
        lines += ["", f"bf16 autocast against float32 on the trained model: held-out negative ELBO {b['nelbo_fp32']:.4f} -> "
                      f"{b['nelbo_bf16']:.4f} nats/token ({b['nelbo_relative_change']:+.3%}); per-token log-probabilities "
                      f"differ by {b['log_prob_abs_diff_mean']:.4f} on average (max {b['log_prob_abs_diff_max']:.3f}); "
                      f"ancestral samples under one seed agree on {b['ancestral_token_agreement']:.1%} of tokens (one "
                      "different draw changes every later step's context)"]
    return "\n".join(lines)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad arguments before any work, naming the flag and its value."""
    unknown = [p for p in args.parts.split(",") if p not in ("train", "sample", "cache", "decode")]
    if unknown:
        parser.error(f"--parts {args.parts!r}: unknown part(s) {unknown}; valid: train, sample, cache, decode")
    for flag in ("train_steps", "threads", "cache_steps", "decode_length", "quality_length"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if (args.decode_model is None) != (args.scorer is None):
        parser.error("--decode-model and --scorer go together: pass both or neither")
    for flag in ("decode_model", "scorer"):
        folder = getattr(args, flag)
        if folder is not None and not (Path(folder) / "config.json").is_file():
            parser.error(f"--{flag.replace('_', '-')} {folder!r} is not a model folder (no config.json)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="train,sample,cache,decode", help="comma-separated subset to run")
    parser.add_argument("--train-steps", type=int, default=20, help="timed training steps (after 5 warm-up steps)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa",
                        help="attention implementation for training (sdpa uses the matmul form when training on a CPU)")
    parser.add_argument("--cache-steps", type=int, default=1024, help="steps of the exact-cache comparison")
    parser.add_argument("--no-verify", action="store_true", help="skip the uncached run of the cache part (slow)")
    parser.add_argument("--decode-length", type=int, default=256, help="tokens per sequence in the decode part")
    parser.add_argument("--decode-model", help="a trained masked-diffusion model folder for the decode quality rows")
    parser.add_argument("--scorer", help="a causal LM folder to score generative perplexity (with --decode-model)")
    parser.add_argument("--quality-length", type=int, default=64, help="sequence length of the quality rows")
    parser.add_argument("--json", default="bench_compare.json", help="where to write the results")
    parser.add_argument("--profile", action="store_true",
                        help="sample part: also profile each bf16 sampler (top operators by self time, in the JSON)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes and few steps: checks that the script runs")
    parser.add_argument("--single", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.train_steps, args.cache_steps, args.decode_length, args.quality_length = 1, 8, 32, 16
    if not args.single:
        check_arguments(parser, args)
    torch.set_num_threads(args.threads)

    if args.single:
        what, *rest = args.single
        if what == "train":
            kind, precision, steps, attention, threads = rest
            torch.set_num_threads(int(threads))
            print(json.dumps(time_training(kind, precision, int(steps), attention)))
        return

    parts = args.parts.split(",")
    size = 256 if SMOKE else 2048
    rates_before = {"fp32": matmul_rate(torch.float32, size), "bf16": matmul_rate(torch.bfloat16, size)}
    print(f"matmul 2048 x 2048, {args.threads} threads: float32 {rates_before['fp32']:.0f} GFLOP/s, "
          f"bf16 {rates_before['bf16']:.0f} GFLOP/s", flush=True)
    results: dict[str, Any] = {"config": {**CONFIG, "seq_len": SEQ_LEN, "batch": BATCH}, "threads": args.threads}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part, so that a failure late in the run keeps the earlier figures
        Path(args.json).write_text(json.dumps(results, indent=2))

    if "train" in parts:
        results["train"] = train_part(args, rates_before)
        save()
    if "sample" in parts:
        results["sample"] = sample_part(rates_before, args.profile)
        save()
    if "cache" in parts:
        results["cache"] = cache_part(args.cache_steps, verify=not args.no_verify)
        save()
    if "decode" in parts:
        results["decode"] = decode_part(args.decode_length, "fp32")
        save()
        if args.decode_model and args.scorer:
            results["quality"] = quality_part(args.decode_model, args.scorer, args.quality_length, 16)
        else:
            print("decode quality rows skipped: pass --decode-model and --scorer (trained by scripts/results.py)")
    rates_after = {"fp32": matmul_rate(torch.float32, size), "bf16": matmul_rate(torch.bfloat16, size)}
    results["matmul_gflops"] = {"before": rates_before, "after": rates_after}
    save()
    print()
    print(report(results))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
