"""Turn an autoregressive (causal) LM into a masked-diffusion denoiser, without touching the model's code.

The recipe of DiffuLLaMA (Gong et al., "Scaling Diffusion Language Models via Adaptation from Autoregressive
Models", ICLR 2025) and Dream 7B (Ye et al. 2025):

1. **A MASK token.**  Added to the tokenizer with a new embedding row (and output-head row when the head is not
   tied), set to the mean of the other rows; or an id the tokenizer already reserves (its own mask token, a
   reserved special token, a padding row past its last id).  An id that text can produce is refused.  The MASK
   row is mean-initialised in both cases; every other weight is kept.
2. **Attention** made bidirectional (or block-causal, for block diffusion) by passing the model a 4-D additive
   ``attention_mask``; optionally annealed from causal over the first ``anneal_steps`` training steps
   (:func:`~diffusion.attention_patterns.annealed_causal`).
3. **Logit shift** (on by default): the output at position i - 1 predicts token i, the alignment the
   next-token head was trained with, so training starts from the AR model's predictions rather than against them.

The result is a :class:`~diffusion.adapters.DiffusionLMAdapter`; its ``save_pretrained`` writes the causal LM's
own folder plus :data:`~diffusion.adapters.CONVERTED_FILE`, which :func:`~diffusion.adapters.load_denoiser` reads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapters import DiffusionLMAdapter, read_converted
from .weights import load_weights_checked

__all__ = ["DEFAULT_MASK_TOKEN", "choose_mask_id", "convert_causal_lm", "is_causal_lm_config", "load_causal_lm"]

DEFAULT_MASK_TOKEN = "<|mdm_mask|>"


def is_causal_lm_config(config: Any) -> bool:
    """Whether the config describes a causal LM that ``AutoModelForCausalLM`` builds (built-in family or remote code).

    Encoder families that also have a decoder head (BERT's ``BertLMHeadModel``) count only when configured as
    decoders (``is_decoder``): a BERT trained as a masked LM is not an autoregressive model.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    family = str(getattr(config, "model_type", "")).lower()
    if family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return family not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or bool(getattr(config, "is_decoder", False))
    return bool(getattr(config, "auto_map", None) and "AutoModelForCausalLM" in config.auto_map)


def load_causal_lm(name_or_path: str, *, trust_remote_code: bool = False, **from_pretrained: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a causal LM folder or Hub id; a one-line ``ValueError`` for anything else."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if read_converted(name_or_path, **from_pretrained) is not None:
        raise ValueError(f"{name_or_path!r} is already a converted diffusion model: train it with --init-from as it is")
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **from_pretrained)
    if not is_causal_lm_config(config):
        kind = ", ".join(getattr(config, "architectures", None) or []) or f"model_type {config.model_type!r}"
        raise ValueError(f"{name_or_path!r} is a {kind}, which has no causal-LM head: conversion needs a model that "
                         "AutoModelForCausalLM loads (LLaMA, Qwen2/3, GPT-2, ...)")
    model = load_weights_checked(AutoModelForCausalLM, name_or_path, trust_remote_code=trust_remote_code,
                                 **from_pretrained)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **from_pretrained)
    return model, tokenizer


def _check_reserved(mask_id: int, tokenizer: Any, rows: int) -> None:
    """Refuse a mask id outside the embedding or one that text tokenizes to (see the module docstring)."""
    if isinstance(mask_id, bool) or not isinstance(mask_id, int) or not 0 <= mask_id < rows:
        raise ValueError(f"mask_token_id must be an id in [0, {rows}) (the model's embedding rows), "
                         f"got mask_token_id={mask_id!r}")
    if mask_id >= len(tokenizer):
        return  # a padding row no text reaches
    named = {"eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id, "pad": tokenizer.pad_token_id,
             "unk": tokenizer.unk_token_id}
    for role, value in named.items():
        if value == mask_id:
            raise ValueError(f"mask_token_id={mask_id} is the tokenizer's {role} token: it would be both a real token "
                             "and the MASK")
    token = tokenizer.convert_ids_to_tokens(mask_id)
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(mask_id)
    if mask_id == tokenizer.mask_token_id or mask_id in tokenizer.all_special_ids or bool(getattr(added, "special",
                                                                                                  False)):
        return
    raise ValueError(f"mask_token_id={mask_id} collides with the real token {token!r}: choose a reserved special token, "
                     f"an id past the tokenizer's {len(tokenizer)}, or let the converter add a mask token")


