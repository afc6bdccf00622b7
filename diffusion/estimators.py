"""Likelihood estimators of a completion given its prompt under a masked diffusion model: log p(y | q) is
intractable, these estimate it (RL's policy ratios, DPO's scores, the lm-eval model's loglikelihood).

Every estimator works in two steps so that pi_theta, pi_old and pi_ref see **identical masks**
(so at theta = theta_old every ratio is exactly 1):

    draw = estimator.draw(sequences, completion, generator)     # masks and weights, no network call
    per_token = estimator.estimate(model, draw)                 # [B, Lc] contributions, one call per view

``per_token[b, k]`` is completion token k's contribution; ``per_token.sum(-1)`` estimates the sequence
log-likelihood (or its ELBO).  Shapes: ``sequences [B, L]`` (prompt then completion), ``completion [B, L]``
bool (True on completion positions; every row has the same number Lc of them).

- ``sepo`` (SEPO, for uniform-process score models): see :class:`Sepo`.
- ``one_step`` (d1 / diffu-GRPO): the whole completion is MASK, each prompt token is masked with
  probability ``p_mask_prompt``; ``l_k = log p(y_k | q', all-MASK completion)`` (mean field, 1 call).
- ``coupled`` (DiffuCoder): ``t ~ U(t_min, t_max)`` per row, mask set M1 = {U < t} of the completion and its
  complement M2; ``l_k = log p(y_k | view_1) / t`` for k in M1, ``log p(y_k | view_2) / (1 - t)`` otherwise.
  Every completion token is scored exactly once per pair (2 calls).  **Scale**: view 2 is itself a
  masking at level 1 - t, so ``E[sum_k l_k | t] = f(t) + f(1 - t)`` with ``f(t) = E[(1/t) sum_{masked} log p]``
  the ELBO's integrand; the estimate is *twice* the ELBO restricted to ``t in [t_min, t_max]`` (for a model
  whose tokens are independent, f is constant and the mean is exactly ``2 log p(y)``).  DiffuCoder's code
  (``selective_log_softmax`` in ``coupled_grpo.py``) uses these weights unnormalised, so this estimator keeps
  its scale; with ``with_full_mask`` the mean is ``(l_one_step + f(t) + f(1 - t)) / 2``.
- ``quadrature`` (GDPO, semi-deterministic MC): Gauss-Legendre nodes ``t_n`` on [0, 1] with weights ``w_n``
  (sum 1), one Bernoulli(t_n) mask per node; ``l_k = sum_n w_n (1/t_n) 1[k masked at t_n] log p(y_k | view_n)``
  (N calls), an estimate of the ELBO ``int_0^1 E[(1/t) sum_{masked} log p] dt``.
- ``monte_carlo`` (double MC ELBO): the same integrand at N i.i.d. ``t_n ~ U(0, 1)`` with weights 1/N;
  ``stratified``: at ``t_n = (n + u_n) / N``, one node in each stratum; ``one_time``: N masks at one shared time.

The nodes come from :mod:`diffusion.time_nodes`, the masks from :func:`diffusion.processes.mask_tokens` and
the per-token term from :func:`diffusion.losses.masked_nll`; time is the masking probability
(:data:`diffusion.schedules.LINEAR_MASKING`, ELBO weight ``1/t``).

For a model with exact conditionals the ELBO equals log p(y | q), so ``quadrature``, ``monte_carlo``,
``stratified`` and ``one_time`` are unbiased for it; ``one_step`` and ``coupled`` are surrogates (biased, but cheap and low-variance).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .lambda_form import model_log_probs
from .losses import masked_nll
from .processes import draw_moves, mask_tokens
from .schedules import LINEAR_MASKING
from .spec import DiffusionSpec
from .time_nodes import time_nodes

__all__ = ["ELBO_ESTIMATORS", "ESTIMATORS", "Draw", "LikelihoodEstimator", "concat_draws", "get_estimator", "model_log_probs",
           "check_policy", "score_log_likelihood", "weighted_sum"]


@dataclass
class Draw:
    """The random part of one estimate: ``views [V, B, L]`` inputs and ``weights [V, B, L]`` per view.

    ``targets [B, L]`` are the clean sequences.  Token k of row b contributes
    ``sum_v weights[v, b, k] * log p(y_k | views[v, b])``; weights are zero off the completion and on
    positions a view leaves unmasked.  ``t [V, B]`` is each view's time (for time-conditioned models).
    """

    targets: Tensor
    views: Tensor
    weights: Tensor
    t: Tensor
    completion: Tensor


def concat_draws(draws: list[Draw]) -> Draw:
    """One draw of the rows of several (drawn group by group, each with its own generator), rows in order."""
    return Draw(targets=torch.cat([d.targets for d in draws]), views=torch.cat([d.views for d in draws], dim=1),
                weights=torch.cat([d.weights for d in draws], dim=1), t=torch.cat([d.t for d in draws], dim=1),
                completion=torch.cat([d.completion for d in draws]))


class LikelihoodEstimator(ABC):
    """Draws masks (no network call), then estimates a model's log-likelihoods under them."""

    name: str
    calls: int  # network calls per estimate

    def __init__(self, mask_id: int) -> None:
        self.mask_id = mask_id

    @abstractmethod
    def draw(self, sequences: Tensor, completion: Tensor, generator: torch.Generator | None = None) -> Draw:
        """Masks and weights for one estimate of every row's log-likelihood."""

    def estimate(self, model: Any, draw: Draw) -> Tensor:
        """``[B, Lc]`` per-completion-token contributions ``sum_v weights[v] * log p(y_k | view_v)``
        (differentiable through ``model``)."""
        return weighted_sum(*self.view_log_probs(model, draw))

    def view_log_probs(self, model: Any, draw: Draw) -> tuple[Tensor, Tensor]:
        """``(log_probs, weights)``, each ``[V, B, Lc]`` on the completion: ``log p(y_k | view_v)`` where
        ``weights[v]`` scores token k, 0 elsewhere (a view that scores nothing costs no call)."""
        device = next(model.parameters()).device
        views, weights, targets = draw.views.to(device), draw.weights.to(device), draw.targets.to(device)
        completion, rows = draw.completion.to(device), draw.completion.shape[0]
        per_view = []
        for v in range(views.shape[0]):
            scored = weights[v] != 0
            if not bool(scored.any()):
                per_view.append(torch.zeros(weights.shape[1:], dtype=torch.float32, device=device))
                continue  # nothing masked in this view: no call needed
            log_probs = model_log_probs(model, views[v], draw.t[v])
            per_view.append(-masked_nll(log_probs, targets, scored))
        return (torch.stack([x[completion].view(rows, -1) for x in per_view]),
                torch.stack([w[completion].view(rows, -1) for w in weights]))

    def _draw(self, sequences: Tensor, completion: Tensor, masks: list[Tensor], weights: list[Tensor],
              t: list[Tensor]) -> Draw:
        views = torch.stack([torch.where(m, torch.full_like(sequences, self.mask_id), sequences) for m in masks])
        return Draw(targets=sequences, views=views, weights=torch.stack(weights), t=torch.stack(t),
                    completion=completion)


