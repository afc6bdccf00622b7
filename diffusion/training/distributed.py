"""How a run spreads over processes: one process, DDP, or FSDP2 (parameters, gradients and optimizer state sharded).

``--distributed`` chooses; the launcher (``torchrun``, ``accelerate launch``) only starts the processes:

- ``none``: one process.
- ``ddp``: every rank holds the whole model; gradients are averaged (accelerate's DistributedDataParallel).
- ``fsdp``: ``torch.distributed.fsdp.fully_shard`` on every transformer block (the model's ``_no_split_modules``)
  and on the root (embeddings, head): each rank keeps 1/world of the weights, gradients and AdamW states and
  gathers a block's weights for its forward and backward.  The same code runs on CPU ranks (gloo) and GPUs
  (NCCL), so a CPU test exercises the sharding, checkpointing and EMA of a GPU run.  bf16 precision is FSDP's
  mixed-precision policy (fp32 master weights, bf16 compute, fp32 gradient reduction) instead of autocast.
- ``auto``: ``ddp`` when launched with several processes, else ``none``.

:func:`clip_gradients` returns the global gradient norm however the gradients are sharded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DISTRIBUTED", "clip_gradients", "end_distributed", "resolve_distributed", "shard_model"]

DISTRIBUTED = ("auto", "none", "ddp", "fsdp")


def resolve_distributed(mode: str, world_size: int) -> str:
    """The mode a run uses (``none``, ``ddp`` or ``fsdp``); refuses a mode that does not fit the launch."""
    if mode not in DISTRIBUTED:
        raise ValueError(f"distributed must be one of {list(DISTRIBUTED)}, got distributed={mode!r}")
    if mode == "auto":
        return "ddp" if world_size > 1 else "none"
    if mode in ("ddp", "fsdp") and world_size < 2:
        raise ValueError(f"distributed={mode!r} needs at least 2 processes, this run has {world_size}: launch it with "
                         "torchrun --nproc_per_node N or accelerate launch --num_processes N (or use --distributed none)")
    if mode == "none" and world_size > 1:
        raise ValueError(f"distributed='none' runs one process, but {world_size} were launched: use ddp or fsdp")
    return mode


def shard_model(model: nn.Module, device: torch.device, bf16: bool) -> nn.Module:
    """``fully_shard`` every block (``model._no_split_modules``) and then the root, in place; returns ``model``.

    With ``bf16`` the blocks compute in bfloat16 from fp32 master weights and reduce gradients in fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    block_types = set(getattr(model, "_no_split_modules", None) or [])
    if not block_types:
        raise ValueError(f"{type(model).__name__} names no blocks to shard (_no_split_modules is empty)")
    blocks = [m for m in model.modules() if type(m).__name__ in block_types]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no module of the types {sorted(block_types)} to shard")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Clip to ``max_norm`` (``inf``: only measure) and return the global 2-norm of the gradients.

    Sharded (DTensor) gradients give a partial norm per rank; it is completed across ranks before the clip and
    before anyone decides whether the step is finite.
    """
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(total, "full_tensor"):  # a DTensor: sum the shards' squares across ranks
        total = total.full_tensor()
    if not math.isinf(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def full_state(tensors: dict[str, Any]) -> dict[str, Tensor]:
    """Whole CPU tensors from a state dict of (possibly sharded) tensors; every rank must call it."""
    out = {}
    for name, value in tensors.items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[name] = value.detach().cpu()
    return out


_FINAL_BARRIERS: list[Any] = []  # see end_distributed: kept until the interpreter exits


def end_distributed(accelerator: Any) -> None:
    """End a run's use of the process group: on several ranks a last barrier, then ``accelerator.end_training()``.

    Why the barrier's handle is kept: gloo's worker thread lets go of a finished collective just after the
    waiting rank wakes.  When the worker holds the last reference, freeing the collective's tensors needs the
    GIL, while the main thread, holding the GIL, may already be freeing DDP's reducer, whose process group
    joins that worker thread: a deadlock after the run's last line (about one two-rank run in ten on a loaded
    2-core machine).  With the handle kept here the main thread frees the last barrier; the short sleep lets a
    worker still freeing an earlier collective take the GIL first.
    """
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        work = torch.distributed.barrier(async_op=True)
        work.wait()
        _FINAL_BARRIERS.append(work)
        time.sleep(0.05)
    accelerator.end_training()
