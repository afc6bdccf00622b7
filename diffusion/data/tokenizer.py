"""The tokenizer of a run, made ready for absorbing diffusion (a separator and a MASK that is the last id)."""

from __future__ import annotations

from typing import Any

from .corpus import builtin_tokenizer_path

__all__ = ["MASK_TOKEN", "load_tokenizer"]

MASK_TOKEN = "<|mask|>"


def load_tokenizer(name_or_path: str = "builtin") -> Any:
    """Load a tokenizer (``builtin``, a local folder or a Hub id) ready for absorbing diffusion.

    Guarantees a document separator (EOS, added as ``<|endoftext|>`` if missing) and a MASK token whose
    id is the *last* id, ``len(tokenizer) - 1``: if the tokenizer has no mask token, or its mask token
    sits elsewhere (BERT's ``[MASK]``), a new ``<|mask|>`` is appended and made the mask token.
    """
    from transformers import AutoTokenizer

    path = builtin_tokenizer_path() if name_or_path == "builtin" else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    if tokenizer.mask_token is None or tokenizer.mask_token_id != len(tokenizer) - 1:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    if tokenizer.mask_token_id != len(tokenizer) - 1:
        raise ValueError(
            f"tokenizer {name_or_path!r}: could not make the mask token the last id "
            f"(mask id {tokenizer.mask_token_id}, {len(tokenizer)} tokens)"
        )
    return tokenizer
