"""D3PM in discrete time (Austin et al., NeurIPS 2021) on ddlm's processes: T steps of one schedule.

Row-vector convention of the paper: ``q(x_k | x_{k-1}) = Cat(x_k; x_{k-1} Q_k)`` and ``q(x_k | x_0) = Cat(x_k; x_0
Q_bar_k)`` with ``Q_bar_k = Q_1 ... Q_k``.  ddlm's continuous processes (absorbing, uniform; rate matrix ``Q``) and a
schedule ``sigma_bar(t)`` give the discrete chain on the grid ``t_k = k / T``:

    sigma_k = sigma_bar(k / T)  (sigma_0 = 0: x_0 is the data),    Q_k = exp((sigma_k - sigma_{k-1}) Q),
    Q_bar_k = exp(sigma_k Q)  (the kernels of one process commute, so the product is the exponential of the sum).

The D3PM transitions of the two existing families are of this form: the uniform ``Q_k = (1 - beta_k) I + beta_k
11^T / N`` with ``1 - beta_k = e^{-(sigma_k - sigma_{k-1})}``, and the absorbing ``Q_k = (1 - beta_k) I + beta_k 1
e_MASK^T``; the paper's absorbing schedule ``beta_k = 1 / (T - k + 1)`` is :data:`diffusion.schedules.
LINEAR_MASKING` (``alpha_bar_k = 1 - k / T``, all MASK at k = T).

- :meth:`DiscreteTime.posterior`: ``q(x_{k-1} | x_k, x_0) = (x_k Q_k^T) * (x_0 Q_bar_{k-1}) / (x_0 Q_bar_k x_k^T)``;
  given a distribution ``p~(x_0 | x_k)`` instead of ``x_0`` it is the x0-parameterised reverse step, the mixture
  of posteriors ``p_theta(x_{k-1} | x_k) = sum_x0 p~(x_0 | x_k) q(x_{k-1} | x_k, x_0) ~ (x_k Q_k^T) * ((p~ / w)
  Q_bar_{k-1})`` with ``w(x_0) = q(x_k | x_0)``.  Choice: the paper's eq. 4 weights the joint ``q(x_{k-1}, x_k |
  x_0)`` by p~ instead (no ``/ w``); with the mixture, p~ is the posterior ``p(x_0 | x_k)`` under every objective
  (the continuous ELBO through the score identity, the hybrid loss's cross-entropy) and the SEDD analytic step of
  the same model is this step.  The two agree for the absorbing process, where ``w`` is the same for every real
  ``x_0`` at a masked position; they differ for the uniform one, where ``x_k = x_0`` is the likelier pair.
- :meth:`DiscreteTime.vb_terms`: per position, ``L_1 = -log p_theta(x_0 | x_1)`` and for k >= 2
  ``L_{k-1} = KL(q(x_{k-1} | x_k, x_0) || p_theta(x_{k-1} | x_k))``; :meth:`DiscreteTime.prior_kl` is
  ``KL(q(x_T | x_0) || p(x_T))`` with ``p(x_T)`` the law of x_T when x_0 is a uniformly drawn real token (all MASK
  up to the schedule's ``e^{-sigma_T}``; exactly uniform for the uniform process).
- The bound ``L_vb = prior_kl + sum_{k=1}^T E_{q(x_k | x_0)} L_{k-1}`` is estimated with one ``k ~ U{1..T}`` per row
  as ``prior_kl + T * L_{k-1}`` (:meth:`DiscreteTime.loss`); the hybrid loss adds ``lambda * -log p~(x_0 | x_k)``
  (the paper's ``L_lambda``; lambda = 0 is ``L_vb``).

For the absorbing process with an x0-parameterised (``subs``) model each KL term is ``a_k sum_{i masked} -log
p~(x_0^i | x_k)`` with ``a_k = (alpha_bar_{k-1} - alpha_bar_k) / (1 - alpha_bar_k)``: the bound is a right
Riemann sum of the continuous masked ELBO's integral over the masking probability, which it approaches from above
as T grows (the continuous ELBO is the T -> infinity limit; MDLM, Sahoo et al. 2024, section 3.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .processes import AbsorbingProcess, Process
from .schedules import Schedule

__all__ = ["DiscreteTime", "categorical_kl"]

_TINY = 1e-30  # probabilities are clamped here before a log; a true zero meets a zero weight


def categorical_kl(q: Tensor, p: Tensor) -> Tensor:
    """``KL(q || p) = sum_j q_j (log q_j - log p_j)`` over the last dim, 0 where ``q_j = 0``."""
    terms = q * (torch.log(q.clamp_min(_TINY)) - torch.log(p.clamp_min(_TINY)))
    return torch.where(q > 0, terms, torch.zeros_like(terms)).sum(-1)


@dataclass(frozen=True)
class DiscreteTime:
    """The T-step chain of ``process`` under ``schedule`` (see the module docstring)."""

    process: Process
    schedule: Schedule
    steps: int

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"discrete time needs T >= 1 steps, got T={self.steps!r}")

    def sigma(self, k: Tensor) -> Tensor:
        """``sigma_k = sigma_bar(k / T)`` (float64), exactly 0 at k = 0."""
        k = torch.as_tensor(k)
        value = self.schedule.total_noise(k.double() / self.steps)
        return torch.where(k == 0, torch.zeros_like(value), value)

    def _check_k(self, k: Tensor, low: int) -> Tensor:
        k = torch.as_tensor(k, dtype=torch.long)
        if bool(((k < low) | (k > self.steps)).any()):
            raise ValueError(f"step k must be in {low}..{self.steps}, got {sorted(set(k.flatten().tolist()))[:5]}")
        return k

    def marginal(self, x0: Tensor, k: Tensor) -> Tensor:
        """``q(x_k | x_0) = x_0 Q_bar_k``: ``[..., S]`` for ids ``x0 [...]`` and steps ``k`` broadcasting against
        them from the left (``[B]`` for ``[B, L]``)."""
        return self.process.transition_probs(x0, self.sigma(self._check_k(k, 0)))

    def step(self, x_prev: Tensor, k: Tensor) -> Tensor:
        """``q(x_k | x_{k-1}) = x_{k-1} Q_k`` as ``[..., S]``."""
        k = self._check_k(k, 1)
        return self.process.transition_probs(x_prev, self.sigma(k) - self.sigma(k - 1))

    def posterior(self, x_k: Tensor, x0_probs: Tensor, k: Tensor) -> Tensor:
        """``sum_x0 x0_probs(x_0) q(x_{k-1} | x_k, x_0)`` for a distribution ``x0_probs [..., S]`` over x_0 (one-hot:
        the true posterior; a model's ``p~(x_0 | x_k)``: the x0-parameterised ``p_theta(x_{k-1} | x_k)``, see the
        module docstring), ``[..., S]`` float64."""
        k = self._check_k(k, 1)
        sigma_now, sigma_before = self.sigma(k), self.sigma(k - 1)
        into = self.process.reverse_transition(x_k, sigma_now - sigma_before).double()  # x_k Q_k^T: q(x_k | x_{k-1}=.)
        reach = self.process.reverse_transition(x_k, sigma_now).double()  # w = q(x_k | x_0=.)
        weights = torch.where(reach > 0, x0_probs.double() / reach.clamp_min(_TINY), torch.zeros_like(reach))
        before = self.process.push_probs(weights, sigma_before)  # (p~ / w) Q_bar_{k-1}
        joint = into * before
        return joint / joint.sum(-1, keepdim=True).clamp_min(_TINY)

    def masked_weight(self, k: Tensor) -> Tensor:
        """Absorbing process, x0-parameterised model: the weight ``w_k`` with ``T L_{k-1} = w_k sum_{i masked} -log
        p~(x_0^i | x_k)`` (float64): ``T`` at k = 1 (the reconstruction term), ``T a_k`` with ``a_k = (alpha_bar_{k-1} -
        alpha_bar_k) / (1 - alpha_bar_k)`` above (the KL between two distributions that differ only in how the
        unmasking mass ``a_k`` is spread).  Unmasked positions carry no loss, so the bound costs what the continuous
        masked ELBO costs (:meth:`loss` is the general form it equals, tested)."""
        if not isinstance(self.process, AbsorbingProcess):
            raise ValueError(f"masked_weight is the absorbing process's shortcut, got {self.process.name!r}")
        k = self._check_k(k, 1)
        alpha_now, alpha_before = torch.exp(-self.sigma(k)), torch.exp(-self.sigma(k - 1))
        unmask = (alpha_before - alpha_now) / (1.0 - alpha_now)
        return self.steps * torch.where(k == 1, torch.ones_like(unmask), unmask)

    def prior(self, shape: tuple[int, ...]) -> Tensor:
        """``p(x_T)``: x_T's law when x_0 is a uniformly drawn real token, ``[*shape, S]`` float64."""
        uniform = torch.zeros(*shape, self.process.num_states, dtype=torch.float64)
        real = [j for j in range(self.process.num_states) if j != self.process.mask_id]
        uniform[..., real] = 1.0 / len(real)
        return self.process.push_probs(uniform, self.sigma(torch.tensor(self.steps)))

    def prior_kl(self, x0: Tensor) -> Tensor:
        """``KL(q(x_T | x_0) || p(x_T))`` per position, ``[...]`` like ``x0`` (float64)."""
        q_last = self.marginal(x0, torch.full(x0.shape[:1], self.steps)).double()
        return categorical_kl(q_last, self.prior(tuple(x0.shape)))

    def vb_terms(self, x0: Tensor, x_k: Tensor, k: Tensor, x0_log_probs: Tensor) -> Tensor:
        """Per position ``[B, L]`` (float64): ``-log p_theta(x_0 | x_1)`` where ``k = 1``, else
        ``KL(q(x_{k-1} | x_k, x_0) || p_theta(x_{k-1} | x_k))``; ``x0_log_probs [B, L, S]`` is the model's
        ``log p~(x_0 | x_k)`` (MASK's column ignored), ``k [B]``."""
        k = self._check_k(k, 1)
        x0_probs = _real_probs(x0_log_probs, self.process)
        model = self.posterior(x_k, x0_probs, k[:, None])
        true = self.posterior(x_k, F.one_hot(x0, self.process.num_states).double(), k[:, None])
        reconstruction = -torch.log(model.gather(-1, x0.unsqueeze(-1)).squeeze(-1).clamp_min(_TINY))
        return torch.where((k == 1)[:, None], reconstruction, categorical_kl(true, model))

    def loss(self, x0: Tensor, x_k: Tensor, k: Tensor, x0_log_probs: Tensor, *, hybrid: float = 0.0,
             keep: Tensor | None = None) -> Tensor:
        """Per-sequence ``[B]`` estimate of ``L_vb + hybrid * E[-log p~(x_0 | x_k)]`` from one step ``k [B]`` drawn
        uniformly per row: ``sum_i (prior_kl_i + T * vb_i + hybrid * ce_i)`` over the positions ``keep [B, L]``
        selects (all by default), in nats (float64)."""
        if hybrid < 0:
            raise ValueError(f"the hybrid weight lambda must be >= 0, got {hybrid!r}")
        per_position = self.prior_kl(x0) + self.steps * self.vb_terms(x0, x_k, k, x0_log_probs)
        if hybrid:
            per_position = per_position - hybrid * torch.log(
                _real_probs(x0_log_probs, self.process).gather(-1, x0.unsqueeze(-1)).squeeze(-1).clamp_min(_TINY))
        if keep is not None:
            per_position = torch.where(keep, per_position, torch.zeros_like(per_position))
        return per_position.sum(-1)


def _real_probs(log_probs: Tensor, process: Process) -> Tensor:
    """A model's ``p~(x_0 | x_k)`` as probabilities over the states with MASK's column zeroed (float64)."""
    probs = log_probs.double().softmax(-1)
    if process.mask_id is not None:
        probs = probs.clone()
        probs[..., process.mask_id] = 0.0
        probs = probs / probs.sum(-1, keepdim=True)
    return probs
