"""Adapters that make diffusion LMs made elsewhere denoisers the samplers, likelihood code and RL can drive.

Every adapter turns a Hugging Face model that maps ``input_ids [B, L]`` to logits ``[B, L, V]`` into a
time-free absorbing denoiser with the subs parameterisation: MASK gets probability 0 and unmasked
positions carry their token, so ``logits = log p_theta(x0 | x_t)``.  The mask id may sit anywhere in the
vocabulary.

- :class:`MaskedLMAdapter`: any ``AutoModelForMaskedLM`` (BERT, ModernBERT, ...): position i predicts token i.
- :class:`DiffusionLMAdapter`: LLaDA-style models (``shift_logits=False``) and Dream-style models, which
  were initialised from an autoregressive LM and keep its alignment: the output at position i - 1 predicts
  token i (``shift_logits=True``; position 0 reuses its own output, as Dream's sampler does).  It also carries
  causal LMs converted by :mod:`diffusion.convert`: their attention (bidirectional, block-causal, or annealed
  from causal) is imposed through the model's own ``attention_mask`` argument as a 4-D additive mask.
- :func:`load_denoiser` picks the right one from a folder or Hub id.  Remote code runs only when the caller
  passes ``trust_remote_code=True``.  A converted model's folder is the causal LM's own (it reloads with its
  architecture) plus :data:`CONVERTED_FILE`, which names its mask id, logit shift and attention.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import MaskedLMOutput

from .attention_patterns import ATTENTION_MODES, annealed_causal, block_causal
from .modeling_ddit import subs_log_probs
from .weights import load_weights_checked

__all__ = ["CONVERTED_FILE", "SHIFTED_FAMILIES", "DenoiserConfig", "DiffusionLMAdapter", "MaskedLMAdapter",
           "load_denoiser", "read_converted", "save_denoiser"]

# model_type (lower case) -> whether the family's logits are shifted by one position
SHIFTED_FAMILIES = {"llada": False, "dream": True}
CONVERTED_FILE = "ddlm_denoiser.json"


@dataclass(frozen=True)
class DenoiserConfig:
    """What a sampler reads from a model's config.

    ``attention``: None for a model with its own (bidirectional) attention; for a converted causal LM the mode
    imposed on it (``bidirectional`` or ``block`` with ``attention_block_size``).  ``anneal_steps``: training
    steps over which a converted model's attention goes from causal to ``attention``.
    """

    vocab_size: int
    mask_token_id: int | None
    max_position_embeddings: int
    process: str = "absorbing"
    parameterization: str = "subs"
    time_conditioning: bool = False
    schedule: str = "loglinear"
    schedule_kwargs: dict = field(default_factory=lambda: {"eps": 1e-3})
    eos_token_id: int | None = None
    shift_logits: bool = False
    attention: str | None = None
    attention_block_size: int | None = None
    anneal_steps: int = 0
    trained_length: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DiffusionLMAdapter(nn.Module):
    """A Hugging Face model with an ``input_ids -> logits`` forward as a time-free masked-diffusion denoiser.

    Args:
        model: the wrapped model; ``model(input_ids=..., attention_mask=...).logits`` has shape ``[B, L, V]``.
        mask_token_id: the id the model was trained to denoise (LLaDA: 126336, Dream: 151666, BERT: [MASK]).
        shift_logits: the output at position i - 1 predicts token i (Dream); position 0 keeps its own output.
        max_length: longest input (default: ``model.config.max_position_embeddings``).
        attention: None (the model's own attention; ``attention_mask`` is passed as the ``[B, L]`` padding mask),
            or a mode of :data:`~diffusion.attention_patterns.ATTENTION_MODES` imposed on a causal LM through a
            ``[B, 1, L, L]`` additive ``attention_mask`` (sdpa and eager attention; not flash attention, which takes no
            arbitrary mask).
        block_size: the block of ``attention="block"``.
        anneal_steps: in training mode, the attention is causal at step 0 and reaches ``attention`` at this step
            (:func:`~diffusion.attention_patterns.annealed_causal`; the loop reports steps through :meth:`set_step`).
        eos_token_id: the EOS a sampler may stop at (default: the wrapped model's).
    """

    supports_score_mask = True
    # forward(carry_unmasked=False) gives the wrapped head's prediction at unmasked positions (token editing reads
    # it); whether that prediction was trained to revise tokens depends on the model (LLaDA 2.1 was, BERT in part).
    predicts_unmasked = True

    def __init__(self, model: nn.Module, mask_token_id: int, *, shift_logits: bool = False,
                 max_length: int | None = None, attention: str | None = None, block_size: int | None = None,
                 anneal_steps: int = 0, eos_token_id: int | None = None) -> None:
        super().__init__()
        vocab = _vocab_size(model)
        if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or not 0 <= mask_token_id < vocab:
            raise ValueError(f"mask_token_id must be an id in [0, {vocab}), got mask_token_id={mask_token_id!r}")
        max_length = max_length or getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "max_sequence_length", None) or getattr(model.config, "n_positions", None)
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int (the model's config has none), got {max_length!r}")
        if attention is not None and attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be None or one of {ATTENTION_MODES}, got attention={attention!r}")
        if attention == "block" and not (isinstance(block_size, int) and block_size >= 1):
            raise ValueError(f"attention='block' needs a positive block_size, got block_size={block_size!r}")
        if isinstance(anneal_steps, bool) or not isinstance(anneal_steps, int) or anneal_steps < 0:
            raise ValueError(f"anneal_steps must be an int >= 0, got anneal_steps={anneal_steps!r}")
        implementation = str(getattr(model.config, "_attn_implementation", None) or "")
        if attention is not None and implementation.startswith("flash"):
            raise ValueError(f"attention={attention!r} is imposed through an attention mask, which "
                             f"{implementation!r} does not take: load the model with attn_implementation='sdpa'")
        if anneal_steps and attention != "bidirectional":
            raise ValueError(f"anneal_steps anneals a converted causal LM towards bidirectional attention, got "
                             f"attention={attention!r}")
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
            eos_token_id = eos_token_id[0] if isinstance(eos_token_id, (list, tuple)) and eos_token_id else eos_token_id
        self.model = model
        self.shift_logits = shift_logits
        self.step = 0
        self.config = DenoiserConfig(
            vocab_size=vocab, mask_token_id=mask_token_id, max_position_embeddings=max_length,
            eos_token_id=eos_token_id if isinstance(eos_token_id, int) else None, shift_logits=shift_logits,
            attention=attention, attention_block_size=block_size if attention == "block" else None,
            anneal_steps=anneal_steps, trained_length=getattr(model.config, "trained_length", None))
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def set_step(self, step: int) -> None:
        """The training step, which sets the annealed attention (see ``anneal_steps``)."""
        self.step = step

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.model.gradient_checkpointing_enable(**kwargs)

    def _attention_mask(self, input_ids: Tensor, padding: Tensor | None, pattern: Tensor | None,
                        positions: Tensor | None = None) -> Tensor | None:
        """What the wrapped model receives as ``attention_mask``: the padding mask as it is for a model with its own
        attention; otherwise the ``[B, 1, L, L]`` additive mask of imposed (or annealed) pattern & ``pattern`` &
        padding keys (0 where attending, the dtype's minimum elsewhere: sdpa and eager attention both read it so).

        Causal and block-causal patterns compare ``positions`` (default ``0..L-1``), so the block-diffusion input,
        whose two halves repeat the positions, is block-causal by position as in :class:`~diffusion.DDiTModel`."""
        config = self.config
        if config.attention is None:
            if pattern is not None:
                raise ValueError("attention_pattern needs a converted causal LM (attention imposed by ddlm)")
            return padding
        batch, length = input_ids.shape
        device = input_ids.device
        if positions is None:
            positions = torch.arange(length, device=device)
        if self.training and self.step < config.anneal_steps:
            mask = annealed_causal(length, self.step / config.anneal_steps, device=device)
        elif config.attention == "bidirectional":
            mask = torch.ones(length, length, dtype=torch.bool, device=device)
        else:
            mask = block_causal(positions, positions, 1 if config.attention == "causal" else config.attention_block_size)
        if pattern is not None:
            mask = mask & (pattern if pattern.dim() == 2 else pattern[:, None])
        mask = mask.expand(batch, 1, length, length)
        if padding is not None:
            mask = mask & padding.bool()[:, None, None, :]
        # Additive form (0 or the dtype's minimum): eager attention adds a boolean mask as 0/1 instead of masking.
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)

    def forward(self, input_ids: Tensor, total_noise: Tensor | None = None, attention_mask: Tensor | None = None,
                *, positions: Tensor | None = None, attention_pattern: Tensor | None = None,
                score_mask: Tensor | None = None, carry_unmasked: bool = True, **kwargs: object) -> MaskedLMOutput:
        """``input_ids [B, L] -> logits [B, L, V]`` = log p(x0 | x_t) (``total_noise`` is ignored: the model is time-free).

        ``positions [L]`` (converted models; the block-diffusion objective repeats ``0..L-1``), ``attention_pattern
        [L, L]`` (an extra restriction, True = may attend) and ``score_mask [B, L]`` (return ``[n, V]`` at its True
        positions, row-major) follow :meth:`diffusion.DDiTModel.forward`.  ``carry_unmasked=False`` keeps the wrapped
        model's own prediction at unmasked positions too (log-softmax over the tokens, MASK excluded) instead of a
        point mass on the token there: what token editing reads.
        """
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": self._attention_mask(
            input_ids, attention_mask, attention_pattern, positions)}
        if positions is not None:
            inputs["position_ids"] = positions.expand(input_ids.shape[0], -1)
        raw = self.model(**inputs).logits.float()
        if self.shift_logits:
            raw = torch.cat([raw[:, :1], raw[:, :-1]], dim=1)
        if score_mask is not None:
            raw, input_ids = raw[score_mask], input_ids[score_mask]
        if not carry_unmasked:  # every position read as if masked: the model's prediction, MASK excluded
            input_ids = torch.full_like(input_ids, self.config.mask_token_id)
        return MaskedLMOutput(logits=subs_log_probs(raw, input_ids, self.config.mask_token_id))

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, Tensor] | None = None, **kwargs: Any) -> None:
        """The wrapped model's own folder (it reloads with its architecture); a converted causal LM adds
        :data:`CONVERTED_FILE`, a model with its own attention keeps its mask id in its generation config (where
        Dream keeps it).

        ``state_dict``: weights of this adapter (keys ``model.*``), e.g. gathered from shards or an EMA."""
        inner = None if state_dict is None else {k.removeprefix("model."): v for k, v in state_dict.items()}
        self.model.save_pretrained(folder, state_dict=inner, **kwargs)
        if self.config.attention is None:
            from transformers import GenerationConfig

            found = (Path(folder) / "generation_config.json").is_file()
            generation = GenerationConfig.from_pretrained(folder) if found else GenerationConfig()
            generation.mask_token_id = self.config.mask_token_id
            generation.save_pretrained(folder)
            return
        record = {"mask_token_id": self.config.mask_token_id, "shift_logits": self.shift_logits,
                  "attention": self.config.attention, "block_size": self.config.attention_block_size,
                  "eos_token_id": self.config.eos_token_id}
        (Path(folder) / CONVERTED_FILE).write_text(json.dumps(record, indent=2) + "\n")


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
    - a folder with :data:`CONVERTED_FILE` (made by :mod:`diffusion.convert`): ``AutoModelForCausalLM`` wrapped
      in :class:`DiffusionLMAdapter` with the recorded mask id, shift and attention.
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

    converted = read_converted(name_or_path, **from_pretrained)
    if converted is not None:
        from transformers import AutoModelForCausalLM

        if mask_token_id is not None and mask_token_id != converted["mask_token_id"]:
            raise ValueError(f"mask_token_id={mask_token_id} disagrees with {CONVERTED_FILE} "
                             f"(mask_token_id={converted['mask_token_id']})")
        model = load_weights_checked(AutoModelForCausalLM, name_or_path, trust_remote_code=trust_remote_code,
                                     **from_pretrained)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **from_pretrained)
        return DiffusionLMAdapter(model.eval(), converted["mask_token_id"], shift_logits=converted["shift_logits"],
                                  attention=converted["attention"], block_size=converted["block_size"],
                                  eos_token_id=converted.get("eos_token_id")), tokenizer
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **from_pretrained)
    _check_denoiser_family(name_or_path, config)
    family = str(getattr(config, "model_type", "")).lower()
    if family == "ddit":
        model = load_weights_checked(AutoModelForMaskedLM, name_or_path, **from_pretrained)
        if mask_token_id is not None and mask_token_id != model.config.mask_token_id:
            raise ValueError(f"mask_token_id={mask_token_id} disagrees with the model's config "
                             f"(mask_token_id={model.config.mask_token_id})")
        return model.eval(), load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
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
        model = load_weights_checked(AutoModel, name_or_path, trust_remote_code=trust_remote_code, **from_pretrained)
        return DiffusionLMAdapter(model.eval(), mask_id, shift_logits=SHIFTED_FAMILIES[family]), tokenizer
    model = load_weights_checked(AutoModelForMaskedLM, name_or_path, trust_remote_code=trust_remote_code,
                                 **from_pretrained)
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
    take = ("; ddlm-generate samples it and ddlm-eval ppl scores it as it is, ddlm-convert or ddlm-train --init-from "
            "make a diffusion model of it") if causal else ""
    raise ValueError(f"{name_or_path!r} is a {kind}{causal}, which cannot denoise: this needs a diffusion model (ddit, "
                     f"LLaDA- or Dream-style) or a masked LM (BERT-style){take}")


def read_converted(name_or_path: str, **from_pretrained: Any) -> dict[str, Any] | None:
    """The :data:`CONVERTED_FILE` record of a local folder or Hub repository, or None when it has none."""
    folder = Path(name_or_path)
    if folder.is_dir():
        path = folder / CONVERTED_FILE
        if not path.is_file():
            return None
    else:
        from transformers.utils import cached_file

        keep = {k: v for k, v in from_pretrained.items() if k in ("revision", "token", "cache_dir", "local_files_only")}
        found = cached_file(name_or_path, CONVERTED_FILE, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False, **keep)
        if found is None:
            return None
        path = Path(found)
    record = json.loads(path.read_text())
    missing = {"mask_token_id", "shift_logits", "attention", "block_size"} - set(record)
    if missing:
        raise ValueError(f"{path} lacks the fields {sorted(missing)}: it was not written by diffusion.convert")
    return record


def save_denoiser(model: nn.Module, tokenizer: Any, folder: str | Path) -> None:
    """Write ``model`` (a DDiT model or an adapter; LoRA merged beforehand) and ``tokenizer`` to ``folder`` so that
    :func:`load_denoiser` reads them back."""
    if hasattr(model, "merge_and_unload"):
        raise ValueError("save_denoiser takes a plain model: merge its LoRA adapters first (diffusion.training.lora.merged)")
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"cannot save a {type(model).__name__}: it has no save_pretrained")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
