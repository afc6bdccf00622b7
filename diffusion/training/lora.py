"""LoRA (Hu et al. 2022) through peft: low-rank adapters on chosen Linear layers, the rest frozen."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["default_lora_targets", "merged", "wrap_lora"]


def default_lora_targets(model: nn.Module) -> list[str]:
    """The names of every Linear layer of ``model`` but the output head (``lm_head``, ``*head*``)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    return sorted(n for n in names if "head" not in n)


def wrap_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str], seed: int = 0) -> nn.Module:
    """``model`` with LoRA adapters on the Linear layers named in ``targets``; only they train.

    The adapters' initial weights are drawn from a generator seeded with ``seed`` (the caller's global RNG state is
    given back untouched), so a run and its resumption start from the same adapters.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("LoRA needs peft: pip install peft") from err
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"lora_targets {missing} name no Linear layer of {type(model).__name__}; it has {sorted(names)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                                lora_dropout=0.0))


def merged(model: nn.Module) -> nn.Module:
    """The plain model with its LoRA adapters folded into the weights (a copy; ``model`` itself is unchanged); a model
    without adapters is returned as it is."""
    if not hasattr(model, "merge_and_unload"):
        return model
    return copy.deepcopy(model).merge_and_unload()
