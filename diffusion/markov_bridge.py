"""The Discrete Markov Bridge's learnable rate matrix (Li et al. 2025): ``Q = P U diag(Lambda) U^{-1} P^{-1}``.

Row convention here (``Q[from, to]``, rows sum to 0; ddlm's processes store the transpose).  ``U`` is the
upper-triangular all-ones matrix, ``P`` a fixed permutation (``e_i P = e_{pi(i)}``), and ``Lambda_j = sum_{i >= j}
theta_i`` with ``theta_i <= 0`` and ``theta_K = 0``, so ``Lambda`` is non-decreasing, non-positive and ends at 0.
Then ``exp(s Q) = P U diag(e^{s Lambda}) U^{-1} P^{-1}`` and, with ``U^{-1}`` the bidiagonal difference matrix, every
row is closed form in ``O(K)`` (:meth:`BridgeRate.transition_probs`)::

    q(y | x0) = e^{s Lambda_{pi(x0)}}                          y = x0
              = e^{s Lambda_{pi(y)}} - e^{s Lambda_{pi(y) - 1}}   pi(y) > pi(x0)
              = 0                                               pi(y) < pi(x0)

A row sums to ``e^{s Lambda_K} = 1`` and is non-negative because Lambda is non-decreasing: mass only moves up the
order pi, and the last state ``pi^{-1}(K)`` absorbs.  ``theta = (-1, ..., -1, 0)`` with the identity permutation is
ddlm's absorbing process with MASK last (tested).  Choices: one rate matrix shared by all positions (the paper's
code has one per position); ``theta_i = -softplus(w_i)`` keeps the constraint for unconstrained parameters ``w``.

Matrix learning (:meth:`BridgeRate.prior_kl`) lowers the prior term of the ELBO, ``KL(q(x_T | x_0) || p_T)`` with
``p_T = p_hat_0 exp(sigma_T Q)`` (``p_hat_0`` the data's token frequencies), with the score model frozen; score learning
is ddlm's score entropy under the current Q (:meth:`BridgeRate.score_entropy`, the general form of Lou et al. 2024).
The two alternate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .processes import _phi

__all__ = ["BridgeRate"]


class BridgeRate(nn.Module):
    """The learnable rate matrix over ``num_states`` states (parameters ``w``: ``theta_i = -softplus(w_i)``)."""

    def __init__(self, num_states: int, permutation: Tensor | None = None, init: float = 0.5413) -> None:
        super().__init__()
        if isinstance(num_states, bool) or not isinstance(num_states, int) or num_states < 2:
            raise ValueError(f"num_states must be an int >= 2, got num_states={num_states!r}")
        perm = torch.arange(num_states) if permutation is None else torch.as_tensor(permutation, dtype=torch.long)
        if sorted(perm.tolist()) != list(range(num_states)):
            raise ValueError(f"permutation must be a permutation of 0..{num_states - 1}")
        self.num_states = num_states
        self.register_buffer("order", perm)  # order[i] = pi(i)
        self.weights = nn.Parameter(torch.full((num_states - 1,), float(init), dtype=torch.float64))

    def eigenvalues(self) -> Tensor:
        """``Lambda`` ``[K]`` (float64): reverse cumulative sums of ``theta = (-softplus(w), 0)``."""
        theta = torch.cat([-F.softplus(self.weights), self.weights.new_zeros(1)])
        return theta.flip(0).cumsum(0).flip(0)

    def matrix(self) -> Tensor:
        """``Q`` ``[K, K]`` (rows: from) built from the factors, for references and small K."""
        k = self.num_states
        upper = torch.triu(torch.ones(k, k, dtype=torch.float64))
        perm = F.one_hot(self.order, k).double()  # e_i P = e_{pi(i)}
        return perm @ upper @ torch.diag(self.eigenvalues()) @ torch.linalg.inv(upper) @ perm.T

    def transition_probs(self, x0: Tensor, sigma_bar: Tensor | float) -> Tensor:
        """``q(x_t = . | x0)`` rows ``[..., K]`` (float64) in closed form; ``sigma_bar`` broadcasts from the left."""
        sigma = torch.as_tensor(sigma_bar, dtype=torch.float64)
        sigma = sigma.reshape(sigma.shape + (1,) * (x0.dim() - sigma.dim())).unsqueeze(-1)
        decay = torch.exp(sigma * self.eigenvalues())  # [..., K] over order positions j
        previous = torch.cat([torch.zeros_like(decay[..., :1]), decay[..., :-1]], dim=-1)
        start = self.order[x0].unsqueeze(-1)  # pi(x0)
        j = torch.arange(self.num_states)
        by_position = torch.where(j == start, decay, torch.where(j > start, decay - previous, torch.zeros_like(decay)))
        return by_position[..., self.order]  # entry y sits at order position pi(y)

    def push_probs(self, probs: Tensor, sigma_bar: Tensor | float) -> Tensor:
        """``probs exp(sigma_bar Q)`` for distributions ``probs [..., K]`` (float64)."""
        rows = self.transition_probs(torch.arange(self.num_states), torch.as_tensor(sigma_bar, dtype=torch.float64))
        return probs.double() @ rows

    def prior_kl(self, x0: Tensor, sigma_end: float, data_marginal: Tensor) -> Tensor:
        """``KL(q(x_T | x0) || p_hat_0 exp(sigma_T Q))`` per token ``[...]``: the ELBO's prior term."""
        q_end = self.transition_probs(x0, torch.as_tensor(sigma_end, dtype=torch.float64))
        prior = self.push_probs(data_marginal, sigma_end)
        terms = q_end * (torch.log(q_end.clamp_min(1e-300)) - torch.log(prior.clamp_min(1e-300)))
        return torch.where(q_end > 0, terms, torch.zeros_like(terms)).sum(-1)

    def score_entropy(self, log_score: Tensor, sigma_bar: Tensor | float, x_t: Tensor, x0: Tensor) -> Tensor:
        """Denoising score entropy at ``x_t`` for a general rate matrix: ``sum_{y != x_t} Q[y, x_t] (s_y - r_y log
        s_y + K(r_y))`` with ``r_y = q_t(y | x0) / q_t(x_t | x0)`` (rates into x_t, as ddlm's ``rate_into``)."""
        log_score = log_score.double()
        probs = self.transition_probs(x0, sigma_bar)
        ratio = probs / probs.gather(-1, x_t.unsqueeze(-1)).clamp_min(1e-300)
        rates = self.matrix()[:, x_t].movedim(0, -1)  # Q[y, x_t] for every y
        others = ~F.one_hot(x_t, self.num_states).bool()
        log_ratio = torch.log(ratio.clamp_min(1e-300))
        terms = torch.where(ratio > 0, ratio * _phi(log_score - log_ratio), log_score.exp())
        return (rates * torch.where(others, terms, torch.zeros_like(terms))).sum(-1)
