"""Adapters that make diffusion LMs made elsewhere denoisers the samplers, likelihood code and RL can drive.

Every adapter turns a Hugging Face model that maps ``input_ids [B, L]`` to logits ``[B, L, V]`` into a
time-free absorbing denoiser with the subs parameterisation: MASK gets probability 0 and unmasked
positions carry their token, so ``logits = log p_theta(x0 | x_t)``.  The mask id may sit anywhere in the
vocabulary.

- :class:`MaskedLMAdapter`: any ``AutoModelForMaskedLM`` (BERT, ModernBERT, ...): position i predicts token i.
- :class:`DiffusionLMAdapter`: LLaDA-style models (``shift_logits=False``) and Dream-style models, which
  were initialised from an autoregressive LM and keep its alignment: the output at position i - 1 predicts
  token i (``shift_logits=True``; position 0 reuses its own output, as Dream's sampler does).
- :func:`load_denoiser` picks the right one from a folder or Hub id.  Remote code runs only when the caller
  passes ``trust_remote_code=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import MaskedLMOutput

from .modeling_ddit import subs_log_probs

__all__ = ["SHIFTED_FAMILIES", "DenoiserConfig", "DiffusionLMAdapter", "MaskedLMAdapter", "load_denoiser"]

# model_type (lower case) -> whether the family's logits are shifted by one position
SHIFTED_FAMILIES = {"llada": False, "dream": True}


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


class DiffusionLMAdapter(nn.Module):
    """A Hugging Face model with an ``input_ids -> logits`` forward as a time-free masked-diffusion denoiser.

    Args:
        model: the wrapped model; ``model(input_ids=..., attention_mask=...).logits`` has shape ``[B, L, V]``.
        mask_token_id: the id the model was trained to denoise (LLaDA: 126336, Dream: 151666, BERT: [MASK]).
        shift_logits: the output at position i - 1 predicts token i (Dream); position 0 keeps its own output.
        max_length: longest input (default: ``model.config.max_position_embeddings``).
    """

    def __init__(self, model: nn.Module, mask_token_id: int, *, shift_logits: bool = False,
                 max_length: int | None = None) -> None:
        super().__init__()
        vocab = _vocab_size(model)
        if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or not 0 <= mask_token_id < vocab:
            raise ValueError(f"mask_token_id must be an id in [0, {vocab}), got mask_token_id={mask_token_id!r}")
        max_length = max_length or getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "max_sequence_length", None)
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int (the model's config has none), got {max_length!r}")
        self.model = model
        self.shift_logits = shift_logits
        self.config = DenoiserConfig(vocab_size=vocab, mask_token_id=mask_token_id, max_position_embeddings=max_length)

    def forward(self, input_ids: Tensor, total_noise: Tensor | None = None, attention_mask: Tensor | None = None,
                **kwargs: object) -> MaskedLMOutput:
        """``input_ids [B, L] -> logits [B, L, V]`` = log p(x0 | x_t) (``total_noise`` is ignored: the model is time-free)."""
        raw = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        if self.shift_logits:
            raw = torch.cat([raw[:, :1], raw[:, :-1]], dim=1)
        return MaskedLMOutput(logits=subs_log_probs(raw, input_ids, self.config.mask_token_id))


class MaskedLMAdapter(DiffusionLMAdapter):
    """A BERT-style ``AutoModelForMaskedLM`` (position i predicts token i) as a masked-diffusion denoiser."""

    def __init__(self, model: nn.Module, mask_token_id: int, max_length: int | None = None) -> None:
        super().__init__(model, mask_token_id, shift_logits=False, max_length=max_length)


def _vocab_size(model: nn.Module) -> int:
    config = model.config
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        raise ValueError(f"cannot read vocab_size from the config of {type(model).__name__}")
    return vocab


def _mask_id_from(config: Any, tokenizer: Any, generation_config: Any) -> int | None:
    for source in (config, generation_config, tokenizer):
        value = getattr(source, "mask_token_id", None)
        if isinstance(value, int):
            return value
    return None


def load_denoiser(name_or_path: str, *, trust_remote_code: bool = False, mask_token_id: int | None = None,
                  **from_pretrained: Any) -> tuple[nn.Module, Any]:
    """(denoiser, tokenizer) for a ddit model, a LLaDA/Dream-style remote-code model or any masked LM.

    - ``model_type == "ddit"``: this toolkit's :class:`~diffusion.DDiTModel` (its own code, never the copy
      that ships with a Hub folder).
    - ``model_type`` in :data:`SHIFTED_FAMILIES` (LLaDA, Dream): ``AutoModel`` with the repository's code,
      wrapped in :class:`DiffusionLMAdapter`.  Without ``trust_remote_code=True`` this raises ``ValueError``.
    - anything else: ``AutoModelForMaskedLM`` wrapped in :class:`MaskedLMAdapter`.

    The mask id comes from ``mask_token_id``, else the config, the generation config or the tokenizer.
    """
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForMaskedLM,
        AutoTokenizer,
        GenerationConfig,
    )

    from .data import load_tokenizer

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **from_pretrained)
    _check_denoiser_family(name_or_path, config)
    family = str(getattr(config, "model_type", "")).lower()
    if family == "ddit":
        model = AutoModelForMaskedLM.from_pretrained(name_or_path, **from_pretrained)
        if mask_token_id is not None and mask_token_id != model.config.mask_token_id:
            raise ValueError(f"mask_token_id={mask_token_id} disagrees with the model's config "
                             f"(mask_token_id={model.config.mask_token_id})")
        return model.eval(), load_tokenizer(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **from_pretrained)
    try:
        generation_config = GenerationConfig.from_pretrained(name_or_path, **from_pretrained)
    except OSError:
        generation_config = None
    mask_id = mask_token_id if mask_token_id is not None else _mask_id_from(config, tokenizer, generation_config)
    if mask_id is None:
        raise ValueError(f"{name_or_path!r} names no mask token (config, generation config and tokenizer have none): "
                         "pass mask_token_id")
    if family in SHIFTED_FAMILIES:
        model = AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **from_pretrained)
        return DiffusionLMAdapter(model.eval(), mask_id, shift_logits=SHIFTED_FAMILIES[family]), tokenizer
    model = AutoModelForMaskedLM.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **from_pretrained)
    return MaskedLMAdapter(model.eval(), mask_id), tokenizer


def _check_denoiser_family(name_or_path: str, config: Any) -> None:
    """Refuse, in one line, a model that no adapter turns into a denoiser (a causal LM, say)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    family = str(getattr(config, "model_type", "")).lower()
    if family == "ddit" or family in SHIFTED_FAMILIES or family in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return
    if getattr(config, "auto_map", None) and "AutoModelForMaskedLM" in config.auto_map:
        return
    kind = ", ".join(getattr(config, "architectures", None) or []) or f"model_type {family!r}"
    causal = " (a causal LM)" if kind.endswith("ForCausalLM") else ""
    raise ValueError(f"{name_or_path!r} is a {kind}{causal}, which cannot denoise: this needs a diffusion model (ddit, "
                     "LLaDA- or Dream-style) or a masked LM (BERT-style)")
