"""The model a run starts from when ``init_from`` names one, and its tokenizer.

- a causal LM (LLaMA, Qwen, GPT-2, the autoregressive baseline ``--objective autoregressive`` trains): converted
  as :mod:`diffusion.convert` describes, with the run's ``shift_logits``, ``anneal_steps`` and ``block_size``;
- a folder ``ddlm-convert`` wrote: its recorded mask id, shift and attention (``block_size`` switches it to
  block-causal attention);
- a ddit model (a ``final/`` folder, a Hub upload): its weights and config; a bidirectional one given
  ``block_size`` becomes a block-diffusion model (BD3-LM fine-tunes MDLM checkpoints this way).

Conversion is deterministic (mean-initialised MASK row), so a resumed run rebuilds the same starting model before
loading its checkpoint.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..adapters import DiffusionLMAdapter, read_converted
from ..convert import convert_causal_lm, is_causal_lm_config, load_causal_lm
from ..locate import locate_model
from ..modeling_ddit import DDiTConfig, DDiTModel
from ..weights import load_weights_checked
from .config import TrainConfig

__all__ = ["load_init_model", "load_token_embeddings"]


def load_init_model(config: TrainConfig) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for ``config.init_from``; one-line ``ValueError`` / ``FileNotFoundError`` otherwise."""
    try:
        return _load(config)
    except ValueError as err:
        message = str(err)
        raise ValueError(message if message.startswith("--init-from") else f"--init-from {message}") from err


def _load(config: TrainConfig) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..data import load_tokenizer

    location = locate_model(config.init_from, flag="--init-from")
    trust = config.trust_remote_code
    block = config.block_size
    converted = read_converted(location)
    if converted is not None:
        if converted["attention"] == "block" and block != converted["block_size"]:
            raise ValueError(f"--init-from {config.init_from!r} is a block-diffusion model with block size "
                             f"{converted['block_size']}: train it with --block-size {converted['block_size']}")
        if block is not None and converted["shift_logits"]:
            raise ValueError(f"--init-from {config.init_from!r} shifts its logits, which block diffusion cannot use: "
                             "convert it again with --shift-logits false")
        model = load_weights_checked(AutoModelForCausalLM, location, trust_remote_code=trust)
        adapter = DiffusionLMAdapter(model, converted["mask_token_id"], shift_logits=converted["shift_logits"],
                                     attention="block" if block else converted["attention"], block_size=block,
                                     anneal_steps=config.anneal_steps, eos_token_id=converted.get("eos_token_id"))
        return adapter, AutoTokenizer.from_pretrained(location, trust_remote_code=trust)
    model_config = AutoConfig.from_pretrained(location, trust_remote_code=trust)
    if model_config.model_type == "ddit":
        if config.anneal_steps:
            raise ValueError("--anneal-steps is for a causal LM; --init-from names a ddit model")
        model = load_weights_checked(DDiTModel, location)
        if model.config.attention_block_size != block:
            if model.config.attention_block_size is not None:
                raise ValueError(f"--init-from {config.init_from!r} is a block-diffusion model with block size "
                                 f"{model.config.attention_block_size}: train it with --block-size "
                                 f"{model.config.attention_block_size}")
            blocked = DDiTModel(DDiTConfig.from_dict({**model.config.to_dict(), "attention_block_size": block}))
            blocked.load_state_dict(model.state_dict())
            model = blocked
        return model, load_tokenizer(location, trust_remote_code=trust)
    if not is_causal_lm_config(model_config):
        kind = ", ".join(getattr(model_config, "architectures", None) or []) or model_config.model_type
        raise ValueError(f"--init-from {config.init_from!r} is a {kind}: it needs a causal LM, a converted model or a "
                         "ddit model")
    if block is not None and config.shift_logits:
        raise ValueError("--block-size with --init-from a causal LM needs --shift-logits false (a shifted output at a "
                         "block's first position would come from the previous block)")
    model, tokenizer = load_causal_lm(location, trust_remote_code=trust)
    return convert_causal_lm(model, tokenizer, shift_logits=config.shift_logits,
                             attention="block" if block else "bidirectional", block_size=block,
                             anneal_steps=config.anneal_steps)


def load_token_embeddings(location: str, num_tokens: int, *, trust_remote_code: bool = False) -> Any:
    """The input embeddings ``[num_tokens, d]`` of the model at ``location`` (a ddit folder or a causal LM such as the
    autoregressive baseline; its first ``num_tokens`` rows, which must be this run's tokenizer's real tokens):
    what ``--transition-embeddings`` gives a nearest-neighbour process."""
    from transformers import AutoConfig, AutoModelForCausalLM

    found = locate_model(location, flag="--transition-embeddings")
    model_config = AutoConfig.from_pretrained(found, trust_remote_code=trust_remote_code)
    if model_config.model_type == "ddit":
        model = load_weights_checked(DDiTModel, found)
    elif is_causal_lm_config(model_config):
        model = load_weights_checked(AutoModelForCausalLM, found, trust_remote_code=trust_remote_code)
    else:
        raise ValueError(f"--transition-embeddings {location!r} is a {model_config.model_type} model: it needs a ddit "
                         "model or a causal LM")
    weight = model.get_input_embeddings().weight.detach()
    if weight.shape[0] < num_tokens:
        raise ValueError(f"--transition-embeddings {location!r} embeds {weight.shape[0]} tokens, fewer than this run's "
                         f"{num_tokens}: it must share the run's tokenizer")
    return weight[:num_tokens].float().clone()
