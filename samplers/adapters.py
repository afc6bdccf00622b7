"""Adapters that let the samplers drive masked LMs made elsewhere.

:class:`MaskedLMAdapter` wraps any ``transformers`` ``AutoModelForMaskedLM`` (BERT, ModernBERT, ...) as
a time-free absorbing denoiser with the subs parameterisation: MASK gets probability 0 and unmasked
positions carry their token.  The mask id may sit anywhere in the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn
from transformers.modeling_outputs import MaskedLMOutput

from diffusion.modeling_ddit import subs_log_probs

__all__ = ["DenoiserConfig", "MaskedLMAdapter"]


@dataclass(frozen=True)
class DenoiserConfig:
    """What a sampler reads from a model's config."""

    vocab_size: int
    mask_token_id: int | None
    max_position_embeddings: int
    process: str = "absorbing"
    parameterization: str = "subs"
    time_conditioning: bool = False
    schedule: str = "loglinear"
    schedule_kwargs: dict = field(default_factory=lambda: {"eps": 1e-3})


class MaskedLMAdapter(nn.Module):
    """A Hugging Face masked LM as a time-free masked-diffusion denoiser.

    Args:
        model: an ``AutoModelForMaskedLM`` model.
        mask_token_id: its tokenizer's mask id (``tokenizer.mask_token_id``).
        max_length: longest input (default: ``model.config.max_position_embeddings``).
    """

    def __init__(self, model: nn.Module, mask_token_id: int, max_length: int | None = None) -> None:
        super().__init__()
        vocab = model.config.vocab_size
        if not isinstance(mask_token_id, int) or not 0 <= mask_token_id < vocab:
            raise ValueError(f"mask_token_id must be an id in [0, {vocab}), got mask_token_id={mask_token_id!r}")
        self.model = model
        self.config = DenoiserConfig(
            vocab_size=vocab, mask_token_id=mask_token_id,
            max_position_embeddings=max_length or model.config.max_position_embeddings,
        )

    def forward(self, input_ids: Tensor, sigma: Tensor | None = None, attention_mask: Tensor | None = None,
                **kwargs: object) -> MaskedLMOutput:
        """``input_ids [B, L] -> logits [B, L, V]``: log p(x0 | x_t) (sigma is ignored: the model is time-free)."""
        raw = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        return MaskedLMOutput(logits=subs_log_probs(raw, input_ids, self.config.mask_token_id))
