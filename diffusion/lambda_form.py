"""The masking-probability ("lambda") form of the masked ELBO, for denoisers scored on chosen positions.

With time equal to the masking probability (:data:`~diffusion.schedules.LINEAR_MASKING`: ``alpha_t = 1 - t``,
ELBO weight ``1 / t``) the masked ELBO of the positions ``S`` a caller may mask (a completion, say) is

    -log p(x0^S | x0^{not S}) <= E_{t ~ U(0, 1)} E_{x_t} [ (1/t) sum_{i in S, x_t^i = MASK} -log p_theta(x0^i | x_t) ],

exact for a time-free denoiser (RADD), whatever schedule it was trained with.  Supervised fine-tuning (LLaDA's
recipe: the prompt is never masked) and the RL likelihood estimators use this form.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .losses import masked_elbo
from .processes import mask_tokens
from .schedules import LINEAR_MASKING
from .time_nodes import sample_t

__all__ = ["completion_loss", "model_log_probs"]


def model_log_probs(model: Any, input_ids: Tensor, t: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """``log p_theta(x0 | x_t)`` ``[B, L, S]`` from an absorbing denoiser; the noise is passed when the model wants time.

    Positions are masked with probability t, so a time-conditioned model is told the total noise of
    :data:`~diffusion.schedules.LINEAR_MASKING` at t (``-log(1 - t)``), whatever its own schedule.  A ``subs``
    model returns these log-probabilities itself.  An absorbing ``score`` model (SEDD) returns log-scores, and at a
    masked position ``s_theta(x_t)_(i, v) = e^{-sigma_bar} / (1 - e^{-sigma_bar}) * p_theta(x0^i = v | x_t)``
    (RADD, Ou et al. 2024): the factor does not depend on v, so a log-softmax over the real tokens (MASK excluded)
    gives ``log p_theta(x0^i | x_t)`` there (the values at unmasked positions mean nothing and are never scored).
    """
    total_noise = None
    if getattr(model.config, "time_conditioning", False):
        total_noise = LINEAR_MASKING.total_noise(t.to(torch.float64).clamp(1e-4, 1 - 1e-6))
        total_noise = total_noise.to(device=input_ids.device, dtype=torch.float32)
    logits = model(input_ids=input_ids, total_noise=total_noise, attention_mask=attention_mask).logits.float()
    if getattr(model.config, "parameterization", "subs") != "score":
        return logits
    mask_id = model.config.mask_token_id
    return logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), -math.inf).log_softmax(-1)


def completion_loss(model: Any, sequences: Tensor, completion: Tensor, mask_id: int,
                    generator: torch.Generator | None = None, t_min: float = 1e-3,
                    attention_mask: Tensor | None = None) -> Tensor:
    """One-sample masked ELBO of the ``completion [B, L]`` positions of ``sequences [B, L]``, per completion token.

    ``t ~ U(t_min, 1)`` per row (stratified across the batch), each completion token masked with probability t, the
    rest (the prompt) never; returns the scalar ``sum_rows (1/t) sum_{masked} -log p / sum_rows |completion|`` (nats).
    """
    t = sample_t(sequences.shape[0], t_min=t_min, generator=generator)
    x_t, masked = mask_tokens(sequences, t, mask_id, generator=generator, where=completion)
    log_probs = model_log_probs(model, x_t.to(sequences.device), t, attention_mask)
    per_row = masked_elbo(log_probs, sequences, masked, LINEAR_MASKING.elbo_weight(t).to(log_probs.device))
    return per_row.sum() / completion.sum().clamp_min(1)
