"""Duo's discrete consistency distillation (Sahoo et al., ICML 2025, section 5): a uniform x0 student learns to
predict from x_t what its teacher predicts from the less noisy x_s of the same Gaussian path.

One round of distillation is one training run (``ddlm-train --objective duo_distill --init-from TEACHER
--distill-dt DT``): the student starts as a copy of the teacher, which stays frozen for the run.  Per sequence:

- ``t ~ U(0, 1)``, then ``t <- min(t + dt, 1)`` and ``s = t - dt`` (Duo's shift), log-SNRs ``gamma(t), gamma(s)``
  on Duo's distillation band ``[gamma_min, gamma_max] = [-4, -1]`` and signals ``a = sqrt(sigmoid(-gamma))``;
- one ``eps ~ N(0, I_K)`` per position shared by both times: ``x_t = argmax(a_t e_x0 + sqrt(1 - a_t^2) eps)`` and
  ``x_s`` likewise, so ``x_s`` is ``x_t``'s deterministic (probability-flow) predecessor on the Gaussian path;
- the loss is ``sum_i KL(p_student(. | x_t, sigma_bar_t) || p_teacher(. | x_s, sigma_bar_s))`` (Duo's ``kl-bwd``),
  ``sigma_bar = -log T(a)`` of :class:`~diffusion.duo.DuoSchedule`.

Rounds double ``dt`` (Duo: ``2^n / 64``) and take the previous round's student as the next teacher
(``scripts/distill_duo.py`` chains them); a distilled student then samples in few steps with the ancestral
(``d3pm``/``analytic``) sampler.  Choices: Duo refreshes the teacher from the student's EMA inside one run; here a
round is a run whose teacher is a saved model folder, so a resumed round reloads the same teacher and resumes
bit-exactly.  The held-out loss a run reports is the student's own ELBO (the base objective).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor, nn

from .duo import DuoSchedule, gaussian_latent, gaussian_signal
from .objectives import DiffusionObjective, ObjectiveOutput
from .processes import UniformProcess
from .time_nodes import sample_t

__all__ = ["DuoDistillation"]


@dataclass(frozen=True, eq=False)
class DuoDistillation:
    """One round of Duo's consistency distillation (see the module docstring).

    Args:
        base: the student's own objective (uniform ``x0``, continuous ``score_entropy``): what evaluation reports.
        teacher: the frozen teacher, a uniform ``x0`` model over the same states (kept in eval mode, no gradients).
        dt: the round's time step in (0, 1].
        gamma_min, gamma_max: the band of log-SNR values (Duo's distillation uses [-4, -1]).
    """

    base: DiffusionObjective
    teacher: nn.Module = field(repr=False)
    dt: float
    gamma_min: float = -4.0
    gamma_max: float = -1.0

    def __post_init__(self) -> None:
        base = self.base
        if not (isinstance(base.process, UniformProcess) and base.parameterization == "x0"):
            raise ValueError(f"Duo's distillation trains a uniform x0 student, got process={base.process.name!r}, "
                             f"parameterization={base.parameterization!r}")
        config = getattr(self.teacher, "config", None)
        if (getattr(config, "process", None), getattr(config, "parameterization", None),
                getattr(config, "vocab_size", None)) != ("uniform", "x0", base.process.num_states):
            raise ValueError(f"the teacher must be a uniform x0 model over {base.process.num_states} states, got "
                             f"process={getattr(config, 'process', None)!r}, parameterization="
                             f"{getattr(config, 'parameterization', None)!r}")
        if not (isinstance(self.dt, (int, float)) and 0.0 < self.dt <= 1.0 and math.isfinite(self.dt)):
            raise ValueError(f"the distillation step dt must be in (0, 1], got dt={self.dt!r}")
        self.teacher.eval().requires_grad_(False)
        DuoSchedule(base.process.num_states, self.gamma_min, self.gamma_max)  # gamma_min < gamma_max

    @cached_property
    def schedule(self) -> DuoSchedule:
        return DuoSchedule(self.base.process.num_states, self.gamma_min, self.gamma_max)

    def corrupt(self, x0: Tensor, *, t: Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``t [B]`` (after the shift: ``t >= dt``) and ``[B, L, 2]`` holding ``x_t`` and ``x_s`` of one latent
        noise; ``t`` given is used as the shifted time."""
        if x0.dim() != 2:
            raise ValueError(f"x0 must be [batch, length], got shape {tuple(x0.shape)}")
        if t is None:
            t = sample_t(x0.shape[0], t_min=1e-12, antithetic=self.base.antithetic, generator=generator,
                         device=x0.device)
            t = (t + self.dt).clamp(max=1.0)
        num_states = self.base.process.num_states
        noise = torch.randn(*x0.shape, num_states, generator=generator, device=x0.device)

        def argmax_at(time: Tensor) -> Tensor:
            signal = gaussian_signal(self.gamma_min + time.double() * (self.gamma_max - self.gamma_min))
            return gaussian_latent(x0, signal.to(x0.device), num_states, noise=noise).argmax(-1)

        return t, torch.stack([argmax_at(t), argmax_at((t - self.dt).clamp(min=0.0))], dim=-1)

    def loss(self, model: nn.Module, x0: Tensor, pair: Tensor, t: Tensor, *,
             attention_mask: Tensor | None = None) -> ObjectiveOutput:
        """``sum_i KL(p_student(. | x_t) || p_teacher(. | x_s))`` per sequence ``[B]`` (nats, float32)."""
        x_t, x_s = pair[..., 0], pair[..., 1]
        sigma_t = self.schedule.total_noise(t).float()
        sigma_s = self.schedule.total_noise((t - self.dt).clamp(min=0.0)).float()
        student = model(input_ids=x_t, total_noise=sigma_t, attention_mask=attention_mask).logits.float()
        with torch.no_grad():
            teacher = self.teacher(input_ids=x_s, total_noise=sigma_s, attention_mask=attention_mask).logits.float()
        kl = (student.exp() * (student - teacher)).sum(-1)
        if attention_mask is not None:
            kl = kl * attention_mask.to(kl.dtype)
        per_sequence = kl.sum(-1)
        num_tokens = int(attention_mask.sum()) if attention_mask is not None else x0.numel()
        return ObjectiveOutput(per_sequence.sum() / max(num_tokens, 1), per_sequence, t, num_tokens)

    def __call__(self, model: nn.Module, x0: Tensor, *, attention_mask: Tensor | None = None,
                 t: Tensor | None = None, generator: torch.Generator | None = None) -> ObjectiveOutput:
        t, pair = self.corrupt(x0, t=t, generator=generator)
        return self.loss(model, x0, pair, t, attention_mask=attention_mask)
