"""Likelihood evaluation: negative ELBO per token, perplexity bounds with 95% intervals, AO-ARM orders.

Two forms of the bound, both in nats per sequence ``x0 [B, L]``:

- **lambda form** (time-free absorbing ``subs`` models, RADD's lambda-DCE): with masking probability
  ``lambda``, ``-log p(x0) <= int_0^1 f(lambda) d lambda``,
  ``f(lambda) = E_{x_lambda}[(1/lambda) sum_{i masked} -log p_theta(x0^i | x_lambda)]``.
  Exact for exact conditionals; no schedule and no eps enters.
- **block diffusion** (BD3-LM models, ``attention_block_size``): ``-log p(x0) = sum_b -log p(x0^b | x0^{<b})``,
  each term bounded by the lambda form with the earlier blocks clean; one lambda per node serves every block, and
  all blocks are scored in one pass over ``x_lambda (+) x0`` (:class:`~diffusion.block_diffusion.BlockDiffusionObjective`).
- **discrete time** (``discrete_time=T``, models that predict x0: absorbing ``subs``, uniform ``x0``; D3PM's bound,
  Austin et al. 2021):
  ``L_vb = sum_i KL(q(x_T^i | x0^i) || p(x_T)) + sum_{k=1}^T E_{q(x_k | x0)} L_{k-1}`` on the grid ``t_k = k / T`` of
  the model's schedule (:mod:`diffusion.d3pm`).  Every k is visited once per sequence with one draw of x_k, and
  the training objective's one-step estimate ``prior + T L_{k-1}`` (:class:`~diffusion.objectives.
  DiffusionObjective` with ``discrete_time``) is averaged over the T steps: an unbiased estimate of ``L_vb`` for T
  network calls.  For exact conditionals it sits above the continuous bound and falls to it as T grows.
- **t form** (every other model): ``int_0^1 E_{x_t}[L(x0, t)] dt`` with the training objective's
  per-sequence loss (masked ELBO or DWDSE, weights included) plus the terminal term: for the uniform
  process ``KL(q(x_1 | x0) || uniform)`` exactly (likewise for the nearest-neighbour one, whose symmetric kernel
  also tends to uniform); for absorbing ``subs`` models the mass the schedule
  leaves unmasked at t = 1 (``e^{-sigma_bar(1)}``, eps for log-linear) as ``e^{-sigma_bar(1)} * sum_i
  -log p(x0^i | all MASK)``; for the Discrete Markov Bridge its learnt prior term ``KL(q(x_1 | x0) || p_hat_0
  exp(sigma_bar(1) Q))`` (:mod:`diffusion.markov_bridge`).  For absorbing ``score`` models that last term is not
  added (a bias below ``eps`` relative), which is said in the result.

The integral over lambda or t is estimated per sequence with the nodes of one rule of
:mod:`diffusion.time_nodes` (``monte_carlo``, ``stratified`` or ``quadrature``), one mask draw per node;
quadrature is exact in expectation once ``N >= L / 2`` for time-free models (the integrand is then a
polynomial of degree L - 1 in lambda).

Per-token values and 95% intervals come from the per-sequence estimates (normal approximation:
``mean +- 1.96 sd / sqrt(n)`` over sequences of equal length), so the interval covers both the data
and the estimator's noise.  :func:`any_order_nll` is the any-order autoregressive evaluation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..block_diffusion import BlockDiffusionObjective
from ..losses import masked_elbo
from ..markov_bridge import BridgeProcess
from ..modeling_ddit import accepts_score_mask
from ..objectives import DiffusionObjective
from ..processes import UniformProcess, mask_tokens
from ..schedules import LINEAR_MASKING
from ..structured import SymmetricRateProcess
from ..spec import DiffusionSpec
from ..time_nodes import TIME_RULES, time_nodes

__all__ = [
    "LikelihoodResult",
    "any_order_nll",
    "any_order_steps",
    "evaluate_causal_likelihood",
    "evaluate_likelihood",
    "sequence_nelbo",
    "summarize",
]

METHODS = TIME_RULES
T_MIN = 1e-6  # floor of the random nodes: the 1/lambda weight of a node at 0 would be infinite


@dataclass(frozen=True)
class LikelihoodResult:
    """A held-out likelihood bound: nats per token and perplexity, each with a 95% interval."""

    nats_per_token: float
    nats_ci95: tuple[float, float]
    perplexity: float
    perplexity_ci95: tuple[float, float]
    num_sequences: int
    num_tokens: int
    network_calls: int
    method: str
    num_points: int
    form: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(method: str, num_points: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got method={method!r}")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"num_points must be a positive int, got num_points={num_points!r}")


@torch.no_grad()
def sequence_nelbo(model: Any, x0: Tensor, *, method: str = "quadrature", num_points: int = 8,
                   generator: torch.Generator | None = None, objective: DiffusionObjective | None = None,
                   discrete_time: int | None = None) -> tuple[Tensor, int]:
    """Per-sequence negative ELBO ``[B]`` (nats, float64) of clean tokens ``x0 [B, L]``, and the network calls.

    ``discrete_time=T``: D3PM's T-step bound instead (T calls; ``method`` and ``num_points`` are not used)."""
    _check(method, num_points)
    spec = DiffusionSpec.of(model)
    if discrete_time is not None:
        return _discrete_time_nelbo(model, spec, x0, discrete_time, generator, objective)
    if spec.glauber_sweeps is not None:
        raise ValueError("a Glauber model (--objective glauber) is a classifier, not a denoiser: it has no "
                         "likelihood bound here; its held-out classification loss is in the run's metrics.jsonl")
    device = next(model.parameters()).device
    x0 = x0.to(device)
    rows = x0.shape[0]
    points, weights = time_nodes(method, num_points, rows, generator=generator, t_min=T_MIN)
    total = torch.zeros(rows, dtype=torch.float64, device=device)
    calls = 0
    if spec.block_size is not None:
        if not spec.time_free_masked:
            raise ValueError("a block-diffusion model must be a time-free masked model to be evaluated")
        blocks = BlockDiffusionObjective(LINEAR_MASKING, spec.mask_id, spec.num_states, spec.block_size)
        for n in range(num_points):  # the lambda form per block: t is the masking probability, weight 1 / lambda
            lam = points[n].to(device)[:, None].expand(rows, x0.shape[1] // spec.block_size)
            _, xt = blocks.corrupt(x0, t=lam, generator=generator)
            total += weights[n].to(device) * blocks.loss(model, x0, xt, lam).per_sequence.double()
            calls += 1
        return total, calls
    if spec.time_free_masked:  # lambda form: time is the masking probability
        for n in range(num_points):
            lam = points[n].to(device)
            xt, masked = mask_tokens(x0, lam, spec.mask_id, generator=generator)
            log_probs = model(input_ids=xt).logits.double()
            calls += 1
            total += weights[n].to(device) * masked_elbo(log_probs, x0, masked, LINEAR_MASKING.elbo_weight(lam))
        return total, calls
    objective = objective or DiffusionObjective.from_spec(spec)
    for n in range(num_points):
        t = points[n].to(dtype=torch.float32)
        _, xt = objective.corrupt(x0.cpu(), t=t, generator=generator)  # the generator lives on the CPU
        out = objective.loss(model, x0, xt.to(device), t.to(device))
        calls += 1
        total += weights[n].to(device) * out.per_sequence.double()
    total += _terminal_term(model, objective, x0)
    calls += int(spec.masked)
    return total, calls


def _check_discrete_time(steps: int | None) -> None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"discrete_time must be an int T >= 1, got discrete_time={steps!r}")


