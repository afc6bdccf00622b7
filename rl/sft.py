"""Supervised warm-up on prompt/completion pairs, so that RL starts from a model that sometimes succeeds.

LLaDA-style SFT on a task's synthetic pairs: the loss is :func:`diffusion.lambda_form.completion_loss` (the prompt
is never masked); ``ddlm-sft`` (:mod:`diffusion.training.sft`) is the same loss on instruction data.  A score model
(SEDD) is warmed up with its own objective, score entropy, with only the completion noised
(:func:`completion_score_loss`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffusion.lambda_form import completion_loss as sft_loss
from diffusion.objectives import DiffusionObjective

__all__ = ["MODEL_KINDS", "completion_score_loss", "sft_loss", "small_model", "supervised_warmup"]

MODEL_KINDS = ("mdlm", "sedd")


def small_model(tokenizer: Any, length: int, *, kind: str = "mdlm", hidden_size: int = 64, num_layers: int = 2,
                seed: int = 0) -> nn.Module:
    """A fresh small DDiT for a synthetic task of ``length`` tokens: ``kind="mdlm"`` a masked (absorbing, ``subs``,
    time-free) denoiser, ``"sedd"`` a uniform-process score model (geometric schedule, time-conditioned)."""
    from diffusion import DDiTConfig, DDiTModel

    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got kind={kind!r}")
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=4, cond_dim=16, max_position_embeddings=length)
    torch.manual_seed(seed)
    if kind == "mdlm":
        return DDiTModel(DDiTConfig(**common, mask_token_id=tokenizer.mask_token_id))
    return DDiTModel(DDiTConfig(**common, process="uniform", parameterization="score", schedule="geometric",
                                schedule_kwargs={"sigma_min": 1e-4, "sigma_max": 20.0}))


def completion_score_loss(model: nn.Module, sequences: Tensor, completion: Tensor,
                          generator: torch.Generator | None = None) -> Tensor:
    """The model's diffusion objective (score entropy for a SEDD model) on ``sequences [B, L]`` whose
    ``completion [B, L]`` positions are noised and the rest (the prompt) kept clean; nats per token."""
    objective = DiffusionObjective.from_config(model.config)
    t, noisy = objective.corrupt(sequences, generator=generator)
    return objective.loss(model, sequences, torch.where(completion, noisy, sequences), t).loss


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
        if getattr(model.config, "parameterization", "subs") == "score":
            loss = completion_score_loss(model, sequences, completion, generator)
        else:
            loss = sft_loss(model, sequences, completion, model.config.mask_token_id, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