def choose_mask_id(model: nn.Module, tokenizer: Any, *, mask_token: str = DEFAULT_MASK_TOKEN,
                   mask_token_id: int | None = None) -> int:
    """The MASK id, adding ``mask_token`` to the tokenizer (and a row to the model) when none is given or reserved.

    ``mask_token_id`` given: it is checked (:func:`_check_reserved`).  Otherwise the tokenizer's own mask token,
    if it has one; otherwise ``mask_token`` is added as a special token (refused if it is already a real token) and
    the embeddings (and an untied head) grow to hold its id.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if mask_token_id is not None:
        _check_reserved(mask_token_id, tokenizer, rows)
        return mask_token_id
    if tokenizer.mask_token_id is not None:
        _check_reserved(tokenizer.mask_token_id, tokenizer, rows)
        return tokenizer.mask_token_id
    existing = tokenizer.convert_tokens_to_ids(mask_token)
    if isinstance(existing, int) and existing != tokenizer.unk_token_id and existing < len(tokenizer):
        raise ValueError(f"mask_token={mask_token!r} is already the real token {existing} of the tokenizer: choose "
                         "another string")
    tokenizer.add_special_tokens({"mask_token": mask_token})
    mask_id = tokenizer.mask_token_id
    if mask_id >= rows:
        model.resize_token_embeddings(mask_id + 1, mean_resizing=False)  # the new row is set by _mean_init
    return mask_id


@torch.no_grad()
def _mean_init(model: nn.Module, mask_id: int) -> None:
    """Row ``mask_id`` of the input embedding (and of an untied output head) := the mean of the other rows."""
    tables = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != tables[0].data_ptr():
        tables.append(head.weight)
    for weight in tables:
        others = torch.cat([weight[:mask_id], weight[mask_id + 1 :]])
        weight[mask_id] = others.float().mean(0).to(weight.dtype)


def convert_causal_lm(model: nn.Module, tokenizer: Any, *, mask_token: str = DEFAULT_MASK_TOKEN,
                      mask_token_id: int | None = None, shift_logits: bool = True, attention: str = "bidirectional",
                      block_size: int | None = None, anneal_steps: int = 0) -> tuple[DiffusionLMAdapter, Any]:
    """A causal LM as a masked-diffusion denoiser (see the module docstring); ``tokenizer`` gains the mask token.

    Args:
        model: a Hugging Face causal LM (``logits [B, L, V]`` from ``input_ids`` and a 4-D ``attention_mask``).
        tokenizer: its tokenizer.
        mask_token, mask_token_id: see :func:`choose_mask_id`.
        shift_logits: the output at i - 1 predicts token i.
        attention: ``bidirectional``, ``block`` (with ``block_size``: block diffusion) or ``causal``.
        anneal_steps: training steps over which the attention goes from causal to ``attention``.
    """
    if attention == "block" and shift_logits:
        raise ValueError("attention='block' needs shift_logits=False: a shifted output at a block's first position "
                         "would come from the previous block")
    mask_id = choose_mask_id(model, tokenizer, mask_token=mask_token, mask_token_id=mask_token_id)
    _mean_init(model, mask_id)
    model.config.mask_token_id = mask_id
    eos = tokenizer.eos_token_id
    adapter = DiffusionLMAdapter(model, mask_id, shift_logits=shift_logits, attention=attention,
                                 block_size=block_size, anneal_steps=anneal_steps,
                                 eos_token_id=eos if isinstance(eos, int) else None)
    return adapter, tokenizer