def _discrete_time_nelbo(model: Any, spec: DiffusionSpec, x0: Tensor, steps: int,
                         generator: torch.Generator | None, objective: DiffusionObjective | None) -> tuple[Tensor, int]:
    """``L_vb`` per sequence ``[B]``: the mean over k = 1..T of the one-step estimate ``prior + T L_{k-1}``."""
    _check_discrete_time(steps)
    if spec.block_size is not None or spec.glauber_sweeps is not None:
        raise ValueError("the discrete-time bound is for denoisers that predict x0 (absorbing subs, uniform x0), not "
                         "block-diffusion or Glauber models")
    # hybrid = 0: the bound itself; the objective refuses models that do not predict x0, naming why
    chain = replace(objective or DiffusionObjective.from_spec(spec), discrete_time=steps, hybrid=0.0)
    device = next(model.parameters()).device
    rows = x0.shape[0]
    total = torch.zeros(rows, dtype=torch.float64, device=device)
    for k in range(1, steps + 1):
        t = torch.full((rows,), k / steps)
        _, xt = chain.corrupt(x0.cpu(), t=t, generator=generator)  # the generator lives on the CPU
        total += chain.loss(model, x0.to(device), xt.to(device), t.to(device)).per_sequence.double() / steps
    return total, steps


def _terminal_term(model: Any, objective: DiffusionObjective, x0: Tensor) -> Tensor:
    """The t = 1 end of the bound (see the module docstring), ``[B]`` nats."""
    sigma_end = objective.schedule.total_noise(torch.ones((), dtype=torch.float64))
    process = objective.process
    if isinstance(process, UniformProcess):
        stay = torch.exp(-sigma_end)
        n = process.num_tokens
        q_self, q_other = stay + (1 - stay) / n, (1 - stay) / n
        kl = q_self * torch.log(q_self * n) + (n - 1) * q_other * torch.log(q_other * n)
        return torch.full((x0.shape[0],), float(kl) * x0.shape[1], dtype=torch.float64, device=x0.device)
    if isinstance(process, BridgeProcess):  # its learnt prior p_T = p_hat_0 exp(sigma_T Q)
        return process.prior_kl(x0).sum(-1)
    if isinstance(process, SymmetricRateProcess):  # doubly stochastic: its limit is uniform
        rows = process.transition_probs(x0, sigma_end.to(x0.device))
        terms = rows * torch.log((rows * process.num_states).clamp_min(1e-300))
        return torch.where(rows > 0, terms, torch.zeros_like(terms)).sum((-1, -2))
    if model.config.parameterization != "subs":
        return torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    all_masked = torch.full_like(x0, model.config.mask_token_id)
    sigma = torch.full((x0.shape[0],), float(sigma_end), device=x0.device)
    log_probs = model(input_ids=all_masked, total_noise=sigma).logits.double()
    nll = -log_probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1).sum(-1)
    return torch.exp(-sigma_end).to(x0.device) * nll


