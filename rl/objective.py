"""GRPO maths: group advantages, the clipped surrogate, the k3 KL, token- or sequence-level ratios.

Notation: G completions per prompt with rewards r_i; log-likelihood estimates
``l_theta, l_old, l_ref`` per completion token ``[B, Lc]`` (B = prompts x G) under shared masks.

- advantages: ``A_i = (r_i - mean_g r) / (std_g r + std_eps)`` (``scale="group"``, GRPO) or ``r_i - mean_g r``
  (``scale="none"``, Dr. GRPO / d1 / GDPO).  Excluded completions (reward NaN) get A = 0 and do not enter
  the group statistics.
- token level: ``rho_k = exp(l_theta,k - l_old,k)``; loss ``= sum_k m_k * ell_k / sum_k m_k`` over the batch
  with ``ell_k = -min(rho_k A, clip(rho_k, 1 - clip_eps_low, 1 + clip_eps_high) A) + beta * KL3_k``.
- sequence level (GSPO / GDPO): ``rho = exp(sum_k m_k (l_theta,k - l_old,k) / sum_k m_k)``, one ``ell`` per
  completion, mean over completions; KL3 on the length-normalised sequence difference.
- ``KL3(ref, theta) = exp(ref - theta) - (ref - theta) - 1 >= 0`` (Schulman's k3; 0 when equal).
- wd1 (Tang et al., "wd1: Weighted Policy Optimization for Reasoning in Diffusion Language Models", 2025): no
  ratio and no clip; with ``l_i`` completion i's sequence log-likelihood estimate and, within its group,
  ``w+_i = softmax_g(A / tau)_i`` and ``w-_i = softmax_g(-A / tau)_i``, the loss is
  ``sum_i (w-_i - w+_i) l_i`` averaged over groups: likelihood is pushed up in proportion to w+ and down in
  proportion to w-, and a group whose advantages are all equal contributes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["group_advantages", "k3_kl", "grpo_loss", "LossStats", "wd1_loss", "wd1_weights"]


def group_advantages(rewards: Tensor, group_size: int, *, scale: str = "group", std_eps: float = 1e-4) -> Tensor:
    """``[B]`` advantages for rewards ``[B]`` laid out as consecutive groups of ``group_size``.

    NaN rewards (excluded completions) get advantage 0 and are left out of their group's mean and std.

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2, scale="none").tolist()
    [0.5, -0.5, -0.5, 0.5]
    """
    if scale not in ("group", "none"):
        raise ValueError(f"scale must be 'group' or 'none', got scale={scale!r}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [B] with B a multiple of group_size={group_size}, got {tuple(rewards.shape)}")
    r = rewards.double().view(-1, group_size)
    valid = ~torch.isnan(r)
    count = valid.sum(-1, keepdim=True).clamp_min(1)
    mean = torch.where(valid, r, 0).sum(-1, keepdim=True) / count
    centred = torch.where(valid, r - mean, 0)
    if scale == "group":
        std = (centred.pow(2).sum(-1, keepdim=True) / (count - 1).clamp_min(1)).sqrt()  # unbiased, as torch.std
        centred = centred / (std + std_eps)
    return centred.view(-1).to(rewards.dtype)


def k3_kl(log_ref: Tensor, log_theta: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref): ``exp(d) - d - 1`` with ``d = log_ref - log_theta``."""
    d = log_ref - log_theta
    return torch.expm1(d) - d


@dataclass
class LossStats:
    """Diagnostics of one loss evaluation (floats)."""

    ratio_mean: float
    clip_low: float  # fraction of scored units with rho < 1 - clip_eps_low and A < 0 (the clip is active)
    clip_high: float  # fraction with rho > 1 + clip_eps_high and A > 0
    kl: float


