"""Classifier-free guidance for prompt-conditioned masked models (Ho & Salimans 2022; as LLaDA evaluates it).

Each network call runs the model twice on the same canvas: conditionally (the prompt as given) and
unconditionally (the prompt positions replaced by MASK), and mixes the two in log space,

    log p_w(x0 | x_t, c) = log_softmax( u + (1 + w) (c - u) ),    c = log p(x0 | x_t, c),  u = log p(x0 | x_t),

so ``w = 0`` is the conditional model and ``w = -1`` the unconditional one; ``w > 0`` leans further toward the
prompt.  Tokens both passes rule out (log-probability -inf, the mask token of a subs model) stay ruled out.

:class:`GuidedDenoiser` wraps a model so that every sampler can use it unchanged.  A sampler's ``nfe`` counts
guided calls; each is one call of twice the rows (``batched=True``, the default) or two calls, and
:attr:`GuidedDenoiser.calls` counts the model's own calls.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import MaskedLMOutput

from diffusion.modeling_ddit import accepts_score_mask

__all__ = ["GuidedDenoiser", "guided_log_probs"]

_FLOOR = -1e4  # finite stand-in for -inf inside the mix (a token ruled out by one pass only keeps a tiny weight)


def guided_log_probs(conditional: Tensor, unconditional: Tensor, weight: float) -> Tensor:
    """``log_softmax(u + (1 + w) (c - u))`` over the last dimension; -inf where both passes give -inf."""
    c, u = conditional.float().clamp_min(_FLOOR), unconditional.float().clamp_min(_FLOOR)
    mixed = u + (1.0 + weight) * (c - u)
    impossible = torch.isneginf(conditional) & torch.isneginf(unconditional)
    return torch.log_softmax(mixed.masked_fill(impossible, -math.inf), dim=-1)


class GuidedDenoiser(nn.Module):
    """A masked (subs) denoiser whose outputs are classifier-free guided toward its prompt.

    Args:
        model: the denoiser (anything a sampler takes).
        prompt: ``BoolTensor[L]``, the canvas positions that hold the prompt (hidden in the unconditional pass);
            the same for every row, as ``ddlm-generate`` builds its canvas.
        weight: guidance weight ``w`` (finite); 0 is the conditional model, -1 the unconditional one.
        batched: run both passes as one call of twice the rows.
    """

    def __init__(self, model: nn.Module, prompt: Tensor, weight: float, batched: bool = True) -> None:
        super().__init__()
        if not (isinstance(weight, (int, float)) and math.isfinite(weight)):
            raise ValueError(f"the guidance weight must be a finite number, got weight={weight!r}")
        if prompt.dim() != 1 or prompt.dtype != torch.bool:
            raise ValueError(f"prompt must be a BoolTensor[L] of prompt positions, got {prompt.dtype} of shape "
                             f"{tuple(prompt.shape)}")
        if not bool(prompt.any()):
            raise ValueError("prompt marks no position: guidance needs a prompt to lean toward")
        self.model, self.config, self.weight, self.batched = model, model.config, float(weight), batched
        self.supports_score_mask = accepts_score_mask(model)
        self.register_buffer("prompt", prompt.clone(), persistent=False)
        self.calls = 0

    def _call(self, input_ids: Tensor, score_mask: Tensor | None, kwargs: dict[str, Any]) -> Tensor:
        self.calls += 1
        if score_mask is not None:
            return self.model(input_ids=input_ids, score_mask=score_mask, **kwargs).logits
        return self.model(input_ids=input_ids, **kwargs).logits

    def forward(self, input_ids: Tensor, score_mask: Tensor | None = None, total_noise: Tensor | None = None,
                **kwargs: Any) -> Any:
        """The guided log-probabilities, in the output type of the wrapped model (``logits`` replaced)."""
        if input_ids.shape[1] != self.prompt.shape[0]:
            raise ValueError(f"the canvas has {input_ids.shape[1]} positions, the prompt mask {self.prompt.shape[0]}")
        hidden = torch.where(self.prompt.to(input_ids.device), torch.full_like(input_ids, self.config.mask_token_id),
                             input_ids)
        extra = dict(kwargs, **({"total_noise": total_noise} if total_noise is not None else {}))
        if self.batched:
            doubled = dict(extra)
            if total_noise is not None:
                doubled["total_noise"] = torch.cat([total_noise, total_noise])
            both = self._call(torch.cat([input_ids, hidden]), None if score_mask is None else
                              torch.cat([score_mask, score_mask]), doubled)
            conditional, unconditional = both.chunk(2) if score_mask is None else both.split(
                [int(score_mask.sum())] * 2)
        else:
            conditional = self._call(input_ids, score_mask, extra)
            unconditional = self._call(hidden, score_mask, extra)
        return MaskedLMOutput(logits=guided_log_probs(conditional, unconditional, self.weight))
