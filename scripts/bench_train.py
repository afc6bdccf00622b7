"""Training throughput benchmark: tokens/s, model-FLOPs utilisation and peak memory at a few model sizes.

    python scripts/bench_train.py [--steps 10] [--batch-size 8] [--seq-len 128] [--json bench_train.json]
    python scripts/bench_train.py --sizes medium --distributed none,ddp,fsdp --gradient-checkpointing both

Every configuration runs in its own subprocess (``torch.distributed.run`` with 2 ranks for ``ddp`` and
``fsdp``) so that its peak resident memory is its own.  One process uses all ``--threads``; two ranks use
half each, so the machine does the same work either way.  The float32 and bfloat16 matmul rates (2048 x
2048, the same threads) are measured in the same run, and MFU = 6 x parameters x tokens/s / matmul rate,
with all parameters and with non-embedding ones.  One step = forward + backward of the masked-diffusion
loss + AdamW, as in training; ``--batch-size`` is per rank.
"""

from __future__ import annotations

import argparse
import json
import os
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


def run_one(size: str, precision: str, steps: int, batch_size: int, seq_len: int, attention: str,
            distributed: str = "none", checkpointing: bool = False) -> dict:
    """One configuration in this process (one rank of ``distributed``); the main rank returns the row."""
    import torch.distributed as dist

    from diffusion import DDiTConfig, DDiTModel

    rank, world = 0, 1
    if distributed != "none":
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = DDiTConfig(vocab_size=4097, cond_dim=128, max_position_embeddings=seq_len, attn_implementation=attention,
                        **SIZES[size])
    model = DDiTModel(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed_tokens.weight.numel() + (0 if config.tie_word_embeddings else model.lm_head.weight.numel())
    if checkpointing:
        model.gradient_checkpointing_enable() if not hasattr(model, "activation_checkpointing_enable") \
            else model.activation_checkpointing_enable()
    autocast = precision == "bf16"
    if distributed == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif distributed == "fsdp":
        from diffusion.training.distributed import shard_model

        shard_model(model, torch.device("cpu"), bf16=precision == "bf16")
        autocast = False  # FSDP's mixed-precision policy casts the weights itself
    x0 = torch.randint(0, 4096, (batch_size, seq_len), generator=torch.Generator().manual_seed(rank))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times = time_training_steps(model, x0, precision, steps, warmup=3, config=config, autocast=autocast,
                                optimizer=optimizer)
    step_s = statistics.median(times)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731  (this rank's shard)
    state_bytes = sum(local(p).numel() * local(p).element_size() for p in model.parameters())  # weights
    state_bytes += sum(local(p.grad).numel() * local(p.grad).element_size() for p in model.parameters()
                       if p.grad is not None)
    state_bytes += sum(local(v).numel() * local(v).element_size() for entry in optimizer.state.values()
                       for v in entry.values() if torch.is_tensor(v) and v.dim() > 0)  # AdamW's moments
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks = [peak]
    if distributed != "none":
        peaks = [None] * world
        dist.all_gather_object(peaks, peak)
        dist.barrier()  # no destroy_process_group(): with gloo it can wait forever for a rank that already left
    return {
        "size": size, "precision": precision, "distributed": distributed, "gradient_checkpointing": checkpointing,
        "ranks": world, "params": total, "non_embedding_params": total - embedding, "step_s": step_s,
        "tokens_per_s": world * batch_size * seq_len / step_s, "peak_rss_mb": max(peaks),
        "peak_rss_mb_per_rank": peaks, "train_state_mb_per_rank": state_bytes / 2**20,
    } if rank == 0 else {}


def _single_command(args: argparse.Namespace, size: str, precision: str, distributed: str, checkpointing: bool,
                    threads: int) -> list[str]:
    command = [__file__, "--single", size, precision, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--threads", str(threads), "--attention", args.attention,
               "--distributed", distributed, "--gradient-checkpointing", "on" if checkpointing else "off"]
    if distributed == "none":
        return [sys.executable, *command]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (after 3 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per rank and step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sizes", default="small,base,medium", help=f"comma-separated, from {list(SIZES)}")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--distributed", default="none",
                        help="comma-separated: none (one process), ddp and fsdp (two ranks each)")
    parser.add_argument("--gradient-checkpointing", choices=("off", "on", "both"), default="off")
    parser.add_argument("--threads", type=int, default=2, help="threads of the machine (two ranks get half each)")
    parser.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa", help="attention implementation")
    parser.add_argument("--json", default="bench_train.json", help="where to write the results")
    parser.add_argument("--smoke", action="store_true", help="a toy size, one step, the first precision: checks that the script runs in every mode asked for")
    parser.add_argument("--single", nargs=2, metavar=("SIZE", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:  # every distributed mode still runs; one precision, and checkpointing on if asked for at all
        args.sizes, args.steps, args.batch_size, args.seq_len = "tiny", 1, 2, 16
        args.precisions = args.precisions.split(",")[0]
        args.gradient_checkpointing = "on" if args.gradient_checkpointing == "both" else args.gradient_checkpointing
    torch.set_num_threads(args.threads)

    if args.single:
        row = run_one(args.single[0], args.single[1], args.steps, args.batch_size, args.seq_len, args.attention,
                      args.distributed, args.gradient_checkpointing == "on")
        if row:
            print(json.dumps(row))
        if args.distributed != "none":  # gloo's threads can abort a normal interpreter exit ("terminate called
            sys.stdout.flush()  # without an active exception"); the work is done and printed, so leave at once
            sys.stderr.flush()
            os._exit(0)
        return

    sizes, precisions = args.sizes.split(","), args.precisions.split(",")
    modes = args.distributed.split(",")
    for name, values, valid in (("--sizes", sizes, list(SIZES)), ("--precisions", precisions, ["fp32", "bf16"]),
                                ("--distributed", modes, ["none", "ddp", "fsdp"])):
        unknown = [v for v in values if v not in valid]
        if unknown:
            parser.error(f"unknown {name} {unknown}; valid: {valid}")
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]
    rates = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    rows = []
    for size in sizes:
        for precision in precisions:
            for mode in modes:
                for ckpt in checkpointing:
                    threads = args.threads if mode == "none" else max(1, args.threads // 2)
                    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                    result = subprocess.run(_single_command(args, size, precision, mode, ckpt, threads),
                                            capture_output=True, text=True, env=env)
                    if result.returncode != 0:
                        sys.stderr.write(result.stderr[-4000:])
                        sys.exit(f"bench_train: the {size} {precision} {mode} run (gradient checkpointing {ckpt}) "
                                 f"failed with exit code {result.returncode}; its stderr is above")
                    row = json.loads(result.stdout.strip().splitlines()[-1])
                    flops = 6 * row["tokens_per_s"]
                    row["mfu"] = flops * row["params"] / (rates[precision] * 1e9)
                    row["mfu_non_embedding"] = flops * row["non_embedding_params"] / (rates[precision] * 1e9)
                    rows.append(row)
                    print(f"{size} {precision} {mode}{' +ckpt' if ckpt else ''}: {row['tokens_per_s']:.0f} tokens/s, "
                          f"peak {row['peak_rss_mb']:.0f} MB per rank, training state "
                          f"{row['train_state_mb_per_rank']:.0f} MB per rank", flush=True)

    print(f"\nmatmul 2048x2048, {args.threads} threads: float32 {rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} GFLOP/s")
    print(f"batch {args.batch_size} x {args.seq_len} tokens per rank, masked-diffusion loss, AdamW, {args.attention} "
          f"attention, median of {args.steps} steps\n")
    header = (f"{'size':<7} {'prec':<5} {'dist':<5} {'ckpt':<4} {'params':>8} {'non-emb':>8} {'step s':>7} "
              f"{'tokens/s':>9} {'MFU':>6} {'MFU non-emb':>11} {'peak MB/rank':>12} {'state MB/rank':>13}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['size']:<7} {r['precision']:<5} {r['distributed']:<5} {'on' if r['gradient_checkpointing'] else 'off':<4} "
              f"{r['params'] / 1e6:>7.2f}M {r['non_embedding_params'] / 1e6:>7.2f}M {r['step_s']:>7.3f} "
              f"{r['tokens_per_s']:>9.0f} {r['mfu']:>6.1%} {r['mfu_non_embedding']:>11.1%} {r['peak_rss_mb']:>12.0f} "
              f"{r['train_state_mb_per_rank']:>13.0f}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"matmul_gflops": rates, "threads": args.threads, "attention": args.attention, "batch_size": args.batch_size,
                   "seq_len": args.seq_len, "rows": rows}, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
