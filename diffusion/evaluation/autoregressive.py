"""The autoregressive baseline: a ``transformers`` causal LM of the same width, depth and data.

:func:`build_causal_lm` makes a LLaMA-architecture model (rotary attention like the DDiT, SwiGLU MLP
sized to match the DDiT's parameter count); :class:`AutoregressiveObjective` gives it the interface of
:class:`~diffusion.objectives.DiffusionObjective` so the same training loop trains it
(``ddlm-train --objective autoregressive``).  The loss is next-token cross-entropy,
``-sum_{i >= 1} log p(x_i | x_<i)`` per block (the first token of a block has no context and is not scored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..objectives import ObjectiveOutput

__all__ = ["AutoregressiveObjective", "build_causal_lm", "causal_nll"]


def build_causal_lm(*, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, max_positions: int,
                    mlp_ratio: float = 4.0, tie_word_embeddings: bool = False, eos_token_id: int | None = None,
                    attn_implementation: str = "sdpa", trained_length: int | None = None) -> Any:
    """A randomly initialised ``LlamaForCausalLM``; its SwiGLU width ``2/3 * mlp_ratio * hidden`` (rounded to 8)
    gives the same MLP parameters as the DDiT's GELU MLP of ``mlp_ratio * hidden``; ``trained_length`` (the block
    length of its training run) is recorded in the config, as a DDiT's is."""
    from transformers import LlamaConfig, LlamaForCausalLM

    intermediate = max(8, int(round(2 * mlp_ratio * hidden_size / 3 / 8)) * 8)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=tie_word_embeddings,
                         bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=None,
                         trained_length=trained_length)
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config)


def causal_nll(model: Any, tokens: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(nll [B], count [B])``: summed ``-log p(x_i | x_<i)`` over positions 1..L-1 (float64) and how many."""
    logits = model(input_ids=tokens, attention_mask=attention_mask).logits[:, :-1].float()
    targets = tokens[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").double()
    scored = torch.ones_like(targets, dtype=torch.bool) if attention_mask is None else attention_mask[:, 1:].bool()
    nll = torch.where(scored, nll, torch.zeros_like(nll))
    return nll.sum(-1), scored.sum(-1)


@dataclass(frozen=True)
class AutoregressiveObjective:
    """Next-token cross-entropy with the ``corrupt`` / ``loss`` interface of ``DiffusionObjective``."""

    vocab_size: int

    def corrupt(self, x0: Tensor, *, t: Tensor | None = None, generator: torch.Generator | None = None,
                ) -> tuple[Tensor, Tensor]:
        """No noise: ``(zeros [B], x0)``."""
        if x0.dim() != 2:
            raise ValueError(f"x0 must be [batch, length], got shape {tuple(x0.shape)}")
        if x0.numel() and (int(x0.min()) < 0 or int(x0.max()) >= self.vocab_size):
            raise ValueError(f"x0 holds ids outside the vocabulary of {self.vocab_size} "
                             f"(min {int(x0.min())}, max {int(x0.max())})")
        return torch.zeros(x0.shape[0], device=x0.device), x0

    def loss(self, model: torch.nn.Module, x0: Tensor, xt: Tensor, t: Tensor, *,
              attention_mask: Tensor | None = None) -> ObjectiveOutput:
        nll, count = causal_nll(model, x0, attention_mask)
        num_tokens = int(count.sum())
        return ObjectiveOutput(nll.sum().float() / max(num_tokens, 1), nll.float(), t, num_tokens)

    def __call__(self, model: torch.nn.Module, x0: Tensor, **kwargs: Any) -> ObjectiveOutput:
        t, xt = self.corrupt(x0)
        return self.loss(model, x0, xt, t, attention_mask=kwargs.get("attention_mask"))
