"""The training objectives' formulas, each a per-sequence upper bound on -log p(x0) in nats, written once.

* The masked ELBO (MDLM / RADD, absorbing): ``w(t) sum_{i : x_t^i = MASK} -log p_theta(x0^i | x_t)`` with
  ``w(t) = sigma(t) / (exp(sigma_bar(t)) - 1)`` (``1/t`` for the log-linear schedule, and ``1/lambda`` when
  time is the masking probability lambda).  :func:`masked_nll` is its per-position term and
  :func:`masked_elbo` the weighted sum; the training objective, the likelihood bound, the RL estimators and
  masked SFT all call them.
* Score entropy (SEDD, absorbing or uniform): ``sigma(t) sum_i SE_i(s_theta(x_t, t), x_t, x0)``
  (:func:`score_entropy_loss`; the per-position ``SE_i`` is :meth:`diffusion.processes.Process.score_entropy`).

Both share the outer form ``w(t) sum_i term_i`` (:func:`weighted_row_sum`), over a dense ``[B, L]`` batch
or over packed positions ``[n]`` with the row of each.  Averaged over ``t ~ U(t_min, 1)``
(:func:`diffusion.time_nodes.sample_t`) either gives the negative ELBO up to the truncation at ``t_min``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .processes import Process
from .schedules import Schedule

__all__ = ["categorical_entropy", "masked_diffusion_loss", "masked_elbo", "masked_nll", "score_entropy_loss", "weighted_row_sum"]


def weighted_row_sum(terms: Tensor, weight: Tensor | None = None, rows: Tensor | None = None, *,
                     position_weight: Tensor | None = None, batch: int | None = None) -> Tensor:
    """``w_b sum_i terms_{b,i}`` (``weight [B]``, one per row) or ``sum_i w_i terms_{b,i}`` (``position_weight``
    shaped like ``terms``, one per position: block diffusion's per-block levels).

    ``terms [B, L]`` (dense), or ``[n]`` with ``rows [n]`` naming each one's row (``B`` from ``weight``, else
    ``batch``).  Returns ``Tensor[B]`` in ``terms``' dtype.
    """
    if (weight is None) == (position_weight is None):
        raise ValueError("pass exactly one of weight (per row) and position_weight (per term)")
    if position_weight is not None:
        terms = terms * position_weight.to(terms.dtype)
    if rows is None:
        sums = terms.sum(-1)
    else:
        rows_total = weight.shape[0] if weight is not None else batch
        if rows_total is None:
            raise ValueError("packed terms with position weights need batch (the number of rows)")
        sums = torch.zeros(rows_total, dtype=terms.dtype, device=terms.device).index_add(0, rows, terms)
    return sums if weight is None else weight.to(terms.dtype) * sums


def categorical_entropy(probs: Tensor) -> Tensor:
    """``H(p) = -sum_v p_v log p_v`` in float64, ``[..., V] -> [...]`` (0 log 0 = 0).

    >>> round(float(categorical_entropy(torch.tensor([0.5, 0.5]))), 6)
    0.693147
    """
    p = probs.double()
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


def masked_nll(log_probs: Tensor, targets: Tensor, masked: Tensor | None = None) -> Tensor:
    """``-log p_theta(x0^i | x_t)`` at the positions ``masked`` selects, 0 elsewhere.

    Args:
        log_probs: ``[..., S]`` log-probabilities (half precision is read in float32).
        targets: ``LongTensor[...]`` the clean tokens x0.
        masked: optional ``BoolTensor[...]``; None scores every position (already selected ones, say).

    Returns:
        ``Tensor[...]`` shaped like ``targets``.
    """
    if log_probs.dtype in (torch.float16, torch.bfloat16):
        log_probs = log_probs.float()
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return nll if masked is None else torch.where(masked, nll, torch.zeros_like(nll))


def masked_elbo(log_probs: Tensor, x0: Tensor, masked: Tensor | None, weight: Tensor | None = None, *,
                rows: Tensor | None = None, position_weight: Tensor | None = None, batch: int | None = None) -> Tensor:
    """The masked-diffusion ELBO integrand per sequence, ``w_b sum_{i masked} -log p_theta(x0^i | x_t)``.

    Args:
        log_probs: ``[B, L, S]``, or ``[n, S]`` at packed (already selected) positions.
        x0: ``LongTensor[B, L]``, or ``[n]``.
        masked: ``BoolTensor[B, L]`` (dense) or None (packed: every given position is masked).
        weight: ``[B]`` the ELBO weight ``w(t)`` of each row; or ``position_weight`` shaped like ``x0``, the
            weight of each position (``w(t_b)`` of its block, block diffusion).
        rows: ``[n]`` the row of each packed position (packed form only); ``batch``: the number of rows when
            ``position_weight`` replaces ``weight``.

    Returns:
        ``Tensor[B]`` in nats.
    """
    return weighted_row_sum(masked_nll(log_probs, x0, masked), weight, rows, position_weight=position_weight,
                            batch=batch)


def _check_tokens(x0: Tensor, xt: Tensor, t: Tensor, outputs: Tensor) -> None:
    if x0.shape != xt.shape or x0.dim() != 2:
        raise ValueError(f"x0 and xt must both be [batch, length], got {tuple(x0.shape)} and {tuple(xt.shape)}")
    if outputs.shape[:2] != x0.shape:
        raise ValueError(f"model output shape {tuple(outputs.shape)} does not start with tokens shape {tuple(x0.shape)}")
    if t.shape != (x0.shape[0],):
        raise ValueError(f"t must have shape [batch] = ({x0.shape[0]},), got {tuple(t.shape)}")


def score_entropy_loss(
    model_output: Tensor,
    x0: Tensor,
    xt: Tensor,
    t: Tensor,
    process: Process,
    schedule: Schedule,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Diffusion-weighted denoising score entropy (SEDD), per sequence.

    ``L(x0, t) = sigma(t) sum_i SE(s_hat_i, sigma_bar(t), x_t^i, x0^i)``; ``E_t L`` bounds -log p(x0)
    (up to the prior term, which vanishes for the absorbing process).

    Args:
        model_output: ``[B, L, num_states]`` log-scores ``log s_theta(x_t)``.
        x0, xt: ``LongTensor[B, L]`` clean and noisy tokens.
        t: ``[B]`` diffusion times.
        attention_mask: optional ``[B, L]``; positions with 0 (padding) are not scored.

    Returns:
        ``Tensor[B]`` in nats per sequence.
    """
    _check_tokens(x0, xt, t, model_output)
    sigma_bar, sigma = schedule(t)
    se = process.score_entropy(model_output, sigma_bar, xt, x0)  # (B, L)
    if attention_mask is not None:
        se = se * attention_mask.to(se.dtype)
    return weighted_row_sum(se, sigma)


