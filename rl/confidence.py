"""The policy's own uncertainty over a completion, for RENT's unsupervised reward.

RENT (Prabhudesai et al., "Maximizing Confidence Alone Improves Reasoning", 2025) rewards a completion by the
negative mean entropy of the policy's predictions over it.  An autoregressive policy reads them off its next-token
distributions; a masked diffusion policy predicts a token only where it is masked, so here each completion token is
masked exactly once in a complementary pair of views (a Bernoulli(1/2) half M1 of the completion masked in view 1,
the rest in view 2; two network calls):

    H(y) = (1/|y|) sum_{k in y} H(p_theta(. | view masking k)),   H(p) = -sum_v p_v log p_v,

over the completion's counted tokens (up to and including the first EOS).  Unlike the fully masked view, both views
hold half of the sampled completion, so completions of the same prompt get different values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffusion.lambda_form import model_log_probs
from diffusion.losses import categorical_entropy
from diffusion.processes import mask_tokens

__all__ = ["completion_entropy"]


@torch.no_grad()
def completion_entropy(model: Any, sequences: Tensor, layout: Tensor, counted: Tensor, mask_id: int,
                       generator: torch.Generator | None = None) -> Tensor:
    """``[B]`` float64 mean predictive entropy (nats) over each row's counted completion tokens.

    Args:
        model: a subs denoiser.
        sequences: ``[B, L]`` prompt then completion.
        layout: ``[B, L]`` bool, the completion positions (the same number per row).
        counted: ``[B, Lc]`` bool over the completion, the tokens that count (each row at least one).
        mask_id: the MASK token.
        generator: draws the half masked in the first view.
    """
    if not bool(counted.any(-1).all()):
        raise ValueError("every row needs at least one counted completion token")
    device = next(model.parameters()).device
    half = torch.full((len(sequences),), 0.5, dtype=torch.float64)
    _, first = mask_tokens(sequences, half, mask_id, generator=generator, where=layout)
    entropy = torch.zeros(sequences.shape, dtype=torch.float64)
    for masked in (first, layout & ~first):
        view = torch.where(masked, torch.full_like(sequences, mask_id), sequences)
        log_probs = model_log_probs(model, view.to(device), half.to(device))
        per_position = categorical_entropy(log_probs.float().softmax(-1)).cpu()
        entropy = torch.where(masked, per_position, entropy)
    completion = entropy[layout].view(len(sequences), -1)
    weights = counted.double()
    return (completion * weights).sum(-1) / weights.sum(-1)