def summarize(per_sequence: Tensor, tokens_per_sequence: int, *, calls: int, method: str, num_points: int,
              form: str, note: str = "") -> LikelihoodResult:
    """Per-token mean, perplexity and 95% intervals from per-sequence negative ELBOs ``[n]``."""
    values = per_sequence.double().cpu() / tokens_per_sequence
    n = values.numel()
    mean = float(values.mean())
    half = 1.96 * float(values.std()) / math.sqrt(n) if n > 1 else float("inf")
    low, high = mean - half, mean + half
    cap = lambda v: math.exp(min(v, 700.0))
    return LikelihoodResult(nats_per_token=mean, nats_ci95=(low, high), perplexity=cap(mean),
                            perplexity_ci95=(cap(low), cap(high)), num_sequences=n, num_tokens=n * tokens_per_sequence,
                            network_calls=calls, method=method, num_points=num_points, form=form, note=note)


def evaluate_likelihood(model: Any, blocks: Tensor, *, method: str = "quadrature", num_points: int = 8,
                        batch_size: int = 16, seed: int = 0, progress: bool | None = None,
                        discrete_time: int | None = None) -> LikelihoodResult:
    """Negative ELBO per token and perplexity bound of ``blocks [n, L]`` (held-out, equal length), batched.

    ``progress``: a bar over the batches (None: when stderr is a terminal); ``discrete_time=T``: D3PM's T-step
    bound instead of the continuous one (absorbing subs models)."""
    _check(method, num_points)
    _check_discrete_time(discrete_time)
    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise ValueError(f"blocks must be a non-empty [n, L] tensor, got shape {tuple(blocks.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    values, calls = [], 0
    for start in tqdm(range(0, len(blocks), batch_size), disable=None if progress is None else not progress,
                      desc=f"elbo ({method}, {num_points})" if discrete_time is None else f"L_vb (T = {discrete_time})"):
        nelbo, used = sequence_nelbo(model, blocks[start : start + batch_size], method=method, num_points=num_points,
                                     generator=generator, discrete_time=discrete_time)
        values.append(nelbo.cpu())
        calls += used
    model.train(was_training)
    config = model.config
    spec = DiffusionSpec.from_config(config)
    if discrete_time is not None:
        return summarize(torch.cat(values), blocks.shape[1], calls=calls, method="every step", num_points=discrete_time,
                         form="discrete time (D3PM L_vb)")
    form = "block lambda" if spec.block_size is not None else ("lambda" if spec.time_free_masked else "t")
    note = ("absorbing score model: the eps tail at t = 1 is not included" if form == "t"
            and config.process == "absorbing" and config.parameterization == "score" else "")
    return summarize(torch.cat(values), blocks.shape[1], calls=calls, method=method, num_points=num_points,
                     form=form, note=note)


@torch.no_grad()
def evaluate_causal_likelihood(model: Any, blocks: Tensor, *, batch_size: int = 16) -> LikelihoodResult:
    """Exact per-token NLL and perplexity of a causal LM on ``blocks [n, L]``, with the same 95% interval.

    Positions 1..L-1 are scored; the first token of each block is context only (noted in the result).
    """
    from .autoregressive import causal_nll

    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be a non-empty [n, L >= 2] tensor, got shape {tuple(blocks.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
    device = next(model.parameters()).device
    values = [causal_nll(model, blocks[i : i + batch_size].to(device))[0].cpu() for i in range(0, len(blocks), batch_size)]
    return summarize(torch.cat(values), blocks.shape[1] - 1, calls=len(values), method="exact", num_points=1,
                     form="autoregressive", note="the first token of each block is context, not scored")


@torch.no_grad()
def any_order_nll(model: Any, x0: Tensor, *, num_orders: int = 1, generator: torch.Generator | None = None,
                  progress: Any = None) -> tuple[Tensor, int]:
    """Any-order autoregressive NLL ``[B]`` (nats, float64) of a time-free masked model, and the network calls.

    For a random order sigma of the positions: start from all MASK, and for k = 1..L add
    ``-log p_theta(x0^{sigma(k)} | x0^{sigma(<k)})``, then reveal that token.  Averaged over ``num_orders``
    orders (each row draws its own).  The expectation over orders equals the lambda-form ELBO (RADD); for
    exact conditionals every single order gives the exact NLL (the chain rule).  Costs ``L`` calls per order;
    ``progress`` (a tqdm bar, say) is advanced by one per call.
    """
    steps, calls = any_order_steps(model, x0, num_orders=num_orders, generator=generator, progress=progress)
    return steps.sum(-1), calls


@torch.no_grad()
def any_order_steps(model: Any, x0: Tensor, *, num_orders: int = 1, generator: torch.Generator | None = None,
                    progress: Any = None) -> tuple[Tensor, int]:
    """The terms of :func:`any_order_nll` by step: ``[B, L]``, entry k the NLL (nats) of the token revealed when
    k tokens are known, averaged over orders; and the network calls.  Its mean over rows is ARDM's per-step loss
    curve ``L_k`` (Hoogeboom et al. 2022), which :mod:`samplers.ardm` plans a call budget with."""
    config = model.config
    if not DiffusionSpec.from_config(config).time_free_masked:
        raise ValueError("any_order_nll needs a time-free absorbing subs model, got process="
                         f"{config.process!r}, parameterization={config.parameterization!r}, "
                         f"time_conditioning={getattr(config, 'time_conditioning', False)!r}")
    if isinstance(num_orders, bool) or not isinstance(num_orders, int) or num_orders < 1:
        raise ValueError(f"num_orders must be a positive int, got num_orders={num_orders!r}")
    device = next(model.parameters()).device
    x0 = x0.to(device)
    rows, length = x0.shape
    total = torch.zeros((rows, length), dtype=torch.float64, device=device)
    arange = torch.arange(rows, device=device)
    narrow = accepts_score_mask(model)
    calls = 0
    for _ in range(num_orders):
        order = torch.argsort(torch.rand((rows, length), generator=generator), dim=-1).to(device)
        x = torch.full_like(x0, config.mask_token_id)
        for k in range(length):
            position = order[:, k]
            if narrow:  # the output head at the one position of each row that is scored: [B, V], row b's first
                scored = torch.zeros_like(x0, dtype=torch.bool)
                scored[arange, position] = True
                log_probs = model(input_ids=x, score_mask=scored).logits
            else:
                log_probs = model(input_ids=x).logits[arange, position]
            calls += 1
            if progress is not None:
                progress.update(1)
            total[:, k] -= log_probs[arange, x0[arange, position]].double()
            x[arange, position] = x0[arange, position]
    return total / num_orders, calls
