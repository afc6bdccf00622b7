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
- SPG (Wang et al., "SPG: Sandwiched Policy Gradient for Masked Diffusion Language Models", 2025): no ratio; a
  completion with ``A_i >= 0`` has its likelihood raised through the ELBO (a lower bound), one with ``A_i < 0``
  has it lowered through ``omega * EUBO + (1 - omega) * ELBO`` (the EUBO an upper bound, the mixture trades its
  bias for the ELBO's lower variance), so each direction pushes on a bound of the right side.  Per token k, with
  ``w(t) = 1/t`` the ELBO weight and ``beta >= 1``:
  ``ELBO_k = E_t,x_t[w(t) 1(k masked) log p(y_k | x_t)]`` and
  ``EUBO_k = (1/beta) log E_t,x_t[w(t) 1(k masked) p(y_k | x_t)^beta]``; Jensen's and the power-mean inequality
  give ``sum_k ELBO_k <= log p(y) <= sum_k EUBO_k`` when the conditionals are exact.  The loss is
  ``-sum_i A_i sum_k m_ik J_ik / sum_ik m_ik`` with J the bound chosen by the sign of A_i.
- DPO (Rafailov et al. 2023) with ELBOs in place of log-likelihoods (LLaDA 1.5's VRPO, Zhu et al. 2025): for a pair
  (chosen c, rejected r) ``loss = -log sigmoid(beta [(l_theta(c) - l_ref(c)) - (l_theta(r) - l_ref(r))])``;
  with theta = ref and shared masks the margin is 0 and the loss is log 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["dpo_loss", "group_advantages", "k3_kl", "grpo_loss", "LossStats", "spg_loss", "spg_upper_bound", "wd1_loss",
           "wd1_weights"]


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
        advantages: ``[B]``, or ``[B, Lc]`` per token (token level only: tree rollouts' sibling advantages).
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
    if advantages.dim() == 2 and level != "token":
        raise ValueError(f"per-token advantages need level='token', got level={level!r}")
    m = mask.to(log_theta.dtype)
    if level == "token":
        # Positions outside the mask are zeroed before exp(): an overflow there would make 0 * inf = NaN.
        diff = torch.where(mask, log_theta - log_old, torch.zeros_like(log_theta))
        adv = (advantages[:, None] if advantages.dim() == 1 else advantages).to(log_theta.dtype)
        weight = m
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


def spg_upper_bound(log_probs: Tensor, weights: Tensor, *, beta: float = 1.0) -> Tensor:
    """``[B, Lc]`` per-token EUBO estimates ``(1/beta) log sum_v weights[v] exp(beta * log_probs[v])``.

    Args:
        log_probs: ``[V, B, Lc]`` ``log p(y_k | view_v)`` (any value where ``weights`` is 0).
        weights: ``[V, B, Lc]`` ``>= 0``, an unbiased quadrature of ``E_t,x_t[w(t) 1(k masked) .]`` (the
            estimators' draw weights, restricted to the completion).
        beta: the bound's exponent, ``>= 1`` (1: the log of the ELBO's own expectation of p).

    Every token must carry weight in some view (its bound is otherwise log 0); the estimate of the log is biased
    (Jensen again), which the mixture with the ELBO tempers.
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 1):
        raise ValueError(f"beta must be a finite number >= 1 (the upper bound needs it), got beta={beta!r}")
    if log_probs.shape != weights.shape:
        raise ValueError(f"log_probs {tuple(log_probs.shape)} and weights {tuple(weights.shape)} differ in shape")
    covered = (weights > 0).any(0)
    if not bool(covered.all()):
        raise ValueError(f"{int((~covered).sum())} completion tokens are masked in no view: their upper bound is "
                         "log 0 (use an estimator that masks every token at least once, e.g. 'coupled')")
    log_weights = torch.where(weights > 0, weights.to(log_probs.dtype).clamp_min(1e-300).log(),
                              torch.full_like(log_probs, -math.inf))
    return torch.logsumexp(beta * torch.where(weights > 0, log_probs, 0.0) + log_weights, dim=0) / beta


def spg_loss(elbo: Tensor, eubo: Tensor, advantages: Tensor, mask: Tensor, *, mixture: float = 0.5,
             normalizer: Tensor | float | None = None) -> Tensor:
    """SPG's sandwiched policy-gradient loss (to minimise): ``-sum_i A_i sum_k m_ik J_ik / normalizer``.

    Args:
        elbo, eubo: ``[B, Lc]`` per-token lower and upper bound estimates (differentiable).
        advantages: ``[B]``; ``J = elbo`` where ``A >= 0``, ``mixture * eubo + (1 - mixture) * elbo`` where ``A < 0``.
        mask: ``[B, Lc]`` bool, the tokens that count.
        mixture: omega in [0, 1] (0: the ELBO for both signs, which is then plain REINFORCE on the ELBO).
        normalizer: the number of scored tokens (default: this batch's); pass the global count with several
            processes, as for :func:`grpo_loss`.
    """
    if not (isinstance(mixture, (int, float)) and 0 <= mixture <= 1):
        raise ValueError(f"mixture must be in [0, 1], got mixture={mixture!r}")
    negative = (advantages < 0)[:, None]
    bound = torch.where(negative, mixture * eubo + (1 - mixture) * elbo, elbo)
    per_row = torch.where(mask, bound, torch.zeros_like(bound)).sum(-1)
    total = mask.sum().clamp_min(1) if normalizer is None else normalizer
    return -(advantages.to(per_row.dtype) * per_row).sum() / torch.as_tensor(total, dtype=per_row.dtype)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
             beta: float = 0.1, normalizer: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """DPO's loss (to minimise) and the margins ``beta [(l_theta(c) - l_ref(c)) - (l_theta(r) - l_ref(r))]``.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: ``[B]`` sequence log-likelihood (ELBO) estimates.
        beta: the inverse temperature of the implicit reward ``beta log(pi_theta / pi_ref)``.
        normalizer: the number of pairs the loss is averaged over (default: B; the global count with several
            processes).

    Returns:
        ``(loss, margins [B])``, the margins detached.

    >>> loss, _ = dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2))
    >>> round(float(loss), 6) == round(math.log(2), 6)
    True
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got beta={beta!r}")
    margins = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    total = margins.numel() if normalizer is None else normalizer
    loss = -torch.nn.functional.logsigmoid(margins).sum() / torch.as_tensor(total, dtype=margins.dtype)
    return loss, margins.detach()
