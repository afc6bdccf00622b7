"""Confidence remasking (MaskGIT / LLaDA low-confidence, top-k margin, entropy, random), optionally
semi-autoregressive in blocks (LLaDA).

The canvas is cut into blocks of ``block_length`` positions (one block when None), decoded left to
right; each block that has free positions gets ``num_steps / blocks`` steps.  In every step the model
predicts x0 at all positions; among the still-masked positions of the current block the ``k`` most
confident are committed, ``k`` from :func:`transfer_schedule` (the masked count split as evenly as
possible over the block's steps, larger shares first), and the rest stay masked.  Committed tokens and
the prompt never change.

Confidence of a prediction with distribution p and chosen token y: ``low_confidence`` p(y);
``margin`` p(1st) - p(2nd); ``entropy`` -H(p); ``random`` a uniform draw.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from diffusion.losses import categorical_entropy
from diffusion.spec import DiffusionSpec

from .base import (
    FREE,
    SampleOutput,
    Sampler,
    check_filters,
    check_positive_int,
    check_stop_at_eos,
    eos_id_of,
    finish_at_eos,
    register_sampler,
    sample_categorical,
    sequence_lengths,
    split_steps,
    token_probs,
    uniforms,
)
from .kv_cache import BlockCaller, CachePolicy, cache_policy, check_kv_cache

__all__ = ["STRATEGIES", "ConfidenceRemaskingSampler", "decode_blocks", "transfer_schedule"]

STRATEGIES = ("low_confidence", "margin", "entropy", "random")


def transfer_schedule(masked: Tensor, steps: int) -> Tensor:
    """How many tokens to commit at each step: ``[B] -> [B, steps]``, rows sum to ``masked``, entries
    differ by at most one and never increase."""
    base = masked // steps
    extra = masked % steps
    return base[:, None] + (torch.arange(steps, device=masked.device)[None] < extra[:, None]).long()


def confidence(probs: Tensor, chosen: Tensor, strategy: str, random_scores: Tensor | None = None) -> Tensor:
    """``[...]`` confidence of choosing ``chosen [...]`` under ``probs [..., V]`` (higher is surer); the ``random``
    strategy returns ``random_scores`` (uniforms the caller drew)."""
    if strategy == "low_confidence":
        return probs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    if strategy == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if strategy == "entropy":
        return (probs * probs.clamp_min(1e-300).log()).sum(-1)
    if random_scores is None:
        raise ValueError("strategy='random' needs random_scores")
    return random_scores


def decode_blocks(model: Any, spec: DiffusionSpec, canvas: Tensor, num_steps: int, block_length: int | None, *,
                  strategy: str,
                  temperature: float, top_k: int | None, top_p: float | None, threshold: float | None,
                  generator: torch.Generator | None, return_trajectory: bool, callback: Any,
                  kv_cache: CachePolicy | str | None = None, eos_id: int | None = None,
                  entropy_bound: float | None = None, edit_threshold: float | None = None) -> SampleOutput:
    """The shared block / step loop of confidence remasking and threshold decoding.

    With ``threshold`` set, a step commits every masked token of the block whose confidence exceeds it,
    and at least the scheduled count (so the block always finishes in its steps).  ``kv_cache`` (a
    :class:`~samplers.kv_cache.CachePolicy` or its mode) reuses keys/values computed at earlier calls of the block
    (see :mod:`samplers.kv_cache`).
    With ``eos_id`` set, a row that has generated EOS after a block is finished and the loop stops once every
    row is (variable-length generation); ``lengths`` then says where each row ends.
    With ``entropy_bound`` set (the EB-sampler's rule), a step also commits, in order of increasing entropy
    H(p) = -sum p log p of the model's prediction, the masked positions of the block whose summed entropy stays within
    the bound, and always the lowest-entropy one: a bound of 0 commits one token per step (or the scheduled count,
    if more).
    With ``edit_threshold`` set (LLaDA 2.1's token editing), the same call also reads the model's prediction at the
    block's generated positions already committed, and replaces such a token by the model's most likely token y* when
    y* differs from it and p(y*) > ``edit_threshold`` (so 1 never edits).  Edits happen only in the block's steps
    (no extra calls); the prompt is never edited.
    """
    if kv_cache is not None and not getattr(model, "supports_kv_cache", False):
        raise ValueError(f"kv_cache={getattr(kv_cache, 'mode', kv_cache)!r} needs a model whose forward takes "
                         f"past_key_values (a DDiTModel)")
    check_edits(model, edit_threshold)
    mask_id, schedule = spec.mask_id, spec.schedule
    x = torch.where(canvas == FREE, torch.full_like(canvas, mask_id), canvas)
    batch, length = x.shape
    block_length = block_length or length
    starts = [b for b in range(0, length, block_length) if bool((canvas[:, b : b + block_length] == FREE).any())]
    block_steps = split_steps(num_steps, len(starts), block_length)
    positions = torch.arange(length, device=x.device)
    nfe, trajectory = 0, [x.clone()] if return_trajectory else None
    for start, steps_per_block in zip(starts, block_steps):
        in_block = (positions >= start) & (positions < start + block_length)
        counts = transfer_schedule(((x == mask_id) & in_block).sum(-1), steps_per_block)
        call = BlockCaller(model, kv_cache, start, min(start + block_length, length))  # the last block may be short
        for step in range(steps_per_block):
            masked = (x == mask_id) & in_block
            if not bool(masked.any()):
                break
            fraction = masked.sum().item() / max(1, ((canvas == FREE) & in_block).sum().item())
            sigma_bar = schedule.total_noise(torch.tensor(min(max(fraction, 1e-3), 1.0), dtype=torch.float64))
            sigma_bar = sigma_bar.float().expand(batch).to(x.device)
            if edit_threshold is None:
                log_probs = call(x, sigma_bar, masked)  # (n, V) at masked positions
            else:
                editable = in_block & (canvas == FREE) & ~masked
                read = call(x, sigma_bar, masked | editable, carry_unmasked=False)  # row-major over masked | editable
                log_probs, edit_log_probs = read[masked[masked | editable]], read[editable[masked | editable]]
            nfe += 1
            # Uniforms for every position (cache or not); distributions only for the block's masked positions.
            u = uniforms(x.shape, generator, x.device)
            # Confidence is read off the model's own distribution, whatever filters chose the token.
            model_probs = token_probs(log_probs, exclude=mask_id)
            if temperature == 0:
                picked = model_probs.argmax(-1)
            else:
                unfiltered = temperature == 1 and top_k is None and top_p is None
                probs = model_probs if unfiltered else token_probs(
                    log_probs, exclude=mask_id, temperature=temperature, top_k=top_k, top_p=top_p)
                picked = sample_categorical(probs, None, u=u[masked])
            drawn = uniforms(x.shape, generator, x.device)[masked][:, None] if strategy == "random" else None
            scores = confidence(model_probs[:, None], picked[:, None], strategy, drawn)[:, 0]
            chosen = x.clone()
            chosen[masked] = picked
            conf = torch.full(x.shape, -math.inf, dtype=torch.float64, device=x.device)
            quota = counts[:, step : step + 1]
            if entropy_bound is not None:  # order by entropy instead; commit the bound's share if above the quota
                entropy = categorical_entropy(model_probs)
                conf[masked] = -entropy
                quota = torch.maximum(quota, _count_within_bound(conf, entropy_bound)[:, None])
            else:
                conf[masked] = scores
            rank = conf.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = most confident
            commit = (rank < quota) & masked
            if threshold is not None:
                commit |= masked & (conf > threshold)
            x = torch.where(commit, chosen, x)
            if edit_threshold is not None:
                x = _edit(x, editable, edit_log_probs, edit_threshold, mask_id)
            if trajectory is not None:
                trajectory.append(x.clone())
            if callback is not None:
                callback(nfe - 1, x)
        if eos_id is not None:
            x, done = finish_at_eos(x, canvas, start + block_length, eos_id)
            if bool(done.all()):
                break
    lengths = sequence_lengths(x, canvas, eos_id) if eos_id is not None else None
    return SampleOutput(tokens=x, nfe=nfe, trajectory=trajectory, lengths=lengths)


def check_edit_threshold(edit_threshold: float | None) -> None:
    if edit_threshold is not None and not (isinstance(edit_threshold, (int, float))
                                           and not isinstance(edit_threshold, bool) and 0 <= edit_threshold <= 1):
        raise ValueError(f"edit_threshold must be a probability in [0, 1] or None, got edit_threshold={edit_threshold!r}")


def check_edits(model: Any, edit_threshold: float | None) -> None:
    """Refuse token editing (before any call) with a bad threshold or a model whose outputs carry unmasked tokens."""
    check_edit_threshold(edit_threshold)
    if edit_threshold is not None and not getattr(model, "predicts_unmasked", False):
        raise ValueError(f"edit_threshold={edit_threshold!r} needs a model that predicts tokens at unmasked positions "
                         f"(an outside model through diffusion.adapters); a {type(model).__name__}'s subs outputs carry "
                         f"every unmasked token over, so it could never edit")


def _edit(x: Tensor, editable: Tensor, log_probs: Tensor, threshold: float, mask_id: int) -> Tensor:
    """Replace ``x`` at ``editable [B, L]`` positions by the model's argmax y* where y* != x and p(y*) > threshold;
    ``log_probs [n, V]`` are the model's predictions there (row-major)."""
    probs = token_probs(log_probs, exclude=mask_id)
    best, best_id = probs.max(-1)
    replace = (best_id != x[editable]) & (best > threshold)
    edited = x.clone()
    edited[editable] = torch.where(replace, best_id, x[editable])
    return edited


def _count_within_bound(neg_entropy: Tensor, bound: float) -> Tensor:
    """``[B]``: how many positions of each row, lowest entropy first, fit with summed entropy at most ``bound``
    (at least 1).  ``neg_entropy [B, L]`` holds -H at candidate positions and -inf elsewhere."""
    ordered = (-neg_entropy).sort(dim=-1).values  # ascending entropy; inf (not a candidate) last
    return ((ordered.cumsum(-1) <= bound).sum(-1)).clamp_min(1)


@register_sampler
class ConfidenceRemaskingSampler(Sampler):
    """Confidence remasking with optional semi-autoregressive blocks.

    Args:
        strategy: ``low_confidence`` (LLaDA), ``margin``, ``entropy`` or ``random``.
        block_length: positions per block for semi-autoregressive decoding (None: one block).
        temperature, top_k, top_p: filters on the predictions (temperature 0: argmax, LLaDA's setting, which repeats
            itself on small models; the default 1 samples).
        kv_cache: ``prefix``, ``dual`` (Fast-dLLM) or ``delayed`` (dKV-Cache) block KV cache (needs
            ``block_length``), or None; see :mod:`samplers.kv_cache`.
        cache_refresh_every: with a cache, a full call every this many calls of a block (1: exact); None: never.
        cache_refresh_changed: with a cache, a full call once more than this fraction of the block was committed
            since the cache was built; None: never.
        stop_at_eos: finish a row once a block holds its EOS and stop when every row has (needs ``block_length``).
        entropy_bound: also commit the lowest-entropy masked positions while their summed entropy stays within this
            bound (EB-sampler); None: off.  The scheduled count stays the floor.
        edit_threshold: token editing (LLaDA 2.1): a committed generated token of the current block becomes the model's
            most likely token when that differs and its probability exceeds this; 1 never edits; None: off.  Needs a
            model that predicts at unmasked positions (``predicts_unmasked``: the adapters of :mod:`diffusion.adapters`).
    """

    name = "remask"
    masked_only = True

    def __init__(self, strategy: str = "low_confidence", block_length: int | None = None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, kv_cache: str | None = None,
                 stop_at_eos: bool = False, entropy_bound: float | None = None,
                 edit_threshold: float | None = None, cache_refresh_every: int | None = None,
                 cache_refresh_changed: float | None = None) -> None:
        if entropy_bound is not None and not (isinstance(entropy_bound, (int, float)) and math.isfinite(entropy_bound)
                                              and entropy_bound >= 0):
            raise ValueError(f"entropy_bound must be a finite number >= 0, got entropy_bound={entropy_bound!r}")
        self.entropy_bound = entropy_bound
        check_edit_threshold(edit_threshold)
        self.edit_threshold = edit_threshold
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got strategy={strategy!r}")
        if block_length is not None:
            check_positive_int("block_length", block_length)
        check_kv_cache(kv_cache, block_length, cache_refresh_every, cache_refresh_changed)
        check_filters(temperature, top_k, top_p)
        check_stop_at_eos(stop_at_eos, block_length)
        self.strategy, self.block_length, self.stop_at_eos = strategy, block_length, stop_at_eos
        self.kv_cache = cache_policy(kv_cache, cache_refresh_every, cache_refresh_changed)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def _generate(self, model: Any, spec: DiffusionSpec, canvas: Tensor, num_steps: int,
                  generator: torch.Generator | None, return_trajectory: bool, callback: Any) -> SampleOutput:
        return decode_blocks(model, spec, canvas, num_steps, self.block_length, strategy=self.strategy,
                             temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, threshold=None,
                             generator=generator, return_trajectory=return_trajectory, callback=callback,
                             kv_cache=self.kv_cache, eos_id=eos_id_of(model) if self.stop_at_eos else None,
                             entropy_bound=self.entropy_bound, edit_threshold=self.edit_threshold)
