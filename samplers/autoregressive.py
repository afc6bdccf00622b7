"""Left-to-right sampling of a causal LM (the autoregressive baseline, or any ``AutoModelForCausalLM``).

The baseline is sampled exactly as Hugging Face ``generate`` samples it, so the same seed and settings give the
same tokens: ``x_i ~ p_theta(x_i | x_<i)`` after temperature, top-k and top-p, one network call per new token
(the KV cache makes each call one position).  It lives beside the diffusion samplers so that every command
that samples (``ddlm-generate``, the end of ``ddlm-train``) takes both families.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import check_filters

__all__ = ["sample_autoregressive"]


def sample_autoregressive(model: Any, prompt: Tensor, new_tokens: int, *, seed: int | None, eos_id: int,
                          temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                          stop_at_eos: bool = False) -> tuple[Tensor, Tensor]:
    """``(tokens [B, P + new_tokens], lengths [B])``: ``prompt`` ``[B, P]`` (``P >= 1``) continued by sampling.

    ``temperature = 0`` is greedy.  Without ``stop_at_eos`` exactly ``new_tokens`` are drawn from the model's
    distribution unchanged (an EOS among them starts a new document, as in the packed training stream) and every
    length is ``new_tokens``; with it a row ends at its first EOS (kept), its length counts the new tokens up to
    and including it, and the rest of the row is EOS.  The global torch generator is seeded with ``seed``, as
    ``generate`` draws from it (``seed=None`` goes on drawing from it: the next batch of one seeded stream).
    """
    from transformers import GenerationConfig

    check_filters(temperature, top_k, top_p)
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, length >= 1] token ids, got shape {tuple(prompt.shape)}")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got new_tokens={new_tokens}")
    sampling = {"do_sample": False} if temperature == 0 else {
        "do_sample": True, "temperature": float(temperature), "top_k": top_k or 0, "top_p": top_p or 1.0}
    config = GenerationConfig(max_new_tokens=new_tokens, pad_token_id=eos_id,
                              eos_token_id=eos_id if stop_at_eos else None, **sampling)
    # generate() fills every field left None from the model's own generation_config (its eos_token_id, say, which
    # would stop at EOS, or a Hub model's repetition penalty): make ours the model's for the call, so only it counts.
    saved, model.generation_config = model.generation_config, config
    if seed is not None:
        torch.manual_seed(seed)
    try:
        with torch.no_grad():
            tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    finally:
        model.generation_config = saved
    new = tokens[:, prompt.shape[1]:]
    if new.shape[1] < new_tokens:  # every row stopped early: EOS-pad to the requested width
        new = torch.cat([new, new.new_full((new.shape[0], new_tokens - new.shape[1]), eos_id)], dim=1)
    lengths = torch.full((new.shape[0],), new_tokens, dtype=torch.long)
    if stop_at_eos:
        is_eos = new == eos_id
        lengths = torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1) + 1, lengths)
    return torch.cat([prompt, new], dim=1), lengths
