"""Exponential moving average of model parameters (float32 shadows), for evaluation and sampling."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """``shadow <- d_k * shadow + (1 - d_k) * param`` after optimizer step k, ``d_k = min(decay, (1 + k) / (10 + k))``.

    The warm-up of ``d_k`` keeps short runs from averaging in their random initial weights (with a fixed
    0.999, the initial weights would still weigh 0.999^600 = 55% after 600 steps).  Shadows are float32
    copies keyed by parameter name (tied parameters appear once).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got decay={decay!r}")
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters()
        }

    @property
    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (in its own dtype)."""
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name].to(p.dtype))

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block ``model`` holds the averaged weights; afterwards its own, restored bit for bit."""
        backup = [p.detach().clone() for p in model.parameters()]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, saved in zip(model.parameters(), backup):
                    p.copy_(saved)

    def state_dict(self) -> dict[str, Tensor]:
        """The shadows; ``num_updates`` travels separately (see :meth:`load_state_dict`)."""
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor], num_updates: int) -> None:
        self.num_updates = int(num_updates)
        missing, unexpected = set(self.shadow) - set(state), set(state) - set(self.shadow)
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        for name, value in state.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"EMA tensor {name!r} has shape {tuple(value.shape)}, model has {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(value)
