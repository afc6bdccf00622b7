"""DDiT: a diffusion transformer denoiser for discrete diffusion language models.

It imports only torch, transformers, einops and its neighbour ``dropout.py``, so that the two files can be
shipped beside a checkpoint as Hugging Face remote code.

Architecture (after the DiT / SEDD denoisers): token embedding; ``num_hidden_layers``
pre-norm blocks of bidirectional rotary self-attention (``scaled_dot_product_attention``)
and a GELU MLP; optional adaLN-zero conditioning on the total noise ``sigma_bar``; a
final norm and a linear head over all ``vocab_size`` states (optionally tied to the
embedding).  Three output parameterisations:

* ``"subs"`` (MDLM/RADD, absorbing only, usually time-free): log-probabilities
  ``log p_theta(x0 | x_t)``; the MASK state gets probability 0 and every unmasked
  position carries its token through (log-prob 0 on x_t, -1e6 elsewhere).
* ``"x0"`` (uniform: D3PM's uniform chain, UDLM, Duo; or nearest-neighbour D3PM, whose head adds ``log q_t(x_t |
  x0)``, :class:`NeighbourGraph`): log-probabilities ``log p_theta(x0 | x_t)`` over all
  states; nothing is carried over, since under the uniform process any position of x_t may differ from x0.  The
  head adds ``log(1 + N / (e^sigma_bar - 1))`` to x_t's logit, which is the posterior of x0 under uniform data: an
  untrained network starts at the forward process's own posterior (keep x_t unless the noise is high) and learns
  the data's part; without it a 4096-token model spends its first hundreds of steps learning to copy its input.
* ``"score"`` (SEDD): log-scores ``log s_theta(x_t)_y``; the entry of the current state is
  0 (ratio 1); with ``scale_by_sigma`` (absorbing, bridge) the raw output is shifted by
  ``-log(exp(sigma_bar) - 1) - log(N)``.

A ``"bridge"`` model (the Discrete Markov Bridge, a score model) also owns its learnable rate matrix as
:class:`BridgeRates` (``bridge_rates``), so that the weights file carries the process; ``diffusion/markov_bridge.py``
holds its maths.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .dropout import Dropout, dropout

NEG_INF = -1.0e6  # a finite "log 0": exp() underflows to exactly 0 and no inf - inf NaNs appear

_PROCESSES = ("absorbing", "uniform", "bridge", "nearest_neighbour")
_WITH_MASK = ("absorbing", "bridge")  # MASK is the last state
_PARAMETERIZATIONS = ("subs", "score", "x0")


INIT_SCHEMES = ("normal", "fan_in")  # DDiTConfig.init_scheme: GPT-2's N(0, std), or the reference DiT code's


class DDiTConfig(PretrainedConfig):
    """Configuration of a :class:`DDiTModel`; it also records the diffusion the model was trained for.

    Args:
        vocab_size: number of token states the model embeds and predicts (for the absorbing
            process: the real tokens plus MASK).
        hidden_size, num_hidden_layers, num_attention_heads: transformer width, depth, heads.
        mlp_ratio: MLP hidden width as a multiple of ``hidden_size``.
        cond_dim: width of the noise-level embedding used by adaLN (time-conditioned models).
        max_position_embeddings: longest sequence the model accepts.
        dropout: dropout on the attention and MLP outputs.
        attention_dropout: dropout on the attention probabilities; ``None`` (the default) takes ``dropout``.
            SEDD's and MDLM's models drop only the two outputs: ``attention_dropout=0.0`` trains as they do.
        rope_theta: rotary base.
        layer_norm_eps: LayerNorm epsilon.
        initializer_range: std of the normal initialisation (``init_scheme="normal"``).
        init_scheme: ``"normal"``: every Linear and the embedding N(0, initializer_range), projections into the residual
            stream scaled by ``1/sqrt(2 n_layers)`` (GPT-2); ``"fan_in"``: the reference DiT code's (SEDD's, MDLM's):
            PyTorch's default Linear init (uniform, bound ``1/sqrt(fan_in)``), a kaiming-uniform embedding and a zero
            output head.  adaLN modulations start at zero in both.
        process: ``"absorbing"``, ``"uniform"``, ``"bridge"`` (the Discrete Markov Bridge: a score model whose
            learnable rate matrix, MASK last, lives in its weights) or ``"nearest_neighbour"`` (D3PM's nearest-neighbour
            transitions over the real tokens, no MASK: the neighbour lists live in its weights and their number in
            ``transition_neighbours``, a keyword argument).
        schedule, schedule_kwargs: the noise schedule's name and arguments.
        parameterization: ``"subs"`` (log p(x0 | x_t), absorbing only), ``"x0"`` (log p(x0 | x_t), uniform or nearest_neighbour) or
            ``"score"`` (log-scores).
        time_conditioning: adaLN-zero conditioning on sigma_bar; defaults to on for ``score`` and ``x0`` and off
            for ``subs`` (a time-free network, which makes exact sampler caching possible).
        constant_modulation: a time-free model that keeps the adaLN-zero modulations, fed the noise embedding of
            sigma_bar = 0 (a learnt constant), as MDLM's time-free DIT is; the network still reads no time.
        scale_by_sigma: shift score outputs by ``-log(e^sigma_bar - 1) - log N`` (``score`` models of the absorbing
            and bridge processes only; default on there).
        mask_token_id: id of MASK (absorbing, bridge: must be ``vocab_size - 1``; uniform: None).
        tie_word_embeddings: share the output head with the token embedding.
        attention_block_size: when set, attention is block-causal (BD3-LM): position i sees position j
            iff ``j // size <= i // size``; block KV caches are then exact. None: fully bidirectional.
        trained_length: the block length the model was trained on (None: not recorded); samplers warn past it.
    """

    model_type = "ddit"

    def __init__(
        self,
        vocab_size: int = 4097,
        hidden_size: int = 384,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 6,
        mlp_ratio: float = 4.0,
        cond_dim: int = 128,
        max_position_embeddings: int = 1024,
        dropout: float = 0.0,
        attention_dropout: float | None = None,
        rope_theta: float = 10000.0,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        process: str = "absorbing",
        schedule: str = "loglinear",
        schedule_kwargs: dict | None = None,
        parameterization: str = "subs",
        time_conditioning: bool | None = None,
        scale_by_sigma: bool | None = None,
        mask_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        attention_block_size: int | None = None,
        trained_length: int | None = None,
        constant_modulation: bool = False,
        init_scheme: str = "normal",
        **kwargs,
    ) -> None:
        if process not in _PROCESSES:
            raise ValueError(f"process must be one of {_PROCESSES}, got process={process!r}")
        if parameterization not in _PARAMETERIZATIONS:
            raise ValueError(
                f"parameterization must be one of {_PARAMETERIZATIONS}, got parameterization={parameterization!r}"
            )
        if process == "bridge" and parameterization != "score":
            raise ValueError(f"process='bridge' is a score model, got parameterization={parameterization!r}")
        if parameterization == "subs" and process != "absorbing":
            raise ValueError(f"parameterization='subs' needs process='absorbing', got process={process!r}")
        if parameterization == "x0" and process not in ("uniform", "nearest_neighbour"):
            raise ValueError(f"parameterization='x0' needs process='uniform' or 'nearest_neighbour' (an absorbing model "
                             f"predicting x0 is 'subs'), got process={process!r}")
        neighbours = kwargs.get("transition_neighbours")
        if process == "nearest_neighbour" and not (isinstance(neighbours, int) and 1 <= neighbours < vocab_size):
            raise ValueError(f"process='nearest_neighbour' needs transition_neighbours, an int in 1..{vocab_size - 1}, "
                             f"got transition_neighbours={neighbours!r}")
        if not (isinstance(vocab_size, int) and vocab_size >= 3):
            raise ValueError(f"vocab_size must be an int >= 3, got vocab_size={vocab_size!r}")
        for name, value in (
            ("hidden_size", hidden_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_attention_heads", num_attention_heads),
            ("cond_dim", cond_dim),
            ("max_position_embeddings", max_position_embeddings),
        ):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        if hidden_size % num_attention_heads or (hidden_size // num_attention_heads) % 2:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads}) "
                "into an even head dimension (rotary embeddings rotate pairs)"
            )
        if trained_length is not None and not (isinstance(trained_length, int) and trained_length >= 1):
            raise ValueError(f"trained_length must be a positive int or None, got {trained_length!r}")
        if attention_block_size is not None and not (isinstance(attention_block_size, int) and attention_block_size >= 1):
            raise ValueError(f"attention_block_size must be a positive int or None, got {attention_block_size!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={dropout!r}")
        if attention_dropout is not None and not 0.0 <= attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1) or None, got attention_dropout={attention_dropout!r}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got mlp_ratio={mlp_ratio!r}")
        if process in _WITH_MASK:
            if mask_token_id is None:
                mask_token_id = vocab_size - 1
            if mask_token_id != vocab_size - 1:
                raise ValueError(
                    f"mask_token_id must be the last state (vocab_size - 1 = {vocab_size - 1}) for the {process} "
                    f"process, got mask_token_id={mask_token_id!r}"
                )
        elif mask_token_id is not None:
            raise ValueError(f"the {process} process has no MASK state; got mask_token_id={mask_token_id!r}")
        if time_conditioning is None:
            time_conditioning = parameterization != "subs"
        if init_scheme not in INIT_SCHEMES:
            raise ValueError(f"init_scheme must be one of {list(INIT_SCHEMES)}, got init_scheme={init_scheme!r}")
        if constant_modulation and time_conditioning:
            raise ValueError("constant_modulation is for a time-free model; it needs time_conditioning=False")
        if scale_by_sigma is None:
            scale_by_sigma = parameterization == "score" and process in _WITH_MASK
        if scale_by_sigma and not (parameterization == "score" and process in _WITH_MASK):
            raise ValueError(
                "scale_by_sigma=True needs parameterization='score' and process 'absorbing' or 'bridge', got "
                f"parameterization={parameterization!r}, process={process!r}"
            )

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = float(mlp_ratio)
        self.cond_dim = cond_dim
        self.max_position_embeddings = max_position_embeddings
        self.dropout = float(dropout)
        self.attention_dropout = float(attention_dropout) if attention_dropout is not None else None
        self.rope_theta = float(rope_theta)
        self.layer_norm_eps = float(layer_norm_eps)
        self.initializer_range = float(initializer_range)
        self.process = process
        self.schedule = schedule
        self.schedule_kwargs = dict(schedule_kwargs) if schedule_kwargs is not None else {"eps": 1e-3}
        self.parameterization = parameterization
        self.time_conditioning = bool(time_conditioning)
        self.scale_by_sigma = bool(scale_by_sigma)
        self.mask_token_id = mask_token_id
        self.attention_block_size = attention_block_size
        self.trained_length = trained_length
        self.constant_modulation = bool(constant_modulation)
        self.init_scheme = init_scheme
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def num_tokens(self) -> int:
        """N, the number of real (non-MASK) token states (``vocab_size`` counts MASK too, for the absorbing process)."""
        return self.vocab_size - 1 if self.process in _WITH_MASK else self.vocab_size

    @property
    def needs_sigma(self) -> bool:
        """Whether the forward pass reads the noise level sigma_bar."""
        return self.time_conditioning or self.scale_by_sigma or self.parameterization == "x0"  # x0: the head's prior


def _rotary_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """Rotary tables ``[L, head_dim]`` for absolute ``positions [L]``: ``cos`` and the signed ``sin``.

    Each frequency is repeated for both halves; the sine's first half is negated, so that with
    ``swap(x) = (x_2, x_1)`` the rotate-half rotation ``x cos + (-x_2, x_1) sin`` is ``x cos + swap(x) sin``.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = torch.outer(positions.float(), inv_freq)
    return torch.cat([angles, angles], dim=-1).cos(), torch.cat([-angles.sin(), angles.sin()], dim=-1)


