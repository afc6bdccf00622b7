"""The Glauber Generative Model (Varma, Nagaraj and Shanmugam, ICLR 2025): denoising as binary classification.

No public code exists; this module is derived from the paper's description, and every choice it had to make is
stated here.

**Forward process.**  A sequence of L tokens over X = {0..N-1} is noised in T = R L steps, R sweeps over the
positions in order (round robin): step t (0-based) visits position ``s_t = t mod L`` of sweep ``r_t = t // L``,
draws ``Z_t`` from ``Pi_t`` on ``X + {phi}`` and sets ``x_{t+1}^s = Z_t`` unless ``Z_t = phi`` (keep).  Choices:
the noise is uniform, ``Pi_t(a) = (1 - kappa_t) / N``, and the keep probability falls by sweep,
``kappa_t = Pi_t(phi) = 1 - (r_t + 1) / (R + 1)``, so it is never 0 (the identity below needs ``Pi_t(phi) > 0``) and
after the last sweep a token is still its original with probability ``prod_r kappa_r = R! / (R + 1)^R`` (0.04 for
R = 4), close to the uniform prior the sampler starts from.  Before step t, position s has been visited
``v_s(t)`` times, so ``q(x_t^s | x_0^s) = c e_{x_0^s} + (1 - c) / N`` with ``c`` the product of the keep
probabilities of those visits (:meth:`GlauberProcess.clean_probability`).

**Reverse step (heat bath).**  Step t changes only position s, so with ``y = x_{t+1}``:
``P(x_t^s = a | y) ~ p_t(a | y^{-s}) [Pi_t(phi) 1{a = y^s} + Pi_t(y^s)]``, where ``p_t(a | y^{-s})`` is the
conditional of position s given the others under the law of ``x_t`` (the others are the same in ``x_t`` and y).

**Binary classification.**  ``P(Z_t = phi | y^{-s}, y^s = a) = Pi_t(phi) p_t(a | y^{-s}) / (Pi_t(phi) p_t(a |
y^{-s}) + Pi_t(a))``, so a classifier with one logit ``l_a`` per token (position s hidden from its input, the
step t given) recovers ``p_t(a | y^{-s}) = (Pi_t(a) / Pi_t(phi)) e^{l_a}`` (``e^{l}`` is the odds).  With uniform
noise ``Pi_t(a) / Pi_t(phi)`` does not depend on a, so ``p_t(. | y^{-s}) = softmax(l)`` once the classifier is
exact; we normalise with the softmax always (an inexact classifier's odds need not sum to the right constant).
It is trained with the binary cross-entropy of ``l_{y^s}`` against ``1{Z_t = phi}`` (:meth:`GlauberProcess.bce`):
one logit per example, cost linear in the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GlauberObjective", "GlauberProcess"]


@dataclass(frozen=True)
class GlauberProcess:
    """Round-robin replacement noise over ``num_tokens`` tokens, ``length`` positions and ``sweeps`` sweeps."""

    num_tokens: int
    length: int
    sweeps: int = 4

    def __post_init__(self) -> None:
        for name, low in (("num_tokens", 2), ("length", 1), ("sweeps", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {name}={value!r}")

    @property
    def steps(self) -> int:
        """T = sweeps x length."""
        return self.sweeps * self.length

    def _check_t(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.long)
        if bool(((t < 0) | (t >= self.steps)).any()):
            raise ValueError(f"step t must be in 0..{self.steps - 1}, got {sorted(set(t.flatten().tolist()))[:5]}")
        return t

    def position(self, t: Tensor) -> Tensor:
        """``s_t = t mod L``."""
        return self._check_t(t) % self.length

    def keep(self, t: Tensor) -> Tensor:
        """``Pi_t(phi) = 1 - (r_t + 1) / (R + 1)`` (float64)."""
        return 1.0 - (self._check_t(t) // self.length + 1).double() / (self.sweeps + 1)

    def clean_probability(self, t: Tensor) -> Tensor:
        """``c_s(t)`` for every position: ``[..., L]``, the product of the keep probabilities of the visits of s
        before step t (float64)."""
        t = torch.as_tensor(t, dtype=torch.long)
        if bool(((t < 0) | (t > self.steps)).any()):
            raise ValueError(f"time t must be in 0..{self.steps}, got {sorted(set(t.flatten().tolist()))[:5]}")
        positions = torch.arange(self.length)
        full, rest = t // self.length, t % self.length
        visits = full.unsqueeze(-1) + (positions < rest.unsqueeze(-1)).long()  # [..., L]
        keeps = 1.0 - torch.arange(1, self.sweeps + 1, dtype=torch.float64) / (self.sweeps + 1)
        prefix = torch.cat([torch.ones(1, dtype=torch.float64), keeps.cumprod(0)])  # prod of the first v sweeps
        return prefix[visits]

    def marginal(self, x0: Tensor, t: Tensor) -> Tensor:
        """``q(x_t | x_0)`` per position, ``[B, L, N]`` for ``x0 [B, L]`` and ``t [B]`` (float64)."""
        clean = self.clean_probability(t).unsqueeze(-1)
        return clean * F.one_hot(x0, self.num_tokens).double() + (1.0 - clean) / self.num_tokens

    def corrupt(self, x0: Tensor, t: Tensor, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """``(y, s, kept)``: ``x_t ~ q(x_t | x_0)``, then step t at ``s = s_t`` (``y = x_{t+1}``); ``kept [B]`` is
        ``1{Z_t = phi}``, the classifier's label."""
        t = self._check_t(t)
        rows = x0.shape[0]
        probs = self.marginal(x0, t)
        x_t = torch.multinomial(probs.reshape(-1, self.num_tokens).float(), 1, generator=generator).view_as(x0)
        s = self.position(t)
        kept = torch.rand(rows, generator=generator, dtype=torch.float64) < self.keep(t)
        noise = torch.randint(0, self.num_tokens, (rows,), generator=generator)
        y = x_t.clone()
        current = y[torch.arange(rows), s]
        y[torch.arange(rows), s] = torch.where(kept, current, noise)
        return y, s, kept

    def hide(self, y: Tensor, s: Tensor, hidden_id: int) -> Tensor:
        """The classifier's input: ``y`` with position ``s`` (one per row) set to ``hidden_id``."""
        out = y.clone()
        out[torch.arange(y.shape[0]), s] = hidden_id
        return out

    def bce(self, logits: Tensor, y: Tensor, s: Tensor, kept: Tensor) -> Tensor:
        """``[B]`` binary cross-entropy of the logit of the observed token ``y^s`` against ``kept``; ``logits [B,
        N]`` are the classifier's at position s."""
        observed = logits.gather(-1, y[torch.arange(y.shape[0]), s].unsqueeze(-1)).squeeze(-1)
        return F.binary_cross_entropy_with_logits(observed.float(), kept.float(), reduction="none")

    def conditional(self, logits: Tensor) -> Tensor:
        """``p_t(. | y^{-s})`` from the classifier's logits ``[..., N]`` (uniform noise: the softmax of the log-odds)."""
        return logits.double().softmax(-1)

    def exact_logits(self, conditional: Tensor, t: Tensor) -> Tensor:
        """The Bayes-optimal logits for a conditional ``p_t(. | y^{-s}) [..., N]``:
        ``log(Pi_t(phi) p_a / Pi_t(a))``, with t broadcasting from the left."""
        keep = self.keep(t).reshape(torch.as_tensor(t).shape + (1,) * (conditional.dim() - torch.as_tensor(t).dim()))
        return torch.log(keep * conditional.double()) - torch.log((1.0 - keep) / self.num_tokens)

    def reverse_probs(self, y: Tensor, s: Tensor, t: Tensor, logits: Tensor) -> Tensor:
        """``P(x_t^s = . | y)`` (heat bath), ``[B, N]`` float64, from the classifier's logits ``[B, N]``."""
        keep = self.keep(t).unsqueeze(-1)
        current = F.one_hot(y[torch.arange(y.shape[0]), s], self.num_tokens).double()
        weights = self.conditional(logits) * (keep * current + (1.0 - keep) / self.num_tokens)
        return weights / weights.sum(-1, keepdim=True)


