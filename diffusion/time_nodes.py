"""Where integrals over diffusion time are evaluated: the Monte Carlo, stratified and Gauss-Legendre rules.

Every bound and estimator in the toolkit is an integral over time (or over the masking probability
lambda) of a per-sequence integrand, ``int_0^1 f(t) dt ~ sum_n w_n f(t_n)``, with the nodes from one rule:

- ``monte_carlo``: ``t_n ~ U(0, 1)`` independently, ``w_n = 1/N`` (unbiased);
- ``stratified``: ``t_n = (n + u_n) / N`` with ``u_n ~ U(0, 1)``, one node in each stratum ``[n/N, (n+1)/N)``,
  ``w_n = 1/N`` (unbiased, lower variance: MDLM's low-discrepancy sampler);
- ``quadrature``: the Gauss-Legendre nodes and weights mapped to [0, 1] (deterministic; exact for
  polynomials of degree ``<= 2N - 1``; GDPO's semi-deterministic Monte Carlo when one mask is drawn per node).

``t_min`` clamps the random rules' nodes from below, which keeps ``1/t`` weights finite (a bias of order
``t_min``).  :func:`sample_t` draws training times ``t ~ U(t_min, 1)`` with the same two random rules.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["TIME_RULES", "gauss_legendre_01", "sample_t", "time_nodes"]

TIME_RULES = ("monte_carlo", "stratified", "quadrature")


def gauss_legendre_01(n: int) -> tuple[Tensor, Tensor]:
    """Gauss-Legendre nodes and weights on [0, 1]: ``t = (x + 1) / 2``, ``w = w_x / 2`` (sum 1), float64 ``[n]``."""
    x, w = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)


def _check(rule: str, num_points: int, rows: int, t_min: float) -> None:
    if rule not in TIME_RULES:
        raise ValueError(f"rule must be one of {TIME_RULES}, got rule={rule!r}")
    for name, value in (("num_points", num_points), ("rows", rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min must be in [0, 1), got t_min={t_min!r}")


def _unit_draws(rule: str, num_points: int, rows: int, generator: torch.Generator | None,
                device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """``[num_points, rows]`` uniforms on [0, 1): independent, or stratified along the first dimension."""
    u = torch.rand((num_points, rows), generator=generator, device=device, dtype=dtype)
    if rule == "stratified":
        u = (u + torch.arange(num_points, device=device, dtype=dtype)[:, None]) / num_points
    return u


def time_nodes(rule: str, num_points: int, rows: int, *, generator: torch.Generator | None = None,
               t_min: float = 0.0) -> tuple[Tensor, Tensor]:
    """Nodes and weights ``(t [N, rows], w [N, rows])``, float64 on the CPU, of ``rule`` (see the module docstring).

    Every row gets its own random nodes (the quadrature nodes are the same for all rows); weights sum to 1
    over the N nodes of a row.
    """
    _check(rule, num_points, rows, t_min)
    if rule == "quadrature":
        t, w = gauss_legendre_01(num_points)
        return t[:, None].expand(-1, rows).contiguous(), w[:, None].expand(-1, rows).contiguous()
    t = _unit_draws(rule, num_points, rows, generator, "cpu", torch.float64).clamp_min(t_min)
    return t, torch.full_like(t, 1.0 / num_points)


def sample_t(batch_size: int, *, t_min: float = 1e-3, antithetic: bool = False,
             generator: torch.Generator | None = None, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> Tensor:
    """Training times ``t = t_min + (1 - t_min) u`` for a batch, ``Tensor[batch_size]``.

    ``u`` is uniform, or stratified across the batch with ``antithetic=True`` (exactly one row in each
    stratum ``[i/B, (i+1)/B)``), which lowers the variance of the batch-mean loss without biasing it.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got batch_size={batch_size!r}")
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min must be in [0, 1), got t_min={t_min!r}")
    rule = "stratified" if antithetic else "monte_carlo"
    u = _unit_draws(rule, batch_size, 1, generator, device, dtype).reshape(batch_size)
    return t_min + (1.0 - t_min) * u