def weighted_sum(log_probs: Tensor, weights: Tensor) -> Tensor:
    """``[B, Lc]`` ``sum_v weights[v] * log_probs[v]`` of ``[V, B, Lc]`` inputs (float32): the estimate."""
    total = torch.zeros(weights.shape[1:], dtype=torch.float32, device=log_probs.device)
    for v in range(weights.shape[0]):
        total = total + weights[v].to(log_probs.device).float() * log_probs[v]
    return total


def _check(sequences: Tensor, completion: Tensor) -> None:
    if sequences.shape != completion.shape or completion.dtype != torch.bool:
        raise ValueError(f"completion must be a bool mask shaped like sequences {tuple(sequences.shape)}, "
                         f"got {completion.dtype} {tuple(completion.shape)}")
    counts = completion.sum(-1)
    if counts.numel() and (counts.min() != counts.max() or int(counts[0]) == 0):
        raise ValueError(f"every row needs the same positive number of completion tokens, got {counts.tolist()}")


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64).to(device)


class OneStep(LikelihoodEstimator):
    """d1: completion fully masked, prompt tokens masked with ``p_mask_prompt``; one call."""

    name, calls = "one_step", 1

    def __init__(self, mask_id: int, p_mask_prompt: float = 0.15) -> None:
        super().__init__(mask_id)
        if not 0.0 <= p_mask_prompt < 1.0:
            raise ValueError(f"p_mask_prompt must be in [0, 1), got p_mask_prompt={p_mask_prompt}")
        self.p_mask_prompt = p_mask_prompt

    def draw(self, sequences: Tensor, completion: Tensor, generator: torch.Generator | None = None) -> Draw:
        _check(sequences, completion)
        p = torch.tensor(self.p_mask_prompt, dtype=torch.float64, device=sequences.device)
        mask = completion | draw_moves(sequences.shape, p, generator)
        weight = completion.double()
        t = torch.ones(len(sequences), dtype=torch.float64, device=sequences.device)
        return self._draw(sequences, completion, [mask], [weight], [t])


