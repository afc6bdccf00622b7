"""GPU benchmark: training tokens/s and MFU against the device's bf16 peak, and sampling throughput.

    python scripts/bench_gpu.py [--sizes small,base,gpt2] [--compile both] [--attention flash,efficient,math]
    torchrun --standalone --nproc_per_node N scripts/bench_gpu.py --sizes gpt2 --fsdp    # FSDP2 on N GPUs

Without a CUDA GPU it says so and exits 0 (``--device cpu --smoke`` runs the same code on the CPU at toy sizes;
``tests/test_scripts.py`` runs both).  Sizes: the built-in ``small`` (hidden 256, 4 blocks) and ``base`` (384, 6), and ``gpt2``:
GPT-2 small's shape (hidden 768, 12 blocks, 12 heads, sequence 1024, the GPT-2 vocabulary of 50,257 + MASK:
about 124M non-embedding parameters, 162M with the embedding and the untied output head), the size SEDD and MDLM
report.

Every row is bf16 autocast.  MFU is reported two ways: the conventional 6 N tokens/s (N = non-embedding
parameters) and the FLOPs actually executed (matmuls of every block, attention scores and values, and the output
head at the masked positions only, since ddlm computes it nowhere else), both over ``--peak-tflops`` (default: the
device's dense bf16 peak from a small table of data-centre GPUs, or a measured 8192^3 bf16 matmul when the device
is not in it).  For comparison, MDLM (Sahoo et al., 2024) trains this size on OpenWebText for 1M steps of
512 x 1024 tokens and reports two weeks on 8 A100s for its largest models: about 430k tokens/s, 54k per A100.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from bench_common import executed_flops, matmul_rate, time_calls, time_training_steps

SIZES = {
    "tiny": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=4097, seq_len=32),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, vocab_size=4097, seq_len=128),
    "base": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, vocab_size=4097, seq_len=128),
    "gpt2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, vocab_size=50258, seq_len=1024),
}
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a substring of the device name.
# The first key found in the name wins; other devices get a measured matmul rate.
PEAKS = {"H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
ATTENTION = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}


def device_peak(device: torch.device, given: float | None) -> tuple[float, str]:
    """(bf16 TFLOP/s, where the figure comes from)."""
    if given:
        return given, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAKS.items():
            if key in name:
                return peak, f"data sheet ({name})"
    n = 8192 if device.type == "cuda" else 1024
    rate = matmul_rate(torch.bfloat16, n, device=device, sync=lambda: _sync(device))  # GFLOP/s, as everywhere
    return rate / 1e3, f"measured {n}^3 bf16 matmul (median of 9)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(size: dict, device: torch.device) -> Any:
    from diffusion import DDiTConfig, DDiTModel

    torch.manual_seed(0)
    config = DDiTConfig(vocab_size=size["vocab_size"], hidden_size=size["hidden_size"],
                        num_hidden_layers=size["num_hidden_layers"], num_attention_heads=size["num_attention_heads"],
                        cond_dim=128, max_position_embeddings=size["seq_len"], attn_implementation="sdpa")
    return DDiTModel(config).to(device)


def train_row(name: str, size: dict, device: torch.device, batch: int, steps: int, compiled: bool, attention: str,
              fsdp: bool) -> dict:
    """Median step time of masked-ELBO training (bf16 autocast, fused AdamW) and its tokens/s."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build(size, device)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    x0 = torch.randint(0, size["vocab_size"] - 1, (batch, size["seq_len"]),
                       generator=torch.Generator().manual_seed(0)).to(device)
    with sdpa_kernel(getattr(SDPBackend, ATTENTION[attention])):
        times = time_training_steps(torch.compile(model) if compiled else model, x0, "bf16", steps,
                                    warmup=6 if compiled else 3, config=model.config, autocast=not fsdp,
                                    optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4,
                                                                fused=device.type == "cuda"),
                                    sync=lambda: _sync(device))
    seconds = statistics.median(times)
    params = sum(p.numel() for p in model.parameters())
    non_embedding = params - model.embed_tokens.weight.numel()
    world = torch.distributed.get_world_size() if fsdp else 1
    return {"part": "train", "size": name, "compile": compiled, "attention": attention,
            "fsdp_gpus": world if fsdp else 0, "batch_per_gpu": batch, "seq_len": size["seq_len"], "params": params,
            "step_s": seconds,
            "tokens_per_s": world * batch * size["seq_len"] / seconds,
            "flops_6n": 6 * non_embedding * batch * size["seq_len"],
            # t ~ U(0, 1) and the default log-linear schedule masks a fraction t: half the positions on average.
            "flops_executed": executed_flops(size, batch, 0.5)}