def grpo_loss(log_theta: Tensor, log_old: Tensor, advantages: Tensor, mask: Tensor, *, clip_eps_low: float = 0.2,
              clip_eps_high: float = 0.2, beta: float = 0.0, log_ref: Tensor | None = None,
              level: str = "token", normalizer: Tensor | float | None = None) -> tuple[Tensor, LossStats]:
    """The clipped GRPO surrogate (to minimise).

    Args:
        log_theta, log_old: ``[B, Lc]`` per-token log-likelihood estimates (same masks).
        advantages: ``[B]``.
        mask: ``[B, Lc]`` bool, completion tokens that count (up to and including the first EOS).
        log_ref: ``[B, Lc]`` for the KL term (needed when ``beta > 0``).
        level: ``"token"`` or ``"sequence"``.
        normalizer: the number of scored units (tokens or completions) the loss is averaged over (default: those
            of this batch).  With the batch split over processes, pass the global count: each process's loss and
            statistics are then its share of the global ones, and the shares add up.
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence', got level={level!r}")
    if beta > 0 and log_ref is None:
        raise ValueError(f"beta={beta} > 0 needs log_ref")
    m = mask.to(log_theta.dtype)
    if level == "token":
        # Positions outside the mask are zeroed before exp(): an overflow there would make 0 * inf = NaN.
        diff = torch.where(mask, log_theta - log_old, torch.zeros_like(log_theta))
        adv, weight = advantages[:, None].to(log_theta.dtype), m
        kl = (k3_kl(torch.where(mask, log_ref, log_theta), log_theta) if log_ref is not None
              else torch.zeros_like(log_theta))
    else:
        lengths = m.sum(-1).clamp_min(1)
        diff = torch.where(mask, log_theta - log_old, torch.zeros_like(log_theta)).sum(-1) / lengths
        adv, weight = advantages.to(log_theta.dtype), (m.sum(-1) > 0).to(log_theta.dtype)
        kl = (k3_kl(torch.where(mask, log_ref - log_theta, torch.zeros_like(log_theta)).sum(-1) / lengths,
                    torch.zeros_like(lengths))
              if log_ref is not None else torch.zeros_like(diff))
    ratio = torch.exp(diff)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * adv)
    per_unit = -surrogate + beta * kl
    total = weight.sum().clamp_min(1) if normalizer is None else torch.as_tensor(normalizer, dtype=weight.dtype)
    loss = (per_unit * weight).sum() / total
    with torch.no_grad():
        low = ((ratio < 1 - clip_eps_low) & (adv < 0)).to(weight.dtype)
        high = ((ratio > 1 + clip_eps_high) & (adv > 0)).to(weight.dtype)
        stats = LossStats(ratio_mean=float((ratio * weight).sum() / total), clip_low=float((low * weight).sum() / total),
                          clip_high=float((high * weight).sum() / total), kl=float((kl * weight).sum() / total))
    return loss, stats


def wd1_weights(advantages: Tensor, group_size: int, *, temperature: float = 1.0,
                valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(w+, w-)``, each ``[B]`` float64: ``softmax(A / tau)`` and ``softmax(-A / tau)`` within each group of
    ``group_size`` consecutive completions, over the ``valid [B]`` ones only (the others, and groups with none, get 0).

    >>> [round(w, 4) for w in wd1_weights(torch.tensor([1.0, -1.0]), 2)[0].tolist()]
    [0.8808, 0.1192]
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got temperature={temperature!r}")
    if advantages.dim() != 1 or advantages.numel() % group_size:
        raise ValueError(f"advantages must be [B] with B a multiple of group_size={group_size}, "
                         f"got {tuple(advantages.shape)}")
    scaled = advantages.double().view(-1, group_size) / temperature
    ok = torch.ones_like(scaled, dtype=torch.bool) if valid is None else valid.view(-1, group_size)
    plus = torch.softmax(scaled.masked_fill(~ok, -math.inf), dim=-1).nan_to_num(0.0)  # all-invalid group: NaN -> 0
    minus = torch.softmax((-scaled).masked_fill(~ok, -math.inf), dim=-1).nan_to_num(0.0)
    return plus.view(-1), minus.view(-1)


def wd1_loss(log_likelihood: Tensor, advantages: Tensor, group_size: int, *, temperature: float = 1.0,
             valid: Tensor | None = None, normalizer: Tensor | float | None = None) -> Tensor:
    """wd1's weighted-likelihood loss (to minimise): ``sum_i (w-_i - w+_i) l_i / number of groups``.

    Args:
        log_likelihood: ``[B]`` sequence log-likelihood estimates ``l_i`` (differentiable).
        advantages: ``[B]``, groups of ``group_size`` consecutive completions.
        temperature: tau of the softmax weights.
        valid: ``[B]`` bool, completions that count (default: all).
        normalizer: the number of groups the loss is averaged over (default: this batch's groups with a valid
            completion); with the batch split over processes, pass the global count, as for :func:`grpo_loss`.
    """
    plus, minus = wd1_weights(advantages, group_size, temperature=temperature, valid=valid)
    weights = (minus - plus).to(log_likelihood.dtype)
    if normalizer is None:
        groups = (plus.view(-1, group_size).sum(-1) > 0).sum().clamp_min(1)
        normalizer = groups.to(log_likelihood.dtype)
    return (weights * log_likelihood).sum() / torch.as_tensor(normalizer, dtype=log_likelihood.dtype)
