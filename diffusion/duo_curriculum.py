"""Duo's curriculum (Sahoo et al., ICML 2025, "The Diffusion Duality", section 4) for a uniform ``x0`` model.

A run with curriculum steps ``[0, end)`` trains, at step n:

- ``t ~ U(0, 1)`` (stratified across the batch like the other objectives), the log-SNR ``gamma(t) = gamma_min + t
  (gamma_max - gamma_min)`` and the Gaussian signal ``a(t) = sqrt(sigmoid(-gamma(t)))``;
- the latent ``w = a e_x0 + sqrt(1 - a^2) eps`` and ``x_t = argmax w``, which is exactly the uniform process at
  ``sigma_bar(t) = -log T(a(t))`` (:class:`~diffusion.duo.DuoSchedule`, :mod:`diffusion.duo`);
- the network reads ``softmax(w / tau_n)`` as the weights of its input embedding (and ``x_t`` as the tokens its
  output parameterisation reads) and is scored with the uniform process's ELBO integrand at ``(x_t, sigma_bar(t))``:
  ``sigma(t) sum_i SE_i``, the x0 model's scores coming from the mixture identity
  (:meth:`~diffusion.processes.UniformProcess.log_score_from_log_probs`);
- ``tau_n = 10^{l_0}`` before ``anneal_from``, then ``log10 tau`` moves linearly from ``l_0`` to ``l_1`` until
  ``end`` (``(l_0, l_1) = tau_log10``, Duo's defaults ``(-1, -2)``: input temperatures 0.1 to 0.01).

From step ``end`` on the run trains the base objective (:meth:`DuoCurriculum.at_step` returns it): the x0 model's
continuous ELBO under its own schedule with discrete ``x_t``, which is also the bound held-out evaluation reports.

The check that can be made exactly (tested): at ``tau = 0`` the relaxed input is the one-hot of ``x_t``, and the
curriculum's loss equals the base score-entropy loss under :class:`~diffusion.duo.DuoSchedule` at the same ``t``
and ``x_t``; so the curriculum's limit is the uniform process's ELBO restricted to Duo's band of noise levels.
Choices: Duo tabulates ``T`` once; here it is computed by quadrature for the batch's B levels at every step.  The latent is drawn with the step's generator, so a resumed run draws the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from .duo import DuoSchedule, gaussian_latent, gaussian_signal, tempered_softmax
from .losses import score_entropy_loss
from .objectives import DiffusionObjective, ObjectiveOutput
from .processes import UniformProcess
from .time_nodes import sample_t

__all__ = ["DuoCurriculum"]


@dataclass(frozen=True)
class DuoCurriculum:
    """Duo's curriculum objective (see the module docstring).

    Args:
        base: the uniform ``x0`` model's ``score_entropy`` objective (continuous time), trained from ``end`` on.
        end: the first step after the curriculum (>= 1).
        anneal_from: the step where the input temperature starts to fall (``0 <= anneal_from < end``).
        tau_log10: ``(l_0, l_1)``, the temperature's log10 before and at the end of the annealing.
        gamma_min, gamma_max: Duo's band of log-SNR values (:class:`~diffusion.duo.DuoSchedule`).
        step: the training step this objective is for (set by :meth:`at_step`).
    """

    base: DiffusionObjective
    end: int
    anneal_from: int = 0
    tau_log10: tuple[float, float] = (-1.0, -2.0)
    gamma_min: float = -3.5
    gamma_max: float = -1.75
    step: int = 0

    def __post_init__(self) -> None:
        base = self.base
        if not (isinstance(base.process, UniformProcess) and base.parameterization == "x0"
                and base.objective == "score_entropy" and base.discrete_time is None):
            raise ValueError(f"Duo's curriculum trains a uniform x0 model with the continuous score_entropy "
                             f"objective, got process={base.process.name!r}, parameterization="
                             f"{base.parameterization!r}, objective={base.objective!r}, discrete_time="
                             f"{base.discrete_time!r}")
        for name in ("end", "anneal_from", "step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {name}={value!r}")
        if not (self.end >= 1 and self.anneal_from < self.end):
            raise ValueError(f"the curriculum needs 0 <= anneal_from < end and end >= 1, got anneal_from="
                             f"{self.anneal_from}, end={self.end}")
        if len(self.tau_log10) != 2 or not all(math.isfinite(v) for v in self.tau_log10):
            raise ValueError(f"tau_log10 must be two finite numbers, got tau_log10={self.tau_log10!r}")
        DuoSchedule(base.process.num_states, self.gamma_min, self.gamma_max)  # gamma_min < gamma_max

    @cached_property
    def schedule(self) -> DuoSchedule:
        """The uniform process of the Gaussian band the curriculum trains on."""
        return DuoSchedule(self.base.process.num_states, self.gamma_min, self.gamma_max)

    @property
    def tau(self) -> float:
        """The input temperature at :attr:`step`."""
        start, stop = self.tau_log10
        fraction = min(max((self.step - self.anneal_from) / (self.end - self.anneal_from), 0.0), 1.0)
        return 10.0 ** (start + fraction * (stop - start))

    def at_step(self, step: int) -> DuoCurriculum | DiffusionObjective:
        """The objective of training step ``step``: this curriculum at that step, or the base objective after it."""
        return self.base if step >= self.end else replace(self, step=step)

    def corrupt(self, x0: Tensor, *, t: Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``t [B]`` (unless given) and the Gaussian latent ``w [B, L, K]`` (float32) of ``x0 [B, L]``;
        ``x_t = w.argmax(-1)``."""
        if x0.dim() != 2:
            raise ValueError(f"x0 must be [batch, length], got shape {tuple(x0.shape)}")
        if t is None:
            t = sample_t(x0.shape[0], t_min=1e-12, antithetic=self.base.antithetic, generator=generator,
                         device=x0.device)
        signal = gaussian_signal(self.gamma_min + t.double() * (self.gamma_max - self.gamma_min))
        return t, gaussian_latent(x0, signal.to(x0.device), self.base.process.num_states, generator=generator)

    def loss(self, model: torch.nn.Module, x0: Tensor, latent: Tensor, t: Tensor, *,
             attention_mask: Tensor | None = None, tau: float | None = None) -> ObjectiveOutput:
        """``sigma(t) sum_i SE_i`` per sequence at ``x_t = argmax latent``, the network reading ``softmax(latent /
        tau)`` (``tau``: :attr:`tau` unless given; 0 feeds the one-hot of ``x_t``)."""
        x_t = latent.argmax(-1)
        weights = tempered_softmax(latent.float(), self.tau if tau is None else tau)
        sigma_bar = self.schedule.total_noise(t).to(torch.float32)
        output = model(input_ids=x_t, total_noise=sigma_bar, attention_mask=attention_mask,
                       input_weights=weights).logits
        log_score = self.base.process.log_score_from_log_probs(output, sigma_bar, x_t)
        per_sequence = score_entropy_loss(log_score, x0, x_t, t, self.base.process, self.schedule, attention_mask)
        num_tokens = int(attention_mask.sum()) if attention_mask is not None else x0.numel()
        return ObjectiveOutput(per_sequence.sum() / max(num_tokens, 1), per_sequence, t, num_tokens)

    def __call__(self, model: torch.nn.Module, x0: Tensor, *, attention_mask: Tensor | None = None,
                 t: Tensor | None = None, generator: torch.Generator | None = None) -> ObjectiveOutput:
        """Loss of a batch of clean tokens ``x0 [B, L]``: :meth:`corrupt`, then :meth:`loss`."""
        t, latent = self.corrupt(x0, t=t, generator=generator)
        return self.loss(model, x0, latent, t, attention_mask=attention_mask)

    def describe(self) -> dict[str, Any]:
        """What a run records about its curriculum."""
        return {"end": self.end, "anneal_from": self.anneal_from, "tau_log10": list(self.tau_log10),
                "gamma_min": self.gamma_min, "gamma_max": self.gamma_max}