def _rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotary position embedding (rotate-half convention) on ``x [..., D]`` with tables broadcasting to it."""
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return torch.addcmul(x * cos, swapped, signed_sin)


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, config: DDiTConfig,
               training: bool = False) -> Tensor:
    """Bidirectional attention ``[B, nh, Lq, hd] -> [B, nh, Lq, hd]`` (keys/values ``[B, nh, Lk, hd]``).

    ``sdpa`` (default) calls ``scaled_dot_product_attention``, except in training mode with autograd on
    a CPU: there the two-matmul form below is used, whose backward at these lengths is about 1.5x
    (float32) to 4x (bf16) faster than the fused CPU kernel's.  A model in eval mode computes the same
    with and without autograd (GRPO's first ratio is exactly 1).  ``eager`` always uses the two-matmul
    form.  Select with ``from_pretrained(..., attn_implementation="eager")`` or ``config._attn_implementation``.
    """
    fused = getattr(config, "_attn_implementation", "sdpa") != "eager"
    if fused and not (training and q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # (B, nh, Lq, Lk)
    if mask is not None:  # the most negative finite value: a row with no visible key stays finite
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)  # bf16 input: accumulated in float32 by the kernel
    if dropout_p > 0:
        probs = dropout(probs, dropout_p)
    return torch.matmul(probs, v)


def _x0_log_probs(raw: Tensor, input_ids: Tensor, sigma_bar: Tensor | None) -> Tensor:
    """The ``x0`` head: ``log_softmax(raw + log(1 + N / (e^sigma_bar - 1)) e_{x_t})`` in float32 (module docstring)."""
    sigma = sigma_bar.float().reshape(sigma_bar.shape + (1,) * (input_ids.dim() - sigma_bar.dim()))
    bonus = torch.log1p(raw.shape[-1] / torch.expm1(sigma.clamp_min(1e-12)))
    logits = raw.float().scatter_add(-1, input_ids.unsqueeze(-1), bonus.expand(input_ids.shape).unsqueeze(-1))
    return logits.log_softmax(-1)


def subs_log_probs(raw: Tensor, input_ids: Tensor, mask_id: int) -> Tensor:
    """SUBS parameterisation (MDLM): log p(x0 | x_t) from raw scores ``[..., S]`` and tokens ``[...]``.

    MASK gets probability 0 (log-prob ``NEG_INF``); an unmasked position is certain of its own token
    (log-prob 0, ``NEG_INF`` elsewhere).
    """
    if mask_id == raw.shape[-1] - 1:  # MASK is the last state (every DDiT model)
        return _subs_from_real(raw[..., :mask_id], input_ids, mask_id)
    column_is_mask = torch.arange(raw.shape[-1], device=raw.device) == mask_id
    log_probs = torch.log_softmax(raw.masked_fill(column_is_mask, NEG_INF), dim=-1).masked_fill(column_is_mask, NEG_INF)
    return _carry_unmasked(log_probs, input_ids, mask_id)


def _subs_from_real(raw_real: Tensor, input_ids: Tensor, mask_id: int) -> Tensor:
    """:func:`subs_log_probs` from the raw scores ``[..., N]`` of the real tokens only (MASK = state N)."""
    log_probs = F.pad(torch.log_softmax(raw_real, dim=-1), (0, 1), value=NEG_INF)
    return _carry_unmasked(log_probs, input_ids, mask_id)


def _carry_unmasked(log_probs: Tensor, input_ids: Tensor, mask_id: int) -> Tensor:
    """Replace the rows of unmasked positions by a point mass on their own token (in log space)."""
    unmasked = input_ids != mask_id
    if not bool(unmasked.any()):
        return log_probs
    carry = torch.full_like(log_probs, NEG_INF).scatter(-1, input_ids.unsqueeze(-1), 0.0)
    return torch.where(unmasked.unsqueeze(-1), carry, log_probs)


def block_causal_pattern(query_pos: Tensor, key_pos: Tensor, block_size: int) -> Tensor:
    """``BoolTensor[Lq, Lk]``: the key's block ``floor(j / b)`` is not after the query's (BD3-LM attention)."""
    return (key_pos[None, :] // block_size) <= (query_pos[:, None] // block_size)


def accepts_score_mask(model: nn.Module) -> bool:
    """Whether ``model`` (possibly wrapped by DDP/FSDP or ``torch.compile``) takes ``score_mask``."""
    for attribute in ("module", "_orig_mod"):
        model = getattr(model, attribute, model)
    return bool(getattr(model, "supports_score_mask", False))


ROW_BUCKET = 64


def _linear_rows(h: Tensor, weight: Tensor) -> Tensor:
    """``h @ weight.T`` in float32, for ``h [..., H]``.

    A packed ``[n, H]`` input (a score mask's selection) changes its row count every call; oneDNN builds
    a new kernel for every new shape (about 16 ms for the bf16 head), so the rows are zero-padded up to a
    multiple of :data:`ROW_BUCKET` and the padding is cut off again.
    """
    if h.dim() != 2 or h.shape[0] % ROW_BUCKET == 0:
        return F.linear(h, weight).float()
    n = h.shape[0]
    padded = F.pad(h, (0, 0, 0, ROW_BUCKET - n % ROW_BUCKET))
    return F.linear(padded, weight)[:n].float()


def _tag(module: nn.Module | None, role: str) -> None:
    """Record how ``_init_weights`` should initialise a Linear (``zero`` or ``residual``)."""
    if module is not None:
        module._ddit_init = role


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x (1 + scale) + shift`` in one kernel (``x [B, L, H]``, shift/scale ``[B, 1, H]``)."""
    return torch.addcmul(shift, x, 1.0 + scale)


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of sigma_bar followed by an MLP: ``[B] -> [B, cond_dim]``."""

    def __init__(self, cond_dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma_bar: Tensor) -> Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma_bar.device, dtype=torch.float32) / half)
        args = sigma_bar.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class DDiTBlock(nn.Module):
    """Pre-norm transformer block: x + gate * Attn(mod(LN(x))), then x + gate * MLP(mod(LN(x))).

    With ``gradient_checkpointing`` (set by ``model.gradient_checkpointing_enable()``) a training forward keeps
    only the block's input and recomputes the rest in the backward pass.  The checkpoint wraps the block's own
    computation, inside ``__call__``, so that hooks on the block (FSDP's gathering of the weights) run once.
    """

    gradient_checkpointing = False

    def __init__(self, config: DDiTConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.config = config  # read at call time: the attention implementation can be switched after loading
        self.norm1 = nn.LayerNorm(hidden, eps=config.layer_norm_eps, bias=False)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.attn_out = nn.Linear(hidden, hidden, bias=False)
        self.norm2 = nn.LayerNorm(hidden, eps=config.layer_norm_eps, bias=False)
        mlp_hidden = int(round(config.mlp_ratio * hidden))
        self.mlp_in = nn.Linear(hidden, mlp_hidden)
        self.mlp_out = nn.Linear(mlp_hidden, hidden)
        self.dropout = Dropout(config.dropout)  # diffusion/dropout.py: a quarter of the random draws on a CPU
        self.attention_dropout = config.dropout if config.attention_dropout is None else config.attention_dropout
        # adaLN-zero: shift, scale and gate for both sub-layers, initialised to zero (identity block).
        modulated = config.time_conditioning or getattr(config, "constant_modulation", False)
        self.modulation = nn.Linear(config.cond_dim, 6 * hidden) if modulated else None
        _tag(self.modulation, "zero")
        _tag(self.attn_out, "residual")
        _tag(self.mlp_out, "residual")

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cond: Tensor | None, attn_mask: Tensor | None,
                past: tuple[Tensor, Tensor, int] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``x [B, Lq, H]`` -> (``[B, Lq, H]``, the keys/values ``[B, nh, Lq, hd]`` of these positions)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and past is None:
            return self._gradient_checkpointing_func(self._compute, x, cos, sin, cond, attn_mask, None)
        return self._compute(x, cos, sin, cond, attn_mask, past)

    def _compute(self, x: Tensor, cos: Tensor, sin: Tensor, cond: Tensor | None, attn_mask: Tensor | None,
                 past: tuple[Tensor, Tensor, int] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The block (see :meth:`forward`).

        ``past`` = (keys, values, reserved): cached keys/values of other positions, attended to after the new
        ones; with ``reserved == Lq`` their first ``Lq`` slots are free and this call's keys/values are
        written there in place (inference only) instead of concatenating the whole cache anew.
        """
        if self.modulation is not None:
            mod = self.modulation(cond)[:, None, :]  # (B, 1, 6H)
            shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
            h = _modulate(self.norm1(x), shift1, scale1)
        else:
            h = self.norm1(x)

        # Rotate q and k together in the projection's own layout (contiguous rows of 2H), then view as heads.
        qkv = rearrange(self.qkv(h), "b l (three h d) -> b l three h d", three=3, h=self.num_heads)
        cos, sin = cos[:, None, None, :].to(qkv.dtype), sin[:, None, None, :].to(qkv.dtype)  # (Lq, 1, 1, hd)
        q, k = rearrange(_rotate(qkv[:, :, :2], cos, sin), "b l two h d -> two b h l d").unbind(0)
        v = rearrange(qkv[:, :, 2], "b l h d -> b h l d")  # q, k, v: (B, nh, Lq, hd)
        fresh = (k, v)
        if past is not None:
            past_k, past_v, reserved = past
            if reserved:
                if reserved != k.shape[2]:
                    raise ValueError(f"the cache reserves {reserved} slots for {k.shape[2]} new positions")
                past_k[:, :, :reserved] = k
                past_v[:, :, :reserved] = v
                k, v = past_k, past_v  # (B, nh, Lq + Lc, hd)
            else:
                k = torch.cat([k, past_k.to(k.dtype)], dim=2)  # (B, nh, Lq + Lc, hd)
                v = torch.cat([v, past_v.to(v.dtype)], dim=2)
        attn = _attention(q, k, v, attn_mask, self.attention_dropout if self.training else 0.0, self.config,
                          self.training)
        attn = self.dropout(self.attn_out(rearrange(attn, "b h l d -> b l (h d)")))
        x = torch.addcmul(x, gate1, attn) if self.modulation is not None else x + attn

        h = _modulate(self.norm2(x), shift2, scale2) if self.modulation is not None else self.norm2(x)
        h = self.dropout(self.mlp_out(F.gelu(self.mlp_in(h), approximate="tanh")))
        return (torch.addcmul(x, gate2, h) if self.modulation is not None else x + h), fresh


@dataclass
class KVCache:
    """Keys and values of some positions, per layer, to reuse across denoising steps (Fast-dLLM).

    ``keys[i]``/``values[i]``: ``[B, nh, reserved + Lc, hd]`` of layer i (rotary already applied);
    ``positions [Lc]`` of the cached part.  ``reserved`` leading slots (0 unless :meth:`with_slots`) are
    left for the positions a call recomputes, which then write their keys/values there instead of
    concatenating the whole cache at every layer of every call.
    """

    keys: list[Tensor]
    values: list[Tensor]
    positions: Tensor
    reserved: int = 0

    def select(self, keep: Tensor) -> KVCache:
        """The cache restricted to the positions where ``keep [Lc]`` is True."""
        if self.reserved:
            raise ValueError("select() needs a cache without reserved slots")
        return KVCache([k[:, :, keep] for k in self.keys], [v[:, :, keep] for v in self.values], self.positions[keep])

    def with_slots(self, count: int) -> KVCache:
        """A copy with ``count`` free leading slots for the recomputed positions (for inference)."""
        def grow(t: Tensor) -> Tensor:
            return torch.cat([t.new_zeros(t.shape[:2] + (count,) + t.shape[3:]), t], dim=2)
        return KVCache([grow(k) for k in self.keys], [grow(v) for v in self.values], self.positions, count)

    @staticmethod
    def concat(first: KVCache, second: KVCache) -> KVCache:
        if first.reserved or second.reserved:
            raise ValueError("concat() needs caches without reserved slots")
        return KVCache([torch.cat([a, b], 2) for a, b in zip(first.keys, second.keys)],
                       [torch.cat([a, b], 2) for a, b in zip(first.values, second.values)],
                       torch.cat([first.positions, second.positions]))


@dataclass
class DDiTOutput(MaskedLMOutput):
    """``logits`` as in :class:`DDiTModel`; ``key_values``: a :class:`KVCache` of the input positions when
    ``use_cache=True``."""

    key_values: KVCache | None = None


class DDiTPreTrainedModel(PreTrainedModel):
    config_class = DDiTConfig
    base_model_prefix = "ddit"
    _no_split_modules = ["DDiTBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Called once per leaf module (transformers skips containers without own parameters),
        # so the role of a Linear is read from the tag its owner gave it.
        std = self.config.initializer_range
        if getattr(self.config, "init_scheme", "normal") == "fan_in":
            self._init_fan_in(module)
            return
        if isinstance(module, nn.Linear):
            role = getattr(module, "_ddit_init", None)
            if role == "zero":  # adaLN-zero modulation: every block starts as the identity
                nn.init.zeros_(module.weight)
            elif role == "residual":  # projections into the residual stream, scaled down with depth (GPT-2)
                nn.init.normal_(module.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))
            else:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, BridgeRates):
            module.reset_parameters()

    def _init_fan_in(self, module: nn.Module) -> None:
        """The reference DiT code's initialisation (``init_scheme="fan_in"``): PyTorch's default Linear init,
        a kaiming-uniform embedding, zero adaLN modulations and a zero output head (the head is tagged ``zero``)."""
        if isinstance(module, nn.Linear):
            module.reset_parameters()
            head = getattr(module, "_ddit_head", False) and not self.config.tie_word_embeddings  # tied: the embedding
            if getattr(module, "_ddit_init", None) == "zero" or head:
                nn.init.zeros_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, BridgeRates):
            module.reset_parameters()


class BridgeRates(nn.Module):
    """The Discrete Markov Bridge's learnable rates over ``num_states`` states (MASK last): ``weights [K-1]`` with
    ``theta_i = -softplus(w_i)`` (``theta_K = 0``), and ``data_marginal [K]`` (float64), the training data's token
    frequencies that the prior ``p_T`` starts from.  ``diffusion/markov_bridge.py`` holds the maths.

    The start is the absorbing process plus a ``leak``: ``theta = (-leak, ..., -leak, -1, 0)`` (rate 1 into MASK,
    ``leak`` into every later token), so that the rates between tokens receive gradients; the data marginal starts
    uniform until the training run counts its tokens.
    """

    def __init__(self, num_states: int, leak: float = 1e-4) -> None:
        super().__init__()
        if not 0 < leak < 1:
            raise ValueError(f"leak must be in (0, 1), got leak={leak!r}")
        self.num_states, self.leak = num_states, leak
        self.weights = nn.Parameter(torch.empty(num_states - 1))
        self.register_buffer("data_marginal", torch.empty(num_states, dtype=torch.float64))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weights.fill_(math.log(math.expm1(self.leak)))
            self.weights[-1] = math.log(math.expm1(1.0))
            self.data_marginal.fill_(1.0 / self.num_states)


NOISE_FLOOR = 1e-12  # below this a row entry of exp(sigma A) is eigendecomposition rounding, not probability


def neighbour_rate(nearest: Tensor) -> Tensor:
    """The symmetric rate matrix ``[K, K]`` (float64) of neighbour lists ``nearest [K, k]``: ``A_ij = 1`` when j is
    among i's neighbours or i among j's, rows summing to 0."""
    count = nearest.shape[0]
    if nearest.dim() != 2 or bool((nearest < 0).any()) or bool((nearest >= count).any()):
        raise ValueError(f"neighbour lists must be [K, k] ids in 0..K-1, got shape {tuple(nearest.shape)}")
    adjacency = torch.zeros(count, count, dtype=torch.float64)
    adjacency.scatter_(1, nearest.long().cpu(), 1.0)
    adjacency.fill_diagonal_(0.0)
    adjacency = torch.maximum(adjacency, adjacency.T)
    return adjacency - torch.diag(adjacency.sum(-1))


def symmetric_kernel_rows(coefficients: Tensor, sigma_bar: Tensor, eigenvalues: Tensor, vectors: Tensor) -> Tensor:
    """Rows of ``exp(sigma A)`` for a symmetric ``A = U diag(lambda) U^T``: ``coefficients [..., K]`` (rows of ``U``,
    or ``p U`` for a distribution p) times ``diag(e^{sigma lambda}) U^T``, float64, ``sigma_bar`` broadcasting
    against ``coefficients[..., 0]``.  Entries below ``NOISE_FLOOR`` are set to 0: the product with the eigenvectors
    is accurate to about ``K * 1e-16``, so a smaller entry is rounding noise of either sign, and a ratio of two such
    entries (a posterior weight, a score) would be noise too; zeroed, they are unreachable states for every caller
    alike."""
    decay = torch.exp(sigma_bar.double().unsqueeze(-1) * eigenvalues.to(coefficients.device))
    out = (coefficients.double() * decay) @ vectors.T.to(coefficients.device)
    return torch.where(out > NOISE_FLOOR, out, torch.zeros_like(out))


class NeighbourGraph(nn.Module):
    """A nearest-neighbour model's transition graph: ``neighbours [K, k]``, each token's k nearest tokens (by the
    cosine similarity of the embeddings the training run was given); the rate matrix ``A`` has ``A_ij = 1`` for
    neighbours either way (:func:`neighbour_rate`).  All zeros until the training run sets it.

    :meth:`spectrum` is the eigendecomposition of ``A`` (O(K^3)), kept while the lists are unchanged;
    :meth:`log_prior` is ``log q_t(x_t | x0 = .)``, the x0 head's start (as ``log(1 + N / (e^sigma - 1))`` on x_t
    is the uniform process's): an untrained network is the forward process's posterior under uniform data.
    """

    def __init__(self, num_states: int, neighbours: int) -> None:
        super().__init__()
        self.register_buffer("neighbours", torch.zeros(num_states, neighbours, dtype=torch.long))

    def spectrum(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(A, lambda, U)`` with ``A = U diag(lambda) U^T`` (float64, on the CPU)."""
        if not bool(self.neighbours.any()):
            raise ValueError("this nearest_neighbour model's neighbour lists were never set (all zeros): it was not "
                             "made by a training run")
        key = (self.neighbours.data_ptr(), self.neighbours._version)
        cached = self.__dict__.get("_spectrum")
        if cached is None or cached[0] != key:
            rate = neighbour_rate(self.neighbours)
            cached = (key, (rate, *torch.linalg.eigh(rate)))
            self.__dict__["_spectrum"] = cached
        return cached[1]

    def log_prior(self, input_ids: Tensor, sigma_bar: Tensor) -> Tensor:
        """``log q_t(x_t | x0 = .)`` ``[..., K]`` (float32, floored at ``log NOISE_FLOOR``) for tokens ``input_ids
        [...]`` and noise ``sigma_bar`` broadcasting from the left: row x_t of the symmetric kernel."""
        _, eigenvalues, vectors = self.spectrum()
        sigma = sigma_bar.double().reshape(sigma_bar.shape + (1,) * (input_ids.dim() - sigma_bar.dim()))
        rows = symmetric_kernel_rows(vectors.to(input_ids.device)[input_ids], sigma, eigenvalues, vectors)
        return torch.log(rows.clamp_min(NOISE_FLOOR)).float()


class DDiTModel(DDiTPreTrainedModel):
    """The DDiT denoiser. ``forward(input_ids [B, L], total_noise [B]) -> logits [B, L, vocab_size]`` (float32).

    ``logits`` holds log-probabilities (``subs``) or log-scores (``score``), see the module docstring.
    """

    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}
    supports_gradient_checkpointing = True  # gradient_checkpointing_enable() (activation_checkpointing_enable() in 5.x)
    supports_kv_cache = True  # forward accepts positions / past_key_values / use_cache
    supports_score_mask = True  # forward accepts score_mask (logits of selected positions only)

    def __init__(self, config: DDiTConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        modulated = config.time_conditioning or getattr(config, "constant_modulation", False)
        self.noise_embed = NoiseEmbedding(config.cond_dim) if modulated else None
        self.blocks = nn.ModuleList(DDiTBlock(config) for _ in range(config.num_hidden_layers))
        self.norm_final = nn.LayerNorm(hidden, eps=config.layer_norm_eps, bias=False)
        self.final_modulation = nn.Linear(config.cond_dim, 2 * hidden) if modulated else None
        _tag(self.final_modulation, "zero")
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        self.lm_head._ddit_head = True  # zero at init under init_scheme="fan_in"
        self.bridge_rates = BridgeRates(config.vocab_size) if config.process == "bridge" else None
        self.neighbour_graph = NeighbourGraph(config.vocab_size, config.transition_neighbours) \
            if config.process == "nearest_neighbour" else None
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained``, but strict: every weight must match the config.

        A config that disagrees with the weights (more layers, no adaLN, ...) is a ``ValueError`` naming the
        keys, never a model with freshly initialised parts.
        """
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {key: sorted(info.get(key) or ()) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {key: value for key, value in problems.items() if value}
        if problems:
            listing = "; ".join(f"{key}: {', '.join(map(str, value[:6]))}{' ...' if len(value) > 6 else ''}"
                                for key, value in problems.items())
            raise ValueError(f"the weights do not match config.json ({listing}); refusing to load a partly "
                             "initialised model")
        return (model, info) if wants_info else model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _check_inputs(self, input_ids: Tensor, total_noise: Tensor | float | None, attention_mask: Tensor | None) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input length {input_ids.shape[1]} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        if self.config.needs_sigma and total_noise is None:
            raise ValueError(
                "this model reads the noise level: pass total_noise (sigma_bar, shape [batch]) "
                f"(time_conditioning={self.config.time_conditioning}, scale_by_sigma={self.config.scale_by_sigma})"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                f"{tuple(input_ids.shape)}"
            )

    def forward(
        self,
        input_ids: Tensor,
        total_noise: Tensor | float | None = None,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        score_mask: Tensor | None = None,
        attention_pattern: Tensor | None = None,
        return_dict: bool | None = None,
        input_weights: Tensor | None = None,
        **kwargs,
    ) -> MaskedLMOutput | tuple[Tensor]:
        """Denoise a batch.

        Args:
            input_ids: ``LongTensor[B, L]`` noisy tokens x_t.
            total_noise: the total noise sigma_bar(t), scalar or ``[B]``; needed when ``config.needs_sigma``.
                (``sigma=`` is its deprecated name.)
            attention_mask: optional ``[B, L]``, 1 for real tokens and 0 for padding (padding keys are ignored).
            positions: absolute positions ``[L]`` of ``input_ids`` (default ``0..L-1``); with a cache, the
                positions of the part of the sequence being recomputed.
            past_key_values: a :class:`KVCache` of other positions of the same sequences to attend to.
            use_cache: also return the keys/values of ``input_ids`` (``DDiTOutput.key_values``).
            attention_pattern: optional ``BoolTensor[Lq, Lk]`` (or ``[B, Lq, Lk]``): which key each query may attend
                to (True), on top of padding and ``attention_block_size``; the block-diffusion objective passes its
                three-part mask over the concatenated noisy and clean halves.
            score_mask: optional ``BoolTensor[B, L]``: compute outputs only where True.  Every position still
                attends to every other; only the output head and the parameterisation are restricted, which
                is what a loss or a sampler step that reads a few positions (the masked ones) needs.
            input_weights: optional ``[B, L, vocab_size]`` weights over the states per position (a relaxed x_t, e.g.
                Duo's tempered softmax of the Gaussian latent): the input embedding is ``input_weights @ E`` instead
                of the rows of ``input_ids``, which still give the tokens the output parameterisation reads.

        Returns:
            ``MaskedLMOutput`` (``DDiTOutput`` with ``use_cache``) whose ``logits [B, L, vocab_size]`` (float32)
            are the parameterised outputs; with ``score_mask``, ``logits [n, vocab_size]`` hold the ``n``
            selected positions in row-major order (``logits[k]`` belongs to ``score_mask.nonzero()[k]``).
        """
        if "sigma" in kwargs:
            warnings.warn("DDiTModel.forward(sigma=...) is deprecated; pass total_noise=", FutureWarning, stacklevel=2)
            total_noise = kwargs.pop("sigma")
        self._check_inputs(input_ids, total_noise, attention_mask)
        sigma_bar = total_noise
        if score_mask is not None and (score_mask.shape != input_ids.shape or score_mask.dtype != torch.bool):
            raise ValueError(f"score_mask must be a bool tensor of shape {tuple(input_ids.shape)}, got "
                             f"{score_mask.dtype} {tuple(score_mask.shape)}")
        if past_key_values is not None and attention_mask is not None:
            raise ValueError("attention_mask (padding) cannot be combined with past_key_values")
        batch, length = input_ids.shape
        if sigma_bar is not None:
            sigma_bar = torch.as_tensor(sigma_bar, device=input_ids.device, dtype=torch.float32)
            sigma_bar = sigma_bar.expand(batch) if sigma_bar.dim() == 0 else sigma_bar.reshape(batch)
        if positions is None:
            positions = torch.arange(length, device=input_ids.device)

        if input_weights is None:
            x = self.embed_tokens(input_ids)  # (B, L, H)
        elif input_weights.shape != (batch, length, self.config.vocab_size):
            raise ValueError(f"input_weights must be [batch, length, vocab_size] = {(batch, length, self.config.vocab_size)}"
                             f", got {tuple(input_weights.shape)}")
        else:
            x = input_weights.to(self.embed_tokens.weight.dtype) @ self.embed_tokens.weight
        if self.noise_embed is not None and not self.config.time_conditioning:  # constant modulation: sigma_bar = 0
            cond = F.silu(self.noise_embed(torch.zeros(batch, device=input_ids.device)))
        else:
            cond = F.silu(self.noise_embed(sigma_bar)) if self.noise_embed is not None else None
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        cos, sin = _rotary_tables(positions, head_dim, self.config.rope_theta)
        key_positions = positions if past_key_values is None else torch.cat([positions, past_key_values.positions])
        attn_mask = self._attention_mask(positions, key_positions, attention_mask, attention_pattern)

        new_keys, new_values = [], []
        for i, block in enumerate(self.blocks):
            past = ((past_key_values.keys[i], past_key_values.values[i], past_key_values.reserved)
                    if past_key_values is not None else None)
            x, (k, v) = block(x, cos, sin, cond, attn_mask, past)
            if use_cache:
                new_keys.append(k)
                new_values.append(v)

        h = self.norm_final(x)
        if self.final_modulation is not None:
            shift, scale = self.final_modulation(cond)[:, None, :].chunk(2, dim=-1)
            h = _modulate(h, shift, scale)
        ids = input_ids
        if score_mask is not None:  # keep only the rows whose outputs are wanted: [n, H]
            rows = score_mask.nonzero(as_tuple=True)[0]
            h, ids = h[score_mask], input_ids[score_mask]
            sigma_bar = sigma_bar[rows] if sigma_bar is not None else None
        logits = self._head(h, ids, sigma_bar)
        if return_dict is False:
            return (logits,)
        if use_cache:
            return DDiTOutput(logits=logits, key_values=KVCache(new_keys, new_values, positions))
        return MaskedLMOutput(logits=logits)

    def _attention_mask(self, query_pos: Tensor, key_pos: Tensor, padding: Tensor | None,
                        pattern: Tensor | None = None) -> Tensor | None:
        """Boolean mask (True = may attend): padding keys ``[B,1,1,L]``, block-causal ``[Lq, Lk]``, a given pattern."""
        mask = padding.bool()[:, None, None, :] if padding is not None else None
        if pattern is not None:
            if pattern.dtype != torch.bool or pattern.shape[-2:] != (len(query_pos), len(key_pos)):
                raise ValueError(f"attention_pattern must be a bool tensor ending in ({len(query_pos)}, {len(key_pos)}), "
                                 f"got {pattern.dtype} {tuple(pattern.shape)}")
            pattern = pattern if pattern.dim() == 2 else pattern[:, None]
            mask = pattern if mask is None else mask & pattern
        size = self.config.attention_block_size
        if size is not None:
            causal = block_causal_pattern(query_pos, key_pos, size)  # (Lq, Lk)
            mask = causal if mask is None else mask & causal
        return mask

    def _head(self, h: Tensor, input_ids: Tensor, sigma_bar: Tensor | None) -> Tensor:
        """Output head and parameterisation: hidden states ``[..., H]`` -> float32 outputs ``[..., S]``.

        ``input_ids [...]`` are the noisy tokens of those positions and ``sigma_bar`` their rows' noise (its
        leading dims match the first dims of ``input_ids``).  With the absorbing process the head's MASK row
        is never read where ``subs`` is used (MASK gets probability 0) nor at masked positions of a score
        model (the score of the current state is the ratio 1, log 0); there only the N real rows are
        multiplied, which also keeps the matmul at the aligned width N.
        """
        config = self.config
        mask_id = config.mask_token_id
        real_only = config.process == "absorbing" and (
            config.parameterization == "subs" or bool((input_ids == mask_id).all()))
        if not real_only:
            return self._parameterize(_linear_rows(h, self.lm_head.weight), input_ids, sigma_bar)
        raw = _linear_rows(h, self.lm_head.weight[:mask_id])  # (..., N)
        if config.parameterization == "subs":
            return _subs_from_real(raw, input_ids, mask_id)
        return F.pad(self._scale_scores(raw, sigma_bar), (0, 1), value=0.0)  # log s_MASK = 0 at a masked position

    def _scale_scores(self, raw: Tensor, sigma_bar: Tensor | None) -> Tensor:
        """SEDD's absorbing output scaling ``raw - log(e^sigma_bar - 1) - log N`` (when ``scale_by_sigma``)."""
        if not self.config.scale_by_sigma:
            return raw
        offset = torch.log(torch.expm1(sigma_bar)) + math.log(self.config.num_tokens)
        return raw - offset.reshape(offset.shape + (1,) * (raw.dim() - offset.dim()))

    def _parameterize(self, raw: Tensor, input_ids: Tensor, sigma_bar: Tensor | None) -> Tensor:
        """Turn raw head outputs ``[..., S]`` into log-probabilities (subs, x0) or log-scores (score)."""
        if self.config.parameterization == "subs":
            return subs_log_probs(raw, input_ids, self.config.mask_token_id)
        if self.config.parameterization == "x0" and self.config.process == "uniform":
            return _x0_log_probs(raw, input_ids, sigma_bar)
        if self.config.parameterization == "x0":  # nearest_neighbour: the kernel's row of x_t as the start
            return (raw.float() + self.neighbour_graph.log_prior(input_ids, sigma_bar)).log_softmax(-1)
        return self._scale_scores(raw, sigma_bar).scatter(-1, input_ids.unsqueeze(-1), 0.0)
