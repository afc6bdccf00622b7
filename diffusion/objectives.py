"""One training loss from a batch of clean tokens: draw t, corrupt x0, run the denoiser, score it.

:class:`DiffusionObjective` binds a process, a schedule and a loss so that the training loop,
the likelihood code and the tests share one definition of "the loss of this batch".

The objectives:

- ``score_entropy`` (SEDD, Lou et al. 2024): denoising score entropy, absorbing or uniform; for a uniform ``x0`` model
  (through its score identity) the uniform process's continuous ELBO, UDLM's and Duo's loss.
- ``masked_elbo`` (MDLM / RADD): ``w(t) sum_{i masked} -log p_theta(x0^i | x_t)`` with Bernoulli masks at the
  schedule's masking probability and the schedule's ELBO weight ``w(t)``.
- ``ardm`` (order-agnostic ARDM, Hoogeboom et al. 2022): a count ``m`` uniform on ``{1, ..., D}`` (the paper's
  ``t = D - m + 1``), exactly ``m`` of the ``D`` positions masked, chosen uniformly, and the weight ``D / m``:
  ``L = (D / m) sum_{i masked} -log p_theta(x0^i | x_visible)``.  Its expectation over m and the masks is the
  any-order autoregressive NLL ``E_sigma sum_k -log p(x_sigma(k) | x_sigma(<k))``, which equals ``-log p(x0)`` for
  exact conditionals.  The row's time is ``t = m / D`` (the fraction masked), so the weight is ``1 / t``.

With ``discrete_time=T`` a model that predicts x0 (``masked_elbo``, or a uniform ``x0`` model) is trained on D3PM's
T-step bound instead (:mod:`diffusion.d3pm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .d3pm import DiscreteTime
from .losses import masked_elbo, score_entropy_loss, weighted_row_sum
from .modeling_ddit import accepts_score_mask
from .processes import AbsorbingProcess, Process
from .schedules import Schedule
from .spec import DiffusionSpec
from .time_nodes import sample_t

__all__ = ["MASKED_OBJECTIVES", "OBJECTIVES", "DiffusionObjective", "ObjectiveOutput", "exact_count_masks"]

OBJECTIVES = ("score_entropy", "masked_elbo", "ardm")
MASKED_OBJECTIVES = ("masked_elbo", "ardm")  # absorbing, subs: a sum of -log p over masked positions


@dataclass(frozen=True)
class ObjectiveOutput:
    """``loss``: mean nats per scored token (what to backpropagate); ``per_sequence``: ``[B]`` nats;
    ``t``: ``[B]`` the diffusion times used; ``num_tokens``: tokens scored."""

    loss: Tensor
    per_sequence: Tensor
    t: Tensor
    num_tokens: int


@dataclass(frozen=True)
class DiffusionObjective:
    """A diffusion training objective.

    Args:
        process: the forward process (its ``vocab_size`` is the number of real tokens N).
        schedule: the noise schedule.
        objective: ``score_entropy`` (SEDD; absorbing or uniform) or ``masked_elbo`` (MDLM/RADD; absorbing).
        parameterization: what the model outputs: ``score`` (log-scores), ``subs`` (log p(x0 | x_t), absorbing) or
            ``x0`` (log p(x0 | x_t), uniform).  A ``subs`` model trained with ``score_entropy`` uses RADD's identity
            ``log s = log p - log(e^sigma_bar - 1)``; an ``x0`` model is trained with ``score_entropy`` through the
            uniform mixture identity (:meth:`~diffusion.processes.UniformProcess.log_score_from_log_probs`), which
            makes the loss the uniform process's continuous-time ELBO for an x0 model (UDLM's and Duo's loss).
        t_min: smallest diffusion time drawn (t ~ U(t_min, 1)).
        antithetic: stratified (low-discrepancy) draws of t across the batch.
        discrete_time: D3PM's T for a model that predicts x0 (``masked_elbo``, or an ``x0`` model): t is drawn on
            the grid ``k / T``, ``k ~ U{1..T}``, and the loss is the T-step bound ``L_vb`` of
            :class:`~diffusion.d3pm.DiscreteTime` in place of the continuous one (None: continuous time).
        hybrid: D3PM's lambda, the weight of ``-log p~(x0 | x_t)`` added to ``L_vb`` (with ``discrete_time``).
    """

    process: Process
    schedule: Schedule
    objective: str
    parameterization: str
    t_min: float = 1e-3
    antithetic: bool = True
    discrete_time: int | None = None
    hybrid: float = 0.0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got objective={self.objective!r}")
        if self.parameterization not in ("score", "subs", "x0"):
            raise ValueError(f"parameterization must be 'score', 'subs' or 'x0', got {self.parameterization!r}")
        absorbing = isinstance(self.process, AbsorbingProcess)
        if self.objective in MASKED_OBJECTIVES and not (absorbing and self.parameterization == "subs"):
            raise ValueError(
                f"objective={self.objective!r} needs the absorbing process and parameterization='subs', got "
                f"process={self.process.name!r}, parameterization={self.parameterization!r}"
            )
        if self.parameterization == "subs" and not absorbing:
            raise ValueError(f"parameterization='subs' needs the absorbing process, got {self.process.name!r}")
        if self.parameterization == "x0" and absorbing:
            raise ValueError(f"parameterization='x0' needs the uniform process, got {self.process.name!r}")
        if absorbing and self.process.mask_id != self.process.num_tokens and self.objective not in MASKED_OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} needs MASK as the last state; this model's mask id is "
                             f"{self.process.mask_id}: train it with masked_elbo")
        if not 0.0 < self.t_min < 1.0:
            raise ValueError(f"t_min must be in (0, 1), got t_min={self.t_min!r}")
        if self.discrete_time is not None:
            DiscreteTime(self.process, self.schedule, self.discrete_time)  # T >= 1
            if not (self.objective == "masked_elbo" or (self.parameterization == "x0" and self.objective ==
                                                         "score_entropy")):
                raise ValueError(f"discrete_time (D3PM) trains a model that predicts x0: objective='masked_elbo' "
                                 f"(absorbing) or parameterization='x0' (uniform), got objective={self.objective!r}, "
                                 f"parameterization={self.parameterization!r}")
        if not (self.hybrid >= 0 and (self.hybrid == 0 or self.discrete_time is not None)):
            raise ValueError(f"hybrid (D3PM's lambda) must be >= 0 and needs discrete_time, got hybrid={self.hybrid!r}")

    @classmethod
    def from_spec(cls, spec: DiffusionSpec, objective: str | None = None, **kwargs: Any) -> DiffusionObjective:
        """The objective of the diffusion ``spec`` describes.

        ``objective`` defaults to ``masked_elbo`` for ``subs`` models and ``score_entropy`` otherwise.
        """
        if objective is None:
            objective = "masked_elbo" if spec.parameterization == "subs" else "score_entropy"
        mask_elsewhere = spec.absorbing and spec.mask_id != spec.num_states - 1
        process = AbsorbingProcess(spec.num_tokens, mask_id=spec.mask_id) if mask_elsewhere else spec.process
        return cls(process, spec.schedule, objective, spec.parameterization, **kwargs)

    @classmethod
    def from_config(cls, config: Any, objective: str | None = None, **kwargs: Any) -> DiffusionObjective:
        """The objective a model config (:class:`~diffusion.DDiTConfig`) describes; see :meth:`from_spec`."""
        return cls.from_spec(DiffusionSpec.from_config(config), objective, **kwargs)

    def corrupt(
        self, x0: Tensor, *, t: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``t [B]`` (unless given) and ``x_t ~ q(x_t | x0)`` for clean tokens ``x0 [B, L]`` (ids < N).

        Kept apart from :meth:`loss` so that several devices can corrupt one global batch identically
        and each score its own rows.
        """
        if x0.dim() != 2:
            raise ValueError(f"x0 must be [batch, length], got shape {tuple(x0.shape)}")
        mask_id = self.process.mask_id
        if x0.numel() and (int(x0.min()) < 0 or int(x0.max()) >= self.process.num_states
                           or (mask_id is not None and bool((x0 == mask_id).any()))):
            raise ValueError(
                f"x0 holds ids outside the {self.process.num_tokens} real tokens "
                f"(min {int(x0.min())}, max {int(x0.max())}; the mask id is {mask_id})"
            )
        if self.objective == "ardm":
            masked, t = exact_count_masks(x0.shape, antithetic=self.antithetic, generator=generator, t=t)
            masked, t = masked.to(x0.device), t.to(x0.device)
            return t, torch.where(masked, torch.full_like(x0, mask_id), x0)
        if t is None and self.discrete_time is not None:  # k ~ U{1..T}, t = k / T
            steps = self.discrete_time
            u = sample_t(x0.shape[0], t_min=1e-12, antithetic=self.antithetic, generator=generator,
                         device=x0.device)  # u ~ U(0, 1): ceil(u T) is uniform on 1..T
            t = (u * steps).ceil().clamp(1, steps) / steps
        elif t is None:
            t = sample_t(x0.shape[0], t_min=self.t_min, antithetic=self.antithetic, generator=generator,
                         device=x0.device)
        xt = self.process.sample_xt(x0, self.schedule.total_noise(t), generator=generator)
        return t, xt

    def elbo_weight(self, t: Tensor) -> Tensor:
        """The weight of a row's masked sum: ``1 / t = D / m`` for ``ardm``; with ``discrete_time`` D3PM's ``w_k +
        hybrid`` at ``k = t T`` (:meth:`DiscreteTime.masked_weight`); else the schedule's ``w(t)``."""
        if self.objective == "ardm":
            return 1.0 / t
        if self.discrete_time is not None:
            k = (t.double() * self.discrete_time).round().long()
            weight = DiscreteTime(self.process, self.schedule, self.discrete_time).masked_weight(k) + self.hybrid
            return weight.to(t.dtype)
        return self.schedule.elbo_weight(t)

    def loss(
        self, model: torch.nn.Module, x0: Tensor, xt: Tensor, t: Tensor, *, attention_mask: Tensor | None = None
    ) -> ObjectiveOutput:
        """Run the denoiser on ``xt`` and return the loss of recovering ``x0``.

        For the absorbing process only masked positions carry loss, so a model that accepts ``score_mask``
        (:class:`~diffusion.DDiTModel`) computes its output head there only (about half the positions on
        average); the loss is the same sum, see :meth:`_score_masked_positions`.
        """
        sigma_bar = self.schedule.total_noise(t)
        if self.discrete_time is not None and self.parameterization == "x0":  # D3PM's general L_vb
            return self._discrete_time_loss(model, x0, xt, t, sigma_bar, attention_mask)
        if self.discrete_time is not None:  # D3PM: the masked sum with the T-step weight, plus the prior term
            out = self._masked_loss(model, x0, xt, t, sigma_bar, attention_mask)
            chain = DiscreteTime(self.process, self.schedule, self.discrete_time)
            prior = chain.prior_kl(x0[:1, :1]).to(out.per_sequence.dtype)[0, 0]  # the same for every real token
            tokens = attention_mask.sum(-1) if attention_mask is not None else torch.full_like(t, x0.shape[1])
            per_sequence = out.per_sequence + prior * tokens.to(out.per_sequence.dtype)
            return ObjectiveOutput(per_sequence.sum() / max(out.num_tokens, 1), per_sequence, t, out.num_tokens)
        return self._masked_loss(model, x0, xt, t, sigma_bar, attention_mask)

    def _masked_loss(self, model: torch.nn.Module, x0: Tensor, xt: Tensor, t: Tensor, sigma_bar: Tensor,
                     attention_mask: Tensor | None) -> ObjectiveOutput:
        if isinstance(self.process, AbsorbingProcess) and accepts_score_mask(model):
            return self._score_masked_positions(model, x0, xt, t, sigma_bar, attention_mask)
        output = model(input_ids=xt, total_noise=sigma_bar, attention_mask=attention_mask).logits
        if self.objective in MASKED_OBJECTIVES:  # a subs denoiser returns log-probabilities
            masked = xt == self.process.mask_id
            if attention_mask is not None:
                masked = masked & attention_mask.bool()
            per_sequence = masked_elbo(output, x0, masked, self.elbo_weight(t))
        else:
            if self.parameterization in ("subs", "x0"):
                output = self.process.log_score_from_log_probs(output, sigma_bar, xt)
            per_sequence = score_entropy_loss(output, x0, xt, t, self.process, self.schedule, attention_mask)
        num_tokens = int(attention_mask.sum()) if attention_mask is not None else x0.numel()
        return ObjectiveOutput(per_sequence.sum() / max(num_tokens, 1), per_sequence, t, num_tokens)

    def _discrete_time_loss(self, model: torch.nn.Module, x0: Tensor, xt: Tensor, t: Tensor, sigma_bar: Tensor,
                            attention_mask: Tensor | None) -> ObjectiveOutput:
        """D3PM's ``L_vb`` (plus ``hybrid`` times the cross-entropy) of an ``x0`` model at the steps ``k = t T``:
        every position carries a KL term (under the uniform process any position may have moved), computed in
        float64 by :meth:`~diffusion.d3pm.DiscreteTime.loss`."""
        output = model(input_ids=xt, total_noise=sigma_bar, attention_mask=attention_mask).logits
        chain = DiscreteTime(self.process, self.schedule, self.discrete_time)
        k = (t.double() * self.discrete_time).round().long()
        keep = attention_mask.bool() if attention_mask is not None else None
        per_sequence = chain.loss(x0, xt, k, output, hybrid=self.hybrid, keep=keep).to(output.dtype)
        num_tokens = int(attention_mask.sum()) if attention_mask is not None else x0.numel()
        return ObjectiveOutput(per_sequence.sum() / max(num_tokens, 1), per_sequence, t, num_tokens)

    def _score_masked_positions(self, model: torch.nn.Module, x0: Tensor, xt: Tensor, t: Tensor, sigma_bar: Tensor,
                                attention_mask: Tensor | None) -> ObjectiveOutput:
        """The absorbing losses from the outputs at masked positions only.

        Both losses vanish where ``x_t^i != MASK`` (MDLM: the sum runs over masked i; SEDD absorbing:
        ``SE_i = 0`` at unmasked i), so ``L(x0, t) = w(t) sum_{i masked} l_i`` is summed per row from the
        ``n`` selected positions: outputs ``[n, S]``, per-position terms ``[n]``, row sums ``[B]``.
        """
        scored = xt == self.process.mask_id
        if attention_mask is not None:
            scored = scored & attention_mask.bool()
        rows = scored.nonzero(as_tuple=True)[0]
        output = model(input_ids=xt, total_noise=sigma_bar, attention_mask=attention_mask, score_mask=scored).logits
        x0_sel, xt_sel, sigma_sel = x0[scored], xt[scored], sigma_bar[rows]
        if self.objective in MASKED_OBJECTIVES:
            per_sequence = masked_elbo(output, x0_sel, None, self.elbo_weight(t), rows=rows)
        else:
            if self.parameterization == "subs":
                output = self.process.log_score_from_log_probs(output, sigma_sel, xt_sel)
            terms = self.process.score_entropy(output, sigma_sel, xt_sel, x0_sel)
            per_sequence = weighted_row_sum(terms, self.schedule.rate(t), rows)
        num_tokens = int(attention_mask.sum()) if attention_mask is not None else x0.numel()
        return ObjectiveOutput(per_sequence.sum() / max(num_tokens, 1), per_sequence, t, num_tokens)

    def __call__(
        self,
        model: torch.nn.Module,
        x0: Tensor,
        *,
        attention_mask: Tensor | None = None,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> ObjectiveOutput:
        """Loss of a batch of clean tokens ``x0 [B, L]``: :meth:`corrupt`, then :meth:`loss`."""
        t, xt = self.corrupt(x0, t=t, generator=generator)
        return self.loss(model, x0, xt, t, attention_mask=attention_mask)


def exact_count_masks(shape: tuple[int, ...] | torch.Size, *, antithetic: bool = True,
                      generator: torch.Generator | None = None, t: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """ARDM's masks for ``[B, D]`` rows: ``m_b`` uniform on ``{1, ..., D}`` and exactly ``m_b`` positions masked,
    a uniformly random subset; returns ``(masked [B, D] bool, t [B] = m / D)`` on the CPU.

    ``antithetic`` stratifies the counts across the batch (``u_b = (pi_b + v_b) / B`` for a random permutation pi,
    ``m_b = floor(u_b D) + 1``: each count is still uniform, the batch covers the range evenly).  A given ``t``
    (fractions ``m / D``, evaluation with fixed noise) fixes the counts and draws only the subsets.
    """
    rows, length = int(shape[0]), int(shape[1])
    if length < 1:
        raise ValueError(f"ARDM masks need at least one position, got shape {tuple(shape)}")
    if t is None:
        u = torch.rand(rows, generator=generator, dtype=torch.float64)
        if antithetic:
            u = (torch.randperm(rows, generator=generator).double() + u) / rows
        counts = (u * length).floor().long().clamp(0, length - 1) + 1
    else:
        counts = (t.detach().double().cpu() * length).round().long()
        if bool(((counts < 1) | (counts > length)).any()):
            raise ValueError(f"ARDM times must be m / D with m in 1..{length}, got t={t.tolist()}")
    ranks = torch.rand(rows, length, generator=generator).argsort(-1).argsort(-1)  # a uniform random order per row
    return ranks < counts[:, None], counts.float() / length
