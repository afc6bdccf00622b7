"""The Discrete Markov Bridge (Li et al. 2025): a learnable rate matrix ``Q = P U diag(Lambda) U^{-1} P^{-1}`` and the
forward process it drives.

Row convention in :class:`BridgeRate` (``Q[from, to]``, rows sum to 0; ddlm's processes speak of rates *into* a
state, the transpose).  ``U`` is the upper-triangular all-ones matrix, ``P`` a fixed permutation (``e_i P =
e_{pi(i)}``), and ``Lambda_j = sum_{i >= j} theta_i`` with ``theta_i <= 0`` and ``theta_K = 0``, so ``Lambda`` is
non-decreasing, non-positive and ends at 0.  With ``U^{-1}`` the bidiagonal difference matrix, in order positions
``Q[i, i] = Lambda_i`` and ``Q[i, j] = Lambda_j - Lambda_{j-1} = -theta_{j-1}`` for ``j > i`` (0 for ``j < i``):
every state leaves towards every later state, at a rate set by the target.  ``exp(s Q) = P U diag(e^{s Lambda})
U^{-1} P^{-1}`` has closed-form rows in ``O(K)`` (:meth:`BridgeRate.transition_probs`)::

    q(y | x0) = e^{s Lambda_{pi(x0)}}                          y = x0
              = e^{s Lambda_{pi(y)}} - e^{s Lambda_{pi(y) - 1}}   pi(y) > pi(x0)
              = 0                                               pi(y) < pi(x0)

A row sums to ``e^{s Lambda_K} = 1`` and is non-negative because Lambda is non-decreasing: mass only moves up the
order pi, and the last state ``pi^{-1}(K)`` absorbs.  ``theta = (0, ..., 0, -1, 0)`` with the identity permutation
is ddlm's absorbing process with MASK last (tested); a model starts from it with a small ``leak`` to every later
token (:class:`~diffusion.modeling_ddit.BridgeRates`), so that the rates between tokens receive gradients.  ``theta_i = -softplus(w_i)``
keeps the constraint for unconstrained parameters ``w``.  Choice: one rate matrix shared by all positions (the
paper's code has one per position).

The ELBO of a score model under Q has two parts.  Matrix learning (:meth:`BridgeRate.prior_kl`) lowers the prior
term ``KL(q(x_T | x_0) || p_T)``, ``p_T = p_hat_0 exp(sigma_T Q)`` with ``p_hat_0`` the data's token frequencies, with
the score model frozen; score learning is the general score entropy of Lou et al. 2024 under the current Q
(:meth:`BridgeProcess.score_entropy`), with Q frozen.  :class:`BridgeProcess` is the forward process over Q for the
objectives and the samplers: its values are detached from Q except :meth:`BridgeProcess.prior_kl`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modeling_ddit import BridgeRates
from .objectives import DiffusionObjective, ObjectiveOutput
from .processes import Process, _broadcast_noise, _phi

__all__ = ["BridgeObjective", "BridgeProcess", "BridgeRate"]


class BridgeRate(nn.Module):
    """The rate matrix over ``num_states`` states: the maths over a :class:`~diffusion.modeling_ddit.BridgeRates`
    (``tensors``: the parameters ``w``, ``theta_i = -softplus(w_i)``, and the data's token frequencies
    ``data_marginal [K]``), its own (every ``w_i = init``, uniform marginal) unless given: a model's
    ``bridge_rates``, shared, so that the process reads the model's current values and its gradients reach them."""

    def __init__(self, num_states: int, permutation: Tensor | None = None, init: float = 0.5413,
                 tensors: BridgeRates | None = None) -> None:
        super().__init__()
        if isinstance(num_states, bool) or not isinstance(num_states, int) or num_states < 2:
            raise ValueError(f"num_states must be an int >= 2, got num_states={num_states!r}")
        perm = torch.arange(num_states) if permutation is None else torch.as_tensor(permutation, dtype=torch.long)
        if sorted(perm.tolist()) != list(range(num_states)):
            raise ValueError(f"permutation must be a permutation of 0..{num_states - 1}")
        if tensors is None:
            tensors = BridgeRates(num_states)
            with torch.no_grad():
                tensors.weights.fill_(float(init))
        elif tensors.num_states != num_states:
            raise ValueError(f"tensors hold {tensors.num_states} states, not num_states={num_states}")
        self.num_states = num_states
        self.register_buffer("order", perm.to(tensors.weights.device))  # order[i] = pi(i)
        self.tensors = tensors

    @classmethod
    def absorbing_start(cls, num_states: int, leak: float = 1e-4) -> BridgeRate:
        """The identity order at a model's start (:class:`~diffusion.modeling_ddit.BridgeRates`): rate 1 into the
        last state (MASK) and ``leak`` into every later token; ``leak -> 0`` is the absorbing process."""
        return cls(num_states, tensors=BridgeRates(num_states, leak))

    @classmethod
    def of_model(cls, model: nn.Module) -> BridgeRate:
        """The rate matrix a ``bridge`` DDiT model owns (its ``bridge_rates``, shared)."""
        tensors = getattr(model, "bridge_rates", None)
        if not isinstance(tensors, BridgeRates):
            raise ValueError(f"{type(model).__name__} has no bridge_rates: not a model with process='bridge'")
        return cls(tensors.num_states, tensors=tensors)

    @property
    def weights(self) -> nn.Parameter:
        return self.tensors.weights

    @property
    def data_marginal(self) -> Tensor:
        return self.tensors.data_marginal

    def set_data_marginal(self, counts: Tensor) -> None:
        """Store the token frequencies ``counts / counts.sum()`` (``counts [K]``, non-negative, not all zero)."""
        counts = torch.as_tensor(counts, dtype=torch.float64)
        if counts.shape != (self.num_states,) or bool((counts < 0).any()) or float(counts.sum()) <= 0:
            raise ValueError(f"counts must be [{self.num_states}] non-negative with a positive sum, got shape "
                             f"{tuple(counts.shape)}")
        with torch.no_grad():
            self.data_marginal.copy_(counts.to(self.data_marginal.device) / counts.sum())

    def _order(self) -> Tensor:
        """``order`` where the rates live (a model moved to a GPU after this view was made takes its tensors along,
        not this buffer)."""
        return self.order.to(self.weights.device)

    def theta(self) -> Tensor:
        """``theta = (-softplus(w), 0)`` ``[K]`` (float64)."""
        return torch.cat([-F.softplus(self.weights.double()), self.weights.new_zeros(1, dtype=torch.float64)])

    def eigenvalues(self) -> Tensor:
        """``Lambda`` ``[K]`` (float64): reverse cumulative sums of ``theta``."""
        return self.theta().flip(0).cumsum(0).flip(0)

    def matrix(self) -> Tensor:
        """``Q`` ``[K, K]`` (rows: from) built from the factors, for references and small K."""
        k = self.num_states
        upper = torch.triu(torch.ones(k, k, dtype=torch.float64))
        perm = F.one_hot(self.order, k).double()  # e_i P = e_{pi(i)}
        return perm @ upper @ torch.diag(self.eigenvalues()) @ torch.linalg.inv(upper) @ perm.T

    def _decay(self, sigma_bar: Tensor | float, lead: torch.Size) -> Tensor:
        """``e^{sigma Lambda}`` ``[*lead, K]`` over order positions; ``sigma_bar`` broadcasts from the left."""
        sigma = torch.as_tensor(sigma_bar, dtype=torch.float64, device=self.weights.device)
        sigma = sigma.reshape(sigma.shape + (1,) * (len(lead) - sigma.dim())).unsqueeze(-1)
        return torch.exp(sigma * self.eigenvalues())

    def transition_probs(self, x0: Tensor, sigma_bar: Tensor | float) -> Tensor:
        """``q(x_t = . | x0)`` rows ``[..., K]`` (float64) in closed form; ``sigma_bar`` broadcasts from the left."""
        decay = self._decay(sigma_bar, x0.shape)
        previous = torch.cat([torch.zeros_like(decay[..., :1]), decay[..., :-1]], dim=-1)
        start = self._order()[x0.to(decay.device)].unsqueeze(-1)  # pi(x0)
        j = torch.arange(self.num_states, device=decay.device)
        by_position = torch.where(j == start, decay, torch.where(j > start, decay - previous, torch.zeros_like(decay)))
        return by_position[..., self._order()]  # entry y sits at order position pi(y)

    def push_probs(self, probs: Tensor, sigma_bar: Tensor | float) -> Tensor:
        """``probs exp(sigma_bar Q)`` for row vectors ``probs [..., K]`` (float64; distributions, or any vector: it is
        linear), in ``O(K)``: at order position
        j, ``p_j e^{s Lambda_j} + (e^{s Lambda_j} - e^{s Lambda_{j-1}}) sum_{i < j} p_i``."""
        by_position = probs.double()[..., torch.argsort(self._order()).to(probs.device)]
        decay = self._decay(sigma_bar, probs.shape[:-1])
        previous = torch.cat([torch.zeros_like(decay[..., :1]), decay[..., :-1]], dim=-1)
        before = by_position.cumsum(-1) - by_position
        return (by_position * decay + (decay - previous) * before)[..., self._order().to(probs.device)]

    def log_steps(self, sigma_bar: Tensor | float) -> Tensor:
        """``log q(y | x0)`` for ``y`` past ``x0`` in the order, by order position j ``[..., K]`` (float64): ``sigma
        Lambda_j + log(-expm1(sigma theta_{j-1}))``, the row's step ``e^{sigma Lambda_j} - e^{sigma Lambda_{j-1}}``
        without cancellation; it does not depend on x0.  Nothing steps into j = 0: its entry (``sigma Lambda_0``) is
        never read."""
        sigma = torch.as_tensor(sigma_bar, dtype=torch.float64, device=self.weights.device).unsqueeze(-1)
        theta = self.theta()
        previous = torch.cat([theta.new_full((1,), -float("inf")), theta[:-1]])
        return sigma * self.eigenvalues() + torch.log(-torch.expm1(sigma * previous))

    def prior_kl(self, x0: Tensor, sigma_end: float) -> Tensor:
        """``KL(q(x_T | x0) || p_hat_0 exp(sigma_T Q))`` per token ``[...]``: the ELBO's prior term, for every x0 from
        one suffix sum over the order, ``KL(j) = e^{s Lambda_j} (s Lambda_j - log p_j) + sum_{i > j} e^{a_i} (a_i -
        log p_i)`` with ``a = log_steps(s)`` and ``p`` the prior by order position (O(K) in all)."""
        order = self._order()
        prior = self.push_probs(self.data_marginal, sigma_end)[torch.argsort(order)].clamp_min(1e-300)
        stay = torch.as_tensor(sigma_end, dtype=torch.float64) * self.eigenvalues()
        steps = self.log_steps(sigma_end)
        moved = torch.where(torch.isfinite(steps), steps.exp() * (steps - prior.log()), torch.zeros_like(steps))
        after = moved.flip(0).cumsum(0).flip(0) - moved
        by_position = stay.exp() * (stay - prior.log()) + after
        return by_position[order[x0.to(order.device)]].to(x0.device)