@dataclass(frozen=True)
class GlauberObjective:
    """The training loss of a Glauber model, with the interface of :class:`~diffusion.objectives.
    DiffusionObjective` (``corrupt`` then ``loss``) so the training loop, held-out evaluation and resume take it.

    The classifier is a DDiT whose ``hidden_id`` (the MASK id) marks the visited position and whose time input is
    ``(t + 1) / T``; its raw outputs at that position over the N real tokens are the logits ``l_a``.
    ``corrupt`` returns ``(t, packed)``: the step t per row (as float) and ``[B, L + 1]`` ids, y followed by the
    label ``1{Z_t = phi}`` (the loop slices rows only, so the label travels with its row).
    """

    process: GlauberProcess
    hidden_id: int

    def corrupt(self, x0: Tensor, *, t: Tensor | None = None, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor]:
        if x0.dim() != 2 or x0.shape[1] != self.process.length:
            raise ValueError(f"x0 must be [batch, {self.process.length}], got shape {tuple(x0.shape)}")
        if t is None:
            t = torch.randint(0, self.process.steps, (x0.shape[0],), generator=generator)
        y, _, kept = self.process.corrupt(x0.cpu(), t.long().cpu(), generator)
        packed = torch.cat([y, kept.long().unsqueeze(-1)], dim=1).to(x0.device)
        return t.float().to(x0.device), packed

    def time_input(self, t: Tensor) -> Tensor:
        """The classifier's noise input for step t: ``(t + 1) / T`` in (0, 1]."""
        return (t.float() + 1.0) / self.process.steps

    def logits(self, model: torch.nn.Module, y: Tensor, t: Tensor) -> Tensor:
        """The classifier's ``[B, N]`` logits at the visited position of each row."""
        s = (t.long() % self.process.length).to(y.device)
        out = model(input_ids=self.process.hide(y, s, self.hidden_id), total_noise=self.time_input(t)).logits
        return out[torch.arange(y.shape[0], device=y.device), s, : self.process.num_tokens]

    def loss(self, model: torch.nn.Module, x0: Tensor, xt: Tensor, t: Tensor, *,
             attention_mask: Tensor | None = None) -> Any:
        from .objectives import ObjectiveOutput

        if attention_mask is not None:
            raise ValueError("the Glauber objective trains on full blocks: attention_mask is not supported")
        y, kept = xt[:, :-1], xt[:, -1]
        s = t.long() % self.process.length
        per_row = self.process.bce(self.logits(model, y, t), y, s.to(y.device), kept.to(y.device))
        return ObjectiveOutput(per_row.mean(), per_row, t, int(per_row.numel()))

    def __call__(self, model: torch.nn.Module, x0: Tensor, *, t: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Any:
        t, packed = self.corrupt(x0, t=t, generator=generator)
        return self.loss(model, x0, packed, t)
