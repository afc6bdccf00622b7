"""Pieces the benchmark scripts share: the machine's matmul rate, timed calls, the timed training step and the
FLOPs a training step executes.

Both are measured the same way everywhere, so that MFU figures of different benchmarks compare.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 9, device: str | torch.device = "cpu",
                sync: Callable[[], None] | None = None) -> float:
    """Median GFLOP/s of an ``n x n`` matmul in ``dtype`` on ``device`` (after 3 warm-up products), current
    threads; ``sync`` (a GPU's synchronisation) runs around each timed product."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    return 2 * n**3 / statistics.median(time_calls(lambda: a @ b, repeats, warmup=0, sync=sync)) / 1e9


def training_step(model: Any, x0: torch.Tensor, precision: str, config: Any = None, autocast: bool | None = None,
                  optimizer: torch.optim.Optimizer | None = None) -> Callable[[], None]:
    """One training step of ``model`` on the clean tokens ``x0 [B, L]``, as a function of no arguments.

    One step = the model's diffusion objective (forward), backward and a fused AdamW step, in bf16
    autocast on ``x0``'s device when ``precision == "bf16"`` (unless ``autocast`` says otherwise: an FSDP model
    casts itself).  ``config``: the model's config when ``model`` is a wrapper (DDP, ``torch.compile``);
    ``optimizer``: the one to step (default: a fused AdamW made here).
    """
    from diffusion.objectives import DiffusionObjective

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got precision={precision!r}")
    objective = DiffusionObjective.from_config(config if config is not None else model.config)
    autocast = precision == "bf16" if autocast is None else autocast
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator(device=x0.device).manual_seed(0)  # the objective draws on x0's device

    def step() -> None:
        with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = objective(model, x0, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    return step


def time_training_steps(model: Any, x0: torch.Tensor, precision: str, steps: int, warmup: int = 5,
                        config: Any = None, autocast: bool | None = None,
                        optimizer: torch.optim.Optimizer | None = None, sync: Any = None) -> list[float]:
    """Seconds of each of ``steps`` calls of :func:`training_step` after ``warmup`` untimed ones; ``sync``: a
    device synchronisation run around each timed step (a GPU's)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got steps={steps}")
    return time_calls(training_step(model, x0, precision, config, autocast, optimizer), steps, warmup, sync)


def time_calls(step: Any, steps: int, warmup: int = 5, sync: Any = None) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step()`` after ``warmup`` untimed ones; ``sync()`` (a device
    synchronisation, say) runs before every clock reading."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if sync is not None:
            sync()
        start = time.perf_counter()
        step()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return times


def executed_flops(size: dict, batch: int, masked_fraction: float) -> float:
    """FLOPs of one training step (forward + backward = 3 forwards) as ddlm executes it.

    Per block and token: qkv 6H^2, attention output 2H^2, MLP 16H^2 (4H wide), attention scores and values
    4 L H; the output head 2 H V at the masked positions only (V real tokens; the head also pads its row count to
    a multiple of 64, at most 63 rows a call, which this leaves out).  ``tests/test_scripts.py`` checks it against
    torch's FLOP counter.
    """
    hidden, layers, length, vocab = size["hidden_size"], size["num_hidden_layers"], size["seq_len"], size["vocab_size"]
    tokens = batch * length
    blocks = layers * tokens * (24 * hidden**2 + 4 * length * hidden)
    head = 2 * hidden * (vocab - 1) * tokens * masked_fraction
    return 3 * (blocks + head)


def profile_calls(step: Callable[[], None], steps: int, warmup: int = 3, top: int = 15) -> list[dict]:
    """The ``top`` operators of ``steps`` calls of ``step()`` by self CPU time (torch.profiler, after ``warmup``
    untimed calls), each as ``{"op", "self_ms_per_call", "calls_per_call"}``, plus a row ``"total"``."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [{"op": e.key, "self_ms_per_call": e.self_cpu_time_total / 1e3 / steps, "calls_per_call": e.count / steps}
            for e in events]
    total = sum(r["self_ms_per_call"] for r in rows)
    return rows[:top] + [{"op": "total", "self_ms_per_call": total, "calls_per_call": sum(e.count for e in events) / steps}]


def sample_record(sampler: str, model: Any, reference: Any, num_samples: int, length: int, steps: int) -> dict:
    """Draw ``num_samples`` samples of ``length`` tokens with ``sampler`` at ``steps`` (seed 0) and score them:
    network calls, generative perplexity under the causal LM ``reference``, unigram entropy and seconds."""
    from diffusion.evaluation.sample_quality import generative_perplexity, unigram_entropy
    from samplers import get_sampler

    start = time.perf_counter()
    out = get_sampler(sampler).generate(model, batch_size=num_samples, length=length, num_steps=steps,
                                        generator=torch.Generator().manual_seed(0))
    return {"sampler": sampler, "steps": steps, "nfe": out.nfe, **generative_perplexity(out.tokens, reference),
            "unigram_entropy": unigram_entropy(out.tokens), "seconds": round(time.perf_counter() - start, 2)}