def masked_diffusion_loss(
    logits: Tensor,
    x0: Tensor,
    xt: Tensor,
    t: Tensor,
    schedule: Schedule,
    *,
    mask_id: int | None = None,
    attention_mask: Tensor | None = None,
    normalized: bool = False,
) -> Tensor:
    """Masked cross-entropy ELBO (MDLM / RADD), per sequence: :func:`masked_elbo` at ``w(t)`` of ``schedule``.

    Args:
        logits: ``[B, L, S]`` unnormalised scores or log-probabilities of x0 (normalised here over
            the last dimension; a denoiser must give MASK probability 0 for this to be an ELBO).
        x0, xt: ``LongTensor[B, L]`` clean and noisy tokens.
        t: ``[B]`` diffusion times.
        mask_id: the MASK id; when omitted a position counts as masked iff ``xt != x0``, which is the
            same thing for the absorbing process.
        attention_mask: optional ``[B, L]``; positions with 0 (padding) are not scored.
        normalized: ``logits`` already are log-probabilities (a ``subs`` denoiser's output), so the
            log-softmax is skipped.

    Returns:
        ``Tensor[B]`` in nats per sequence.
    """
    _check_tokens(x0, xt, t, logits)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    log_probs = logits if normalized else torch.log_softmax(logits, -1)
    masked = (xt == mask_id) if mask_id is not None else (xt != x0)
    if attention_mask is not None:
        masked = masked & attention_mask.bool()
    return masked_elbo(log_probs, x0, masked, schedule.elbo_weight(t))
