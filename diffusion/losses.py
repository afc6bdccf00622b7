"""Training losses of discrete diffusion LMs, each a per-sequence upper bound on -log p(x0) in nats.

* :func:`score_entropy_loss` (SEDD): the diffusion-weighted denoising score entropy
  ``sigma(t) sum_i SE_i(s_theta(x_t, t), x_t, x0)`` for the absorbing or uniform process.
* :func:`masked_diffusion_loss` (MDLM / RADD, absorbing): the masked cross-entropy ELBO
  ``sigma(t) / (exp(sigma_bar(t)) - 1) sum_{i masked} -log p_theta(x0_i | x_t)``
  (``1 / t`` for the log-linear schedule).

Averaged over ``t ~ U(t_eps, 1)`` (see :func:`sample_t`) either gives the negative ELBO up to the
truncation at ``t_eps``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .processes import Process
from .schedules import Schedule

__all__ = ["masked_diffusion_loss", "sample_t", "score_entropy_loss"]


def sample_t(
    batch_size: int,
    *,
    eps: float = 1e-3,
    antithetic: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw diffusion times ``t in [eps, 1)`` for a batch, ``Tensor[batch_size]``.

    With ``antithetic=True`` the draws are stratified (MDLM's low-discrepancy sampler):
    ``u_i = (i + U_i) / n`` puts exactly one ``u`` in each stratum ``[i/n, (i+1)/n)``, which lowers
    the variance of the batch-mean loss without biasing it.  Then ``t = eps + (1 - eps) u``.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int, got batch_size={batch_size!r}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got eps={eps!r}")
    u = torch.rand(batch_size, generator=generator, device=device, dtype=dtype)
    if antithetic:
        u = (u + torch.arange(batch_size, device=device, dtype=dtype)) / batch_size
    return eps + (1.0 - eps) * u


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
    return sigma.to(se.dtype) * se.sum(-1)


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
    """Masked cross-entropy ELBO (MDLM / RADD), per sequence.

    ``L(x0, t) = w(t) sum_{i : x_t^i = MASK} -log p_theta(x0^i | x_t)``, ``w(t) = sigma(t) / expm1(sigma_bar(t))``.

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
    nll = -log_probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)  # (B, L)
    masked = (xt == mask_id) if mask_id is not None else (xt != x0)
    if attention_mask is not None:
        masked = masked & attention_mask.bool()
    nll = torch.where(masked, nll, torch.zeros_like(nll))
    return schedule.elbo_weight(t).to(nll.dtype) * nll.sum(-1)
