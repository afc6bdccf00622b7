"""Noise schedules for continuous-time discrete diffusion.

A schedule maps diffusion time ``t in [0, 1]`` to the *total noise* ``sigma_bar(t)``
(:meth:`Schedule.total_noise`, the integrated rate, ``sigma_bar(0) ~ 0``) and to its *rate*
``sigma(t) = d sigma_bar / dt`` (:meth:`Schedule.rate`).  A token of an absorbing process is still clean at
time ``t`` with probability ``alpha_t = exp(-sigma_bar(t))``.

Every method works elementwise on tensors of any shape and keeps the dtype of ``t``,
so float64 references can be computed with the same objects.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SCHEDULES",
    "CosineSchedule",
    "GeometricSchedule",
    "LINEAR_MASKING",
    "LinearSchedule",
    "LogLinearSchedule",
    "Schedule",
    "get_schedule",
]


def _as_tensor(t: Tensor | float) -> Tensor:
    if isinstance(t, Tensor):
        return t if t.is_floating_point() else t.double()
    return torch.as_tensor(t, dtype=torch.float64)


class Schedule(ABC):
    """A noise schedule ``t -> (sigma_bar(t), sigma(t))``.

    Subclasses implement :meth:`total_noise` and :meth:`rate`; the derived
    quantities (``alpha_t``, the masking probability, the ELBO weight) are shared.
    """

    name: str

    @abstractmethod
    def total_noise(self, t: Tensor | float) -> Tensor:
        """sigma_bar(t), the integrated noise rate, elementwise."""

    @abstractmethod
    def rate(self, t: Tensor | float) -> Tensor:
        """sigma(t) = d sigma_bar / dt, elementwise."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this schedule through :func:`get_schedule`."""

    def __call__(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Return ``(sigma_bar(t), sigma(t))``."""
        return self.total_noise(t), self.rate(t)

    def rate_noise(self, t: Tensor | float) -> Tensor:
        """Deprecated name of :meth:`rate`."""
        warnings.warn("Schedule.rate_noise is deprecated; use Schedule.rate", DeprecationWarning, stacklevel=2)
        return self.rate(t)

    def alpha(self, t: Tensor | float) -> Tensor:
        """alpha_t = exp(-sigma_bar(t)): probability that an absorbing token is still clean."""
        return torch.exp(-self.total_noise(t))

    def mask_probability(self, t: Tensor | float) -> Tensor:
        """1 - alpha_t = -expm1(-sigma_bar(t)), computed without cancellation."""
        return -torch.expm1(-self.total_noise(t))

    def elbo_weight(self, t: Tensor | float) -> Tensor:
        """Masked-diffusion ELBO weight ``sigma(t) / (exp(sigma_bar(t)) - 1) = -alpha'_t / (1 - alpha_t)``.

        For the log-linear schedule this is exactly ``1 / t``.
        """
        return self.rate(t) / torch.expm1(self.total_noise(t))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.to_dict().items())))


class LogLinearSchedule(Schedule):
    """Log-linear schedule (SEDD, MDLM): the masking probability grows linearly in t.

    sigma_bar(t) = -log(1 - (1 - eps) t),  sigma(t) = (1 - eps) / (1 - (1 - eps) t),
    so 1 - alpha_t = (1 - eps) t and the ELBO weight sigma / (e^sigma_bar - 1) = 1 / t.

    Args:
        eps: the fraction of tokens still clean at t = 1, in [0, 1). ``eps = 0`` makes
            sigma_bar(1) infinite (everything masked), which is fine for quadrature on (0, 1).
    """

    name = "loglinear"

    def __init__(self, eps: float = 1e-3) -> None:
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got eps={eps!r}")
        self.eps = float(eps)

    def total_noise(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return -torch.log1p(-(1.0 - self.eps) * t)

    def rate(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return (1.0 - self.eps) / (1.0 - (1.0 - self.eps) * t)

    def mask_probability(self, t: Tensor | float) -> Tensor:
        return (1.0 - self.eps) * _as_tensor(t)

    def elbo_weight(self, t: Tensor | float) -> Tensor:
        return 1.0 / _as_tensor(t)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "eps": self.eps}


class GeometricSchedule(Schedule):
    """Geometric schedule (SEDD, used with the uniform process).

    sigma_bar(t) = sigma_min^(1 - t) sigma_max^t,  sigma(t) = sigma_bar(t) log(sigma_max / sigma_min).
    """

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0) -> None:
        if not sigma_min > 0:
            raise ValueError(f"sigma_min must be > 0, got sigma_min={sigma_min!r}")
        if not sigma_max > sigma_min:
            raise ValueError(
                f"sigma_max must be > sigma_min, got sigma_max={sigma_max!r}, sigma_min={sigma_min!r}"
            )
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def total_noise(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return self.sigma_min ** (1.0 - t) * self.sigma_max**t

    def rate(self, t: Tensor | float) -> Tensor:
        return self.total_noise(t) * math.log(self.sigma_max / self.sigma_min)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class CosineSchedule(Schedule):
    """Cosine schedule (MDLM): alpha_t = eps + (1 - eps) cos(pi t / 2).

    sigma_bar(t) = -log(eps + (1 - eps) cos(pi t / 2)),
    sigma(t) = (pi / 2) (1 - eps) sin(pi t / 2) / (eps + (1 - eps) cos(pi t / 2)).
    """

    name = "cosine"

    def __init__(self, eps: float = 1e-3) -> None:
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got eps={eps!r}")
        self.eps = float(eps)

    def alpha(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return self.eps + (1.0 - self.eps) * torch.cos(0.5 * math.pi * t)

    def total_noise(self, t: Tensor | float) -> Tensor:
        return -torch.log(self.alpha(t))

    def rate(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return 0.5 * math.pi * (1.0 - self.eps) * torch.sin(0.5 * math.pi * t) / self.alpha(t)

    def mask_probability(self, t: Tensor | float) -> Tensor:
        return 1.0 - self.alpha(t)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "eps": self.eps}


class LinearSchedule(Schedule):
    """Linear total noise (MDLM): sigma_bar(t) = sigma_min + (sigma_max - sigma_min) t, constant rate."""

    name = "linear"

    def __init__(self, sigma_min: float = 0.0, sigma_max: float = 10.0) -> None:
        if not sigma_min >= 0:
            raise ValueError(f"sigma_min must be >= 0, got sigma_min={sigma_min!r}")
        if not sigma_max > sigma_min:
            raise ValueError(
                f"sigma_max must be > sigma_min, got sigma_max={sigma_max!r}, sigma_min={sigma_min!r}"
            )
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def total_noise(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return self.sigma_min + (self.sigma_max - self.sigma_min) * t

    def rate(self, t: Tensor | float) -> Tensor:
        t = _as_tensor(t)
        return torch.full_like(t, self.sigma_max - self.sigma_min)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


# Time read as the masking probability itself: 1 - alpha_t = t, sigma_bar(t) = -log(1 - t), ELBO weight 1/t.
# RADD's lambda form of the masked ELBO, the RL likelihood estimators and masked SFT all use it.
LINEAR_MASKING = LogLinearSchedule(eps=0.0)

SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls for cls in (LogLinearSchedule, GeometricSchedule, CosineSchedule, LinearSchedule)
}


def get_schedule(name: str, **kwargs: Any) -> Schedule:
    """Build a schedule by name: ``loglinear``, ``geometric``, ``cosine`` or ``linear``.

    Example:
        >>> get_schedule("loglinear", eps=1e-3).mask_probability(0.5).item()
        0.4995
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule name={name!r}; valid names: {sorted(SCHEDULES)}")
    return SCHEDULES[name](**kwargs)
