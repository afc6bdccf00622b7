"""Supervised warm-up on prompt/completion pairs, so that RL starts from a model that sometimes succeeds.

LLaDA-style SFT: the prompt is never masked; each completion token is masked with probability t,
``t ~ U(t_min, 1)`` per row, and the loss is the masked ELBO with the linear schedule,
``E_t[(1/t) sum_{k masked} -log p_theta(y_k | q, y_t)] / |y|`` (nats per completion token).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffusion.losses import masked_elbo
from diffusion.processes import mask_tokens
from diffusion.schedules import LINEAR_MASKING
from diffusion.time_nodes import sample_t

from .estimators import model_log_probs

__all__ = ["sft_loss", "supervised_warmup"]


def sft_loss(model: nn.Module, sequences: Tensor, completion: Tensor, mask_id: int,
             generator: torch.Generator | None = None, t_min: float = 1e-3) -> Tensor:
    """Masked-diffusion SFT loss on the completion tokens, averaged per completion token.

    ``sequences [B, L]`` (prompt then completion), ``completion [B, L]`` bool; returns a scalar (nats per
    completion token): :func:`diffusion.losses.masked_elbo` at ``t ~ U(t_min, 1)`` masking the completion only.
    """
    t = sample_t(sequences.shape[0], t_min=t_min, generator=generator)
    x_t, masked = mask_tokens(sequences, t, mask_id, generator=generator, where=completion)
    log_probs = model_log_probs(model, x_t, t)
    per_row = masked_elbo(log_probs, sequences, masked, LINEAR_MASKING.elbo_weight(t))
    return per_row.sum() / completion.sum().clamp_min(1)


def supervised_warmup(model: nn.Module, batches: Callable[[torch.Generator], tuple[Tensor, Tensor]], *, steps: int,
                      lr: float = 3e-3, seed: int = 0, progress: bool = True) -> list[float]:
    """``steps`` AdamW steps on ``batches(generator) -> (sequences, completion)``; returns the losses."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got steps={steps}")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in tqdm(range(steps), disable=not progress, desc="sft"):
        sequences, completion = batches(generator)
        loss = sft_loss(model, sequences, completion, model.config.mask_token_id, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
