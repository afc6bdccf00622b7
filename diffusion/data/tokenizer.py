"""The tokenizer of a run, made ready for absorbing diffusion (a separator and a MASK that is the last id),
or trained on the run's own documents (byte-level BPE, :func:`train_tokenizer`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .corpus import builtin_tokenizer_path

__all__ = ["EOS_TOKEN", "MASK_TOKEN", "load_tokenizer", "parse_trained_vocab", "train_tokenizer"]

MASK_TOKEN = "<|mask|>"
EOS_TOKEN = "<|endoftext|>"
TRAIN_PREFIX = "train:"
MIN_TRAINED_VOCAB = 257  # the 256 byte-level symbols and EOS


def parse_trained_vocab(spec: str) -> int | None:
    """``N`` of a ``train:N`` tokenizer spec; None for any other spec (builtin, a folder, a Hub id)."""
    if not spec.startswith(TRAIN_PREFIX):
        return None
    value = spec[len(TRAIN_PREFIX):]
    if not value.isdigit() or int(value) < MIN_TRAINED_VOCAB:
        raise ValueError(f"tokenizer={spec!r}: train:VOCAB_SIZE needs an integer VOCAB_SIZE >= {MIN_TRAINED_VOCAB} "
                         "(256 bytes, EOS and the merges)")
    return int(value)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """Byte-level BPE with ``vocab_size`` tokens (EOS first), then MASK appended as the last id.

    Byte-level, so every text round-trips exactly; deterministic for the same texts.  It gets the built-in
    tokenizer's chat template, so ``ddlm-sft`` and ``ddlm-generate --chat`` work with it too.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN,
                                      clean_up_tokenization_spaces=False)
    wrapped.add_special_tokens({"mask_token": MASK_TOKEN})
    wrapped.chat_template = load_tokenizer("builtin").chat_template  # the shipped template, however it is stored
    return wrapped


def load_tokenizer(name_or_path: str = "builtin", *, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer (``builtin``, a local folder or a Hub id) ready for absorbing diffusion.

    A tokenizer that brings its own code (``auto_map``) loads only with ``trust_remote_code=True``; without it
    the answer is a one-line ValueError, never a prompt on the terminal.

    Guarantees a document separator (EOS, added as ``<|endoftext|>`` if missing) and a MASK token whose
    id is the *last* id, ``len(tokenizer) - 1``: if the tokenizer has no mask token, or its mask token
    sits elsewhere (BERT's ``[MASK]``), a new ``<|mask|>`` is appended and made the mask token.
    """
    from transformers import AutoTokenizer

    from ..locate import looks_local

    path = builtin_tokenizer_path() if name_or_path == "builtin" else name_or_path
    if name_or_path != "builtin" and looks_local(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise FileNotFoundError(f"tokenizer folder does not exist: {name_or_path!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except OSError as err:
        from ..cli.errors import first_line

        raise FileNotFoundError(f"could not load tokenizer {name_or_path!r} (no such folder, or the Hub is "
                                f"unreachable): {first_line(err)}") from err
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ValueError(f"tokenizer {name_or_path!r} needs its own code to run (auto_map in its tokenizer or model "
                         "config): read that code, then pass --trust-remote-code") from err
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
    if tokenizer.mask_token is None or tokenizer.mask_token_id != len(tokenizer) - 1:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    if tokenizer.mask_token_id != len(tokenizer) - 1:
        raise ValueError(
            f"tokenizer {name_or_path!r}: could not make the mask token the last id "
            f"(mask id {tokenizer.mask_token_id}, {len(tokenizer)} tokens)"
        )
    return tokenizer