def sample_row(name: str, size: dict, device: torch.device, batch: int, attention: str) -> dict:
    """Tokens/s of 128-step ancestral sampling (with the exact cache) and of threshold decoding with the dual KV
    cache, bf16 autocast, random weights."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from samplers import get_sampler

    model = build(size, device).eval()
    length = min(size["seq_len"], 256)
    row = {"part": "sample", "size": name, "attention": attention, "batch": batch, "length": length}
    samplers = [("ancestral", "ancestral", {"cache": False}), ("ancestral_cached", "ancestral", {"cache": True}),
                ("threshold_dual", "threshold", {"threshold": 0.9, "block_length": 32, "kv_cache": "dual"})]
    for label, sampler, options in samplers:
        outputs = []

        def run(steps: int) -> None:
            outputs.append(get_sampler(sampler, **options).generate(
                model, batch_size=batch, length=length, num_steps=steps, generator=torch.Generator().manual_seed(0)))

        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16), \
                sdpa_kernel(getattr(SDPBackend, ATTENTION[attention])):
            run(4)  # warm-up in the measured backend: kernels, caches
            seconds = time_calls(lambda: run(128), 1, warmup=0, sync=lambda: _sync(device))[0]
        out = outputs[-1]
        row[label] = {"seconds": seconds, "calls": out.nfe, "tokens_per_s": batch * length / seconds}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,base,gpt2", help=f"comma-separated, of {sorted(SIZES)}")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per GPU per step (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row (default: %(default)s)")
    parser.add_argument("--compile", default="both", choices=["off", "on", "both"], help="torch.compile the model")
    parser.add_argument("--attention", default="flash,efficient", help=f"SDPA backends, of {sorted(ATTENTION)}")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 over the processes torchrun started")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 peak (default: looked up)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: only with --smoke")
    parser.add_argument("--json", default="bench_gpu.json", help="where to write the rows")
    parser.add_argument("--smoke", action="store_true", help="the tiny size, 2 steps: checks that the script runs")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    for name in sizes:
        if name not in SIZES:
            parser.error(f"--sizes: unknown size {name!r}; choose from {sorted(SIZES)}")
    backends = args.attention.split(",")
    for name in backends:
        if name not in ATTENTION:
            parser.error(f"--attention: unknown backend {name!r}; choose from {sorted(ATTENTION)}")
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if args.device == "cpu" and not args.smoke:
        parser.error("--device cpu is only for --smoke (scripts/bench_compare.py and bench_train.py measure the CPU)")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here (torch.cuda.is_available() is False); nothing to measure")
        return 0
    if args.smoke:
        sizes, args.steps, args.compile, backends = ["tiny"], 2, "off", ["math"]
    rank = 0
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.fsdp:
        torch.distributed.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rank = torch.distributed.get_rank()
    peak, source = device_peak(device, args.peak_tflops)
    if rank == 0:
        print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}: bf16 peak "
              f"{peak:.3g} TFLOP/s ({source})", flush=True)
    rows = []
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for name in sizes:
        for backend in backends:
            for compiled in compiles:
                row = train_row(name, SIZES[name], device, args.batch_size, args.steps, compiled, backend, args.fsdp)
                world = row["fsdp_gpus"] or 1
                row["mfu_6n"] = row["flops_6n"] / row["step_s"] / (peak * 1e12)
                row["mfu_executed"] = row["flops_executed"] / row["step_s"] / (peak * 1e12)
                rows.append(row)
                if rank == 0:
                    print(f"train {name:6s} {backend:9s} compile={str(compiled):5s} gpus={world}: "
                          f"{row['tokens_per_s']:10.0f} tokens/s, MFU {row['mfu_executed']:.1%} executed "
                          f"({row['mfu_6n']:.1%} by 6N)", flush=True)
            if not args.fsdp:
                row = sample_row(name, SIZES[name], device, args.batch_size, backend)
                rows.append(row)
                print(f"sample {name:6s} {backend:9s}: " + ", ".join(
                    f"{k} {v['tokens_per_s']:.0f} tokens/s ({v['calls']} calls)" for k, v in row.items()
                    if isinstance(v, dict)), flush=True)
    if rank == 0:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"peak_tflops": peak, "peak_source": source, "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    if args.fsdp:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
