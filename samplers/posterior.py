"""Split-Gibbs posterior sampling for uniform-process score models (SG-DPS / SGDD: Chu, Song and Yue, "Split Gibbs
Discrete Diffusion Posterior Sampling", NeurIPS 2025, arXiv 2503.01161).

To sample ``p(x | y) ~ p(x) p(y | x)`` from a prior diffusion model ``p(x)`` without retraining, augment it with a
noisy copy z of x under the forward kernel at noise ``sigma``:

    pi_sigma(x, z) ~ p(x) q_sigma(z | x) p(y | z),
    log q_sigma(z | x) = d_H(x, z) log(a / (N - 1)) + (L - d_H(x, z)) log(1 - a),   a = (1 - e^{-sigma}) (1 - 1/N)

(``a`` is the chance that a token changes; a *specific* other token has chance ``a / (N - 1)``: this is the exact
uniform kernel, :meth:`diffusion.processes.UniformProcess.transition_probs`; the official code writes ``log a``,
a hotter coupling whenever N > 2).  Gibbs sampling alternates

1. the prior step, x ~ pi(x | z): the reverse process of the model started from ``x_t = z`` at the time whose
   total noise is sigma (:meth:`samplers.sedd._SEDDSampler.reverse_from`, the analytic predictor), and
2. the likelihood step, z ~ pi(z | x) ~ q_sigma(z | x) p(y | z): ``mh_steps`` Metropolis-Hastings moves, each
   proposing one uniformly chosen free position set to a uniformly chosen token (a symmetric proposal) and
   accepting with ``min(1, exp(Delta log p(y | z) + Delta log q_sigma(z | x)))``,

while sigma is annealed from the prior's (t = 1) to ``t_final``; as sigma -> 0 the z-marginal
``p_sigma(z) p(y | z)`` tends to the posterior.  The last z is returned.

The observation is ``log_likelihood(x) -> [B]`` (log p(y | x) of each row), or a reward ``r(x)`` with a temperature
alpha, the target then being ``p(x) exp(r(x) / alpha)``.  Absorbing models are refused: their kernel puts MASK
tokens into z, on which a likelihood of text is not defined.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusion.processes import UniformProcess
from diffusion.spec import DiffusionSpec

from .base import FREE, SampleOutput, Sampler, check_positive_int, draw_rows, register_sampler, uniforms
from .sedd import AnalyticSampler

__all__ = ["SplitGibbsPosteriorSampler", "uniform_log_kernel"]


def _log_kernel_terms(sigma_bar: float, num_tokens: int) -> tuple[float, float]:
    """``(log(a / (N - 1)), log(1 - a))``: one position's log-kernel when its token changed / stayed."""
    a = (1.0 - math.exp(-sigma_bar)) * (1.0 - 1.0 / num_tokens)
    return math.log(a / (num_tokens - 1)), math.log1p(-a)


def uniform_log_kernel(x: Tensor, z: Tensor, sigma_bar: float, num_tokens: int) -> Tensor:
    """``log q_sigma(z | x)`` of the uniform forward kernel over the last dimension: ``[..., L] -> [...]``."""
    log_changed, log_kept = _log_kernel_terms(sigma_bar, num_tokens)
    changed = (x != z).sum(-1).double()
    return changed * log_changed + (x.shape[-1] - changed) * log_kept