class BridgeProcess(Process):
    """The forward process of a :class:`BridgeRate` with the identity order: ``N`` real tokens and MASK = N last,
    where every chain ends.  ``sigma_end`` is the schedule's total noise at t = 1, where ``p_T`` is taken.

    Every method reads the rate's current parameters, detached (in float64 wherever they enter), except
    :meth:`prior_kl`, whose value carries their gradient (matrix learning)."""

    name = "bridge"

    def __init__(self, rate: BridgeRate, sigma_end: float) -> None:
        if not torch.equal(rate.order.cpu(), torch.arange(rate.num_states)):
            raise ValueError("BridgeProcess needs the identity order (MASK, the last state, absorbs), got a permuted "
                             "BridgeRate")
        if not (sigma_end > 0 and math.isfinite(sigma_end)):
            raise ValueError(f"the bridge's prior term is taken at the schedule's total noise at t = 1, which must be "
                             f"finite and > 0 (a loglinear schedule needs eps > 0), got sigma_end={sigma_end!r}")
        super().__init__(rate.num_states - 1)
        self.rate, self.sigma_end = rate, float(sigma_end)
        self.num_states = rate.num_states
        self.mask_id = rate.num_states - 1

    def __repr__(self) -> str:
        return f"BridgeProcess(num_tokens={self.num_tokens}, sigma_end={self.sigma_end})"

    def _lambda(self) -> Tensor:
        return self.rate.eigenvalues().detach()

    def transition_probs(self, x0: Tensor, sigma_bar: Tensor | float) -> Tensor:
        with torch.no_grad():
            return self.rate.transition_probs(x0, _broadcast_noise(sigma_bar, x0))

    def push_probs(self, probs: Tensor, sigma_bar: Tensor | float) -> Tensor:
        self._check_states("probs", probs)
        with torch.no_grad():
            return self.rate.push_probs(probs, _broadcast_noise(sigma_bar, probs[..., 0]))

    def sample_xt(self, x0: Tensor, sigma_bar: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
        """Inverse-CDF draws, one uniform per position (drawn where ``generator`` lives).  The rows telescope:
        ``P(x_t <= y | x0) = e^{sigma Lambda_y}`` for ``y >= x0``, so ``x_t = max(x0, min{y : e^{sigma Lambda_y} >=
        u})``: a search in the non-decreasing ``e^{sigma Lambda}`` instead of forming each token's row."""
        sigma = _broadcast_noise(sigma_bar, x0).double().to(x0.device)
        cdf = torch.exp(sigma.unsqueeze(-1) * self._lambda().to(x0.device))  # [..., 1 or L, K], non-decreasing
        u = torch.rand(x0.shape, generator=generator, dtype=torch.float64,
                       device=generator.device if generator is not None else x0.device).to(x0.device)
        cdf = cdf.expand(*x0.shape, self.num_states).contiguous() if cdf.shape[:-1] != x0.shape else cdf
        first = torch.searchsorted(cdf, u.unsqueeze(-1)).squeeze(-1).clamp_max(self.num_states - 1)
        return torch.maximum(first, x0)

    def limit_probs(self) -> Tensor:
        """``p_T = p_hat_0 exp(sigma_T Q)`` ``[K]`` (float64)."""
        return self.push_probs(self.rate.data_marginal, self.sigma_end)

    def sample_limit(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        probs = self.limit_probs().cpu()
        draws = torch.multinomial(probs, max(1, int(torch.Size(shape).numel())), replacement=True, generator=generator)
        return draws[: torch.Size(shape).numel()].reshape(shape).to(device)

    def rate_into(self, x_t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        # Into x: -theta_{x-1} from every earlier state, Lambda_x on the diagonal, nothing from later states.
        theta, lam = self.rate.theta().detach().to(x_t.device), self._lambda().to(x_t.device)
        j = torch.arange(self.num_states, device=x_t.device)
        x = x_t.unsqueeze(-1)
        into = torch.where(j < x, -theta[(x_t - 1).clamp_min(0)].unsqueeze(-1), torch.zeros((), dtype=torch.float64,
                                                                                            device=x_t.device))
        return torch.where(j == x, lam[x_t].unsqueeze(-1), into).to(dtype)

    def reverse_transition(self, x_t: Tensor, dsigma: Tensor | float) -> Tensor:
        # Column x_t of exp(dsigma Q): e^{d Lambda_x} from x itself, e^{d Lambda_x} - e^{d Lambda_{x-1}} from earlier.
        lam = self._lambda().to(x_t.device)
        d = _broadcast_noise(dsigma, x_t).double()
        own = torch.exp(d * lam[x_t])
        step_in = own - torch.where(x_t > 0, torch.exp(d * lam[(x_t - 1).clamp_min(0)]), torch.zeros_like(own))
        j = torch.arange(self.num_states, device=x_t.device)
        x = x_t.unsqueeze(-1)
        return torch.where(j == x, own.unsqueeze(-1), torch.where(j < x, step_in.unsqueeze(-1), torch.zeros_like(
            own).unsqueeze(-1)))

    def staggered_score(self, score: Tensor, dsigma: Tensor | float) -> Tensor:
        # exp(-d Q) s along the state dimension, with ddlm's Q[to, from]: the push of s through exp(-d Q_row).
        self._check_states("score", score)
        with torch.no_grad():
            return self.rate.push_probs(score, -_broadcast_noise(dsigma, score[..., 0])).to(score.dtype)

    def score_entropy(self, log_score: Tensor, sigma_bar: Tensor | float, x_t: Tensor, x0: Tensor) -> Tensor:
        """``sum_{y != x_t} Q(x_t, y) (s_y - r_y log s_y + K(r_y))`` with ``r_y = q(y | x0) / q(x_t | x0)``, in closed
        form.  The rates into x_t are ``c = -theta_{x_t - 1}`` from every earlier state and 0 from later ones; ``r_y =
        0`` below x0; so with ``r phi(log s - log r) = s - r (1 - log r) - r log s``::

            SE = c [ sum_{y < x_t, y != x0} s_y - sum_{x0 < y < x_t} r_y (1 - log r_y + log s_y)
                     + r_{x0} phi(log s_{x0} - log r_{x0}) [x0 < x_t] ].

        Past x0, ``log q(y | x0) = a_y`` (:meth:`BridgeRate.log_steps`, the same for every x0) and ``r_y = e^{a_y - L}``
        with ``L = log q(x_t | x0)``, so the middle sum over ``x0 < y < x_t`` is ``e^{-L} (A_1 + L A_0)`` from prefix
        sums ``A_1`` of ``e^a (1 - a)`` and ``A_0`` of ``e^a``, formed once per noise level; only the two sums that read
        the scores run over all states at every position (in float32, float64 for float64 scores).  The ``y = x0``
        term has ``log q = sigma Lambda_{x0}`` and keeps the phi form (its ratio can be large)."""
        self._check_states("log_score", log_score)
        dtype = torch.float64 if log_score.dtype == torch.float64 else torch.float32
        log_score = log_score.to(dtype)
        sigma = _broadcast_noise(sigma_bar, x_t).double().to(x_t.device)  # [...] or [B, 1]
        theta, lam = self.rate.theta().detach().to(x_t.device), self._lambda().to(x_t.device)
        with torch.no_grad():
            steps = self.rate.log_steps(sigma)  # [..., K] per noise level
        weight = torch.where(torch.isfinite(steps), steps.exp(), torch.zeros_like(steps))
        prefix_0 = weight.cumsum(-1)
        prefix_1 = torch.where(torch.isfinite(steps), weight * (1.0 - steps), torch.zeros_like(steps)).cumsum(-1)

        def at(table: Tensor, index: Tensor) -> Tensor:  # table[..., index] per position
            return table.expand(*index.shape, self.num_states).gather(-1, index.unsqueeze(-1)).squeeze(-1)

        log_stay = sigma * lam[x0]  # log q(x0 | x0)
        moved = x_t > x0
        log_at_xt = torch.where(moved, at(steps, x_t), log_stay)  # L
        before = (x_t - 1).clamp_min(0)
        sum_0 = torch.where(moved, at(prefix_0, before) - at(prefix_0, x0), torch.zeros_like(log_stay))
        sum_1 = torch.where(moved, at(prefix_1, before) - at(prefix_1, x0), torch.zeros_like(log_stay))
        log_r0 = log_stay - log_at_xt
        middle = torch.exp(-log_at_xt) * (sum_1 + log_at_xt * sum_0)
        j = torch.arange(self.num_states, device=x_t.device)
        scores = torch.where((j < x_t.unsqueeze(-1)) & (j != x0.unsqueeze(-1)), log_score.exp(), 0.0).sum(-1)
        window = (j > x0.unsqueeze(-1)) & (j < x_t.unsqueeze(-1))
        with_log_s = torch.where(window, weight.to(dtype) * log_score, 0.0).sum(-1) * torch.exp(-log_at_xt).to(dtype)
        # y = x0 in the cancellation-free form r phi(log s - log r): r can be ~1 / (sigma leak), far beyond float32's
        # resolution of s - r (1 - log r) - r log s
        log_s_x0 = log_score.gather(-1, x0.unsqueeze(-1)).squeeze(-1).double()
        at_x0 = torch.where(moved, torch.exp(log_r0) * _phi(log_s_x0 - log_r0), torch.zeros_like(log_r0))
        into = torch.where(x_t > 0, -theta[before], torch.zeros_like(log_stay))
        return (into * (scores.double() - middle - with_log_s.double() + at_x0)).to(dtype)

    def prior_kl(self, x0: Tensor) -> Tensor:
        """``KL(q(x_T | x0) || p_T)`` per token ``[...]`` (float64), with the rate's gradient."""
        return self.rate.prior_kl(x0, self.sigma_end)


@dataclass(frozen=True)
class BridgeObjective:
    """The Discrete Markov Bridge's training loss: ``base`` (score entropy under the current Q, which it reads
    detached: score learning) plus the prior term ``KL(q(x_T | x0) || p_T)`` of every scored token (whose gradient
    reaches only the rates: matrix learning).  Their sum per sequence is the negative ELBO (the continuous-time
    diffusion term plus the prior term), which the run logs held out.

    Choice: the two parts touch disjoint parameters, so one backward pass takes a step of each; the paper alternates
    them in turns, this is the alternation with turns of one step (the optimizer state of each set is its own)."""

    base: DiffusionObjective

    def __post_init__(self) -> None:
        if not isinstance(self.base.process, BridgeProcess) or self.base.objective != "score_entropy":
            raise ValueError(f"BridgeObjective needs score entropy under a BridgeProcess, got objective="
                             f"{self.base.objective!r}, process={self.base.process!r}")

    def corrupt(self, x0: Tensor, *, t: Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return self.base.corrupt(x0, t=t, generator=generator)

    def loss(self, model: nn.Module, x0: Tensor, xt: Tensor, t: Tensor, *,
             attention_mask: Tensor | None = None) -> ObjectiveOutput:
        out = self.base.loss(model, x0, xt, t, attention_mask=attention_mask)
        prior = self.base.process.prior_kl(x0)  # [B, L], the rates' gradient
        if attention_mask is not None:
            prior = prior * attention_mask.to(prior.dtype)
        per_sequence = out.per_sequence + prior.sum(-1).to(out.per_sequence.dtype)
        return ObjectiveOutput(per_sequence.sum() / max(out.num_tokens, 1), per_sequence, out.t, out.num_tokens)

    def __call__(self, model: nn.Module, x0: Tensor, *, attention_mask: Tensor | None = None,
                 t: Tensor | None = None, generator: torch.Generator | None = None) -> ObjectiveOutput:
        t, xt = self.corrupt(x0, t=t, generator=generator)
        return self.loss(model, x0, xt, t, attention_mask=attention_mask)
