"""``RunSettings``: the settings every fine-tuning run of :mod:`rl` shares (optimiser, LoRA, checkpoints, logging).

GRPO's and DPO's configurations extend it; :class:`rl.policy_run.PolicyRun` is the machinery that reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["RunSettings"]


def _help(text: str, choices: Any = None, **kw: Any) -> Any:
    return field(metadata={"help": text, "choices": choices}, **kw)


@dataclass(frozen=True)
class RunSettings:
    """Optimiser, LoRA, seeding, checkpoints and logging of a run, validated once, never changed after construction."""

    output_dir: str = _help("where checkpoints, metrics.jsonl and the final model go", default="runs/rl")
    max_steps: int = _help("steps of the run", default=100)
    lr: float = _help("AdamW learning rate", default=1e-4)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    max_grad_norm: float = _help("gradient clipping norm (0 disables)", default=1.0)
    lora_rank: int = _help("LoRA rank through peft (0: train every weight)", default=0)
    lora_alpha: float = _help("LoRA alpha", default=16.0)
    lora_targets: str = _help("comma-separated names of the Linear layers LoRA adapts",
                              default="qkv,attn_out,mlp_in,mlp_out")
    seed: int = _help("seed of every random choice: data order, rollouts, masks (each step reseeds from (seed, step))",
                      default=0)
    save_every: int = _help("checkpoint every N steps (0: only at the end)", default=50)
    keep_last: int = _help("checkpoints to keep", default=2)
    log_every: int = _help("log metrics every N steps", default=1)
    resume: str | None = _help("'auto' (latest complete checkpoint in output_dir) or a checkpoint path (None: a "
                               "fresh run)", default=None)
    progress: bool = _help("show a progress bar", default=True)

    def __post_init__(self) -> None:
        for f in fields(self):  # inf and NaN slip through comparisons: refuse them by name first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {f.name}={value!r}")
        for name in ("max_steps", "log_every", "keep_last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        for name in ("save_every", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {name}={value!r}")
        for name in ("lr", "lora_alpha"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {name}={value!r}")
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}")
        if self.lora_rank and not [t for t in self.lora_targets.split(",") if t.strip()]:
            raise ValueError(f"lora_targets names no layer, got lora_targets={self.lora_targets!r}")