class Coupled(LikelihoodEstimator):
    """DiffuCoder: a complementary mask pair at ``t ~ U(t_min, t_max)``, weights 1/t and 1/(1 - t); two calls.

    ``with_full_mask=True`` adds the d1 view (completion fully masked) and averages, as DiffuCoder's code does:
    ``l_k = (l0_k + pair_k) / 2`` (three calls).
    """

    name = "coupled"

    def __init__(self, mask_id: int, t_min: float = 0.2, t_max: float = 0.8, with_full_mask: bool = False) -> None:
        super().__init__(mask_id)
        if not 0.0 < t_min <= t_max < 1.0:
            raise ValueError(f"need 0 < t_min <= t_max < 1, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max, self.with_full_mask = t_min, t_max, with_full_mask
        self.calls = 3 if with_full_mask else 2

    def draw(self, sequences: Tensor, completion: Tensor, generator: torch.Generator | None = None) -> Draw:
        _check(sequences, completion)
        rows = len(sequences)
        t = self.t_min + (self.t_max - self.t_min) * _uniform((rows,), generator, sequences.device)
        _, first = mask_tokens(sequences, t, self.mask_id, generator=generator, where=completion)
        second = completion & ~first  # the complement within the completion
        weights = [first.double() * LINEAR_MASKING.elbo_weight(t)[:, None],
                   second.double() * LINEAR_MASKING.elbo_weight(1 - t)[:, None]]
        if not self.with_full_mask:
            return self._draw(sequences, completion, [first, second], weights, [t, t])
        weights = [completion.double() / 2] + [w / 2 for w in weights]
        return self._draw(sequences, completion, [completion, first, second], weights, [torch.ones_like(t), t, t])


class _TimeIntegral(LikelihoodEstimator):
    """``sum_n w_n (1/t_n) sum_{k masked at t_n} log p(y_k | view_n)`` with one Bernoulli(t_n) mask per node,
    the nodes from the rule ``name`` of :func:`diffusion.time_nodes.time_nodes`."""

    t_min: float = 0.0

    def __init__(self, mask_id: int, num_points: int = 2) -> None:
        super().__init__(mask_id)
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
            raise ValueError(f"num_points must be a positive int, got num_points={num_points!r}")
        self.num_points = self.calls = num_points

    def draw(self, sequences: Tensor, completion: Tensor, generator: torch.Generator | None = None) -> Draw:
        _check(sequences, completion)
        t, w = time_nodes(self.name, self.num_points, len(sequences), generator=generator, t_min=self.t_min)
        t, w = t.to(sequences.device), w.to(sequences.device)
        masks, weights = [], []
        for n in range(len(t)):
            _, mask = mask_tokens(sequences, t[n], self.mask_id, generator=generator, where=completion)
            masks.append(mask)
            weights.append(mask.double() * (w[n] * LINEAR_MASKING.elbo_weight(t[n]))[:, None])
        return self._draw(sequences, completion, masks, weights, list(t))


class Quadrature(_TimeIntegral):
    """GDPO's semi-deterministic MC: Gauss-Legendre nodes on [0, 1] (2-3 are enough), one mask per node."""

    name = "quadrature"


class MonteCarlo(_TimeIntegral):
    """Double Monte Carlo ELBO: ``t_n ~ U(0, 1)`` i.i.d. per row (floored at ``t_min = 1e-3``: weights 1/t stay
    below 1000/N, a negligible bias), weights 1/N."""

    name = "monte_carlo"
    t_min = 1e-3


class Stratified(_TimeIntegral):
    """The same ELBO at stratified nodes ``t_n = (n + u_n) / N`` (floored at ``t_min = 1e-3``), weights 1/N."""

    name = "stratified"
    t_min = 1e-3


class OneTime(_TimeIntegral):
    """One ``t ~ U(0, 1)`` per row (floored at ``t_min = 1e-3``) shared by N independent masks, weights 1/N: the
    same ELBO with its budget spent on masks instead of times (``n_t = 1, n_y = N`` in VRPO's terms, Zhu et al.
    2025, LLaDA 1.5, which shows this allocation has the larger variance at equal calls)."""

    name = "one_time"
    t_min = 1e-3

    def draw(self, sequences: Tensor, completion: Tensor, generator: torch.Generator | None = None) -> Draw:
        _check(sequences, completion)
        t = _uniform((len(sequences),), generator, sequences.device).clamp_min(self.t_min)
        masks, weights = [], []
        for _ in range(self.num_points):
            _, mask = mask_tokens(sequences, t, self.mask_id, generator=generator, where=completion)
            masks.append(mask)
            weights.append(mask.double() * (LINEAR_MASKING.elbo_weight(t) / self.num_points)[:, None])
        return self._draw(sequences, completion, masks, weights, [t] * self.num_points)


def score_log_likelihood(log_scores: Tensor) -> Tensor:
    """SEPO's identity (Zekri & Boulle 2025): ``log q(x) = -log sum_y s(x)_y`` over a set of states y that
    holds x (``s(x)_x = 1``), exact when the set is the whole space and ``s(x)_y = q(y) / q(x)``; its gradient is
    ``-sum_y q(y) grad log s(x)_y`` with ``q(y) = softmax_y(log s(x)_y)``.  ``[..., Y] -> [...]``.

    >>> import math
    >>> round(float(score_log_likelihood(torch.tensor([0.0, math.log(3.0)]))), 6) == round(math.log(0.25), 6)
    True
    """
    return -torch.logsumexp(log_scores, dim=-1)


class Sepo(LikelihoodEstimator):
    """SEPO for a uniform-process score model: ``l_k = log q(y_k | y_{-k}) = -log sum_v s(y)_(k, v)``, the
    identity :func:`score_log_likelihood` over the tokens of position k (the current one has ``s = 1``), read from
    the model's log-scores at the clean sequence and a small time ``t_min`` (one call, no masks).

    With exact scores ``s(y)_(k, v) = q(y^{k <- v}) / q(y)`` every term is the exact conditional of token k given
    the others, so ``sum_k l_k`` is the pseudo-log-likelihood of the completion and ``exp(l_theta,k - l_old,k)`` is
    the paper's importance ratio ``[q_theta(y') / q_old(y')] [s_old(y)_y' / s_theta(y)_y']`` restricted to
    position k's changes.  An absorbing score model is read as a masked denoiser instead
    (:func:`diffusion.lambda_form.model_log_probs`), with any other estimator.
    """

    name, calls = "sepo", 1

    def __init__(self, mask_id: int | None, t_min: float = 1e-3) -> None:
        super().__init__(mask_id)
        if not 0.0 < t_min < 1.0:
            raise ValueError(f"t_min must be in (0, 1), got t_min={t_min}")
        self.t_min = t_min

    def draw(self, sequences: Tensor, completion: Tensor, generator: torch.Generator | None = None) -> Draw:
        _check(sequences, completion)
        t = torch.full((len(sequences),), self.t_min, dtype=torch.float64, device=sequences.device)
        return Draw(targets=sequences, views=sequences[None], weights=completion.double()[None], t=t[None],
                    completion=completion)

    def view_log_probs(self, model: Any, draw: Draw) -> tuple[Tensor, Tensor]:
        spec = DiffusionSpec.of(model)
        device = next(model.parameters()).device
        x = draw.views[0].to(device)
        total_noise = spec.schedule.total_noise(draw.t[0]).to(device=device, dtype=torch.float32)
        log_scores = model(input_ids=x, total_noise=total_noise).logits.float()[..., : spec.num_tokens]
        log_scores = log_scores.scatter(-1, x.unsqueeze(-1), 0.0)  # s(x)_x = 1
        per_token = score_log_likelihood(log_scores)
        completion, rows = draw.completion.to(device), draw.completion.shape[0]
        return per_token[completion].view(1, rows, -1), draw.weights.to(device)[:, completion].view(1, rows, -1)


ESTIMATORS: dict[str, type[LikelihoodEstimator]] = {
    "one_step": OneStep, "coupled": Coupled, "quadrature": Quadrature, "monte_carlo": MonteCarlo,
    "stratified": Stratified, "one_time": OneTime, "sepo": Sepo,
}
ELBO_ESTIMATORS = ("quadrature", "monte_carlo", "stratified", "one_time")  # unbiased for the ELBO


def check_policy(spec: DiffusionSpec, estimator: str) -> None:
    """Refuse a model the estimator cannot score: ``sepo`` reads a uniform-process score model; every other estimator
    an absorbing one (``subs``, or ``score`` read as a denoiser by RADD's identity)."""
    if spec.glauber_sweeps is not None:
        raise ValueError("a Glauber model (--objective glauber) is a classifier with no likelihood estimate: it cannot "
                         f"be scored with estimator={estimator!r}")
    if estimator == "sepo":
        if spec.parameterization != "score" or spec.process_name != "uniform":
            raise ValueError(f"estimator='sepo' needs a uniform-process score model (SEDD), got process="
                             f"{spec.process_name!r}, parameterization={spec.parameterization!r}; an absorbing "
                             "model takes the masked estimators")
    elif not spec.absorbing:
        raise ValueError(f"estimator={estimator!r} masks tokens, so it needs an absorbing model, got process="
                         f"{spec.process_name!r}; a uniform score model takes estimator='sepo'")


def get_estimator(name: str, mask_id: int, **options: Any) -> LikelihoodEstimator:
    """An estimator by name (``one_step``, ``coupled``, ``quadrature``, ``monte_carlo``, ``stratified``,
    ``one_time``, ``sepo``)."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator name={name!r}; valid: {sorted(ESTIMATORS)}")
    return ESTIMATORS[name](mask_id, **options)