@register_sampler
class SplitGibbsPosteriorSampler(Sampler):
    """SG-DPS (see the module docstring); ``num_steps`` of :meth:`generate` is the number of annealing levels.

    Args:
        log_likelihood: ``x [B, L] -> [B]``, log p(y | x) (finite, or -inf for impossible rows); or
        reward: ``x [B, L] -> [B]`` with ``reward_temperature`` alpha > 0 (log-likelihood ``r / alpha``).
        prior_steps: analytic steps of each prior step.
        mh_steps: Metropolis-Hastings moves of each likelihood step.
        t_final: the last annealing level's time (and the prior steps' final time).
    """

    name = "sgdps"

    def __init__(self, log_likelihood: Callable[[Tensor], Tensor] | None = None, *,
                 reward: Callable[[Tensor], Tensor] | None = None, reward_temperature: float = 1.0,
                 prior_steps: int = 32, mh_steps: int = 200, t_final: float = 1e-3) -> None:
        if (log_likelihood is None) == (reward is None):
            raise ValueError("pass exactly one of log_likelihood and reward")
        if not (isinstance(reward_temperature, (int, float)) and math.isfinite(reward_temperature)
                and reward_temperature > 0):
            raise ValueError(f"reward_temperature must be a finite number > 0, got {reward_temperature!r}")
        check_positive_int("prior_steps", prior_steps)
        check_positive_int("mh_steps", mh_steps)
        if not 0.0 < t_final < 1.0:
            raise ValueError(f"t_final must be in (0, 1), got t_final={t_final!r}")
        self.log_likelihood = log_likelihood
        self.reward, self.reward_temperature = reward, float(reward_temperature)
        self.prior_steps, self.mh_steps, self.t_final = prior_steps, mh_steps, t_final
        self.prior = AnalyticSampler(t_final=t_final)

    def check_model(self, spec: DiffusionSpec) -> None:
        super().check_model(spec)
        if not isinstance(spec.process, UniformProcess):
            raise ValueError("sgdps needs a uniform-process model: the absorbing kernel puts MASK tokens into z, on "
                             "which a likelihood of text is not defined")

    def _log_likelihood(self, x: Tensor) -> Tensor:
        value = self.log_likelihood(x) if self.log_likelihood is not None else self.reward(x) / self.reward_temperature
        value = torch.as_tensor(value, dtype=torch.float64, device=x.device)
        if value.shape != (x.shape[0],):
            raise ValueError(f"the likelihood returned shape {tuple(value.shape)} for {x.shape[0]} rows; it must "
                             f"return one value per row, shape ({x.shape[0]},)")
        if bool(torch.isnan(value).any()) or bool(torch.isposinf(value).any()):
            raise ValueError("the likelihood returned NaN or +inf; log-likelihoods are finite or -inf")
        return value

    def likelihood_step(self, x: Tensor, free: Tensor, sigma_bar: float, num_tokens: int,
                        generator: torch.Generator | None) -> Tensor:
        """z ~ q_sigma(z | x) p(y | z) by ``mh_steps`` Metropolis-Hastings moves started at z = x."""
        z = x.clone()
        current = self._log_likelihood(z)
        log_changed, log_kept = _log_kernel_terms(sigma_bar, num_tokens)
        per_change = log_changed - log_kept  # log q_sigma(z | x) gains this per position where z differs from x
        rows = torch.arange(x.shape[0], device=x.device)
        counts = free.sum(-1)
        free_positions = torch.argsort((~free).to(torch.int8), dim=-1, stable=True)  # free positions first
        for _ in range(self.mh_steps):
            u = uniforms((x.shape[0], 3), generator, x.device)
            position = free_positions[rows, (u[:, 0] * counts).long().clamp_max(counts - 1)]
            token = (u[:, 1] * num_tokens).long().clamp_max(num_tokens - 1)
            proposal = z.clone()
            proposal[rows, position] = token
            proposed = self._log_likelihood(proposal)
            was = (z[rows, position] != x[rows, position]).double()
            now = (token != x[rows, position]).double()
            log_ratio = proposed - current + (now - was) * per_change
            accept = torch.log(u[:, 2]) < log_ratio.nan_to_num(nan=-math.inf)
            z = torch.where(accept[:, None], proposal, z)
            current = torch.where(accept, proposed, current)
        return z

    def _generate(self, model: Any, spec: DiffusionSpec, canvas: Tensor, num_steps: int,
                  generator: torch.Generator | None, return_trajectory: bool, callback: Any) -> SampleOutput:
        free = canvas == FREE
        if not bool(free.any(-1).all()):
            raise ValueError("every row needs at least one position to generate")
        start = draw_rows(canvas.shape, generator, lambda sub, g: spec.process.sample_limit(sub, generator=g))
        z = torch.where(free, start.to(canvas.device), canvas)
        levels = torch.linspace(1.0, self.t_final, num_steps, dtype=torch.float64).tolist()
        nfe, trajectory = 0, [z.clone()] if return_trajectory else None
        for i, t in enumerate(levels):
            prior = self.prior.reverse_from(model, spec, z, free, max(t, self.t_final * (1 + 1e-9)),
                                            self.prior_steps, generator)
            nfe += prior.nfe
            sigma_bar = float(spec.schedule.total_noise(torch.tensor(t, dtype=torch.float64)))
            z = self.likelihood_step(prior.tokens, free, sigma_bar, spec.num_tokens, generator)
            if trajectory is not None:
                trajectory.append(z.clone())
            if callback is not None:
                callback(i, z)
        return SampleOutput(tokens=z, nfe=nfe, trajectory=trajectory)
