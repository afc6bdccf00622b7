"""Reward functions: plain callables ``(prompts, completions, **kwargs) -> list[float | None]``.

``kwargs`` carries the prompt records' other fields (e.g. ``answer``), one value per completion.  How the
trainer treats what a function returns (as TRL does):

- ``None`` or NaN for a completion: that function is left out of the weighted sum for it, with a warning;
  if every function leaves it out, the completion gets no advantage (it is excluded from the loss).
- the wrong number of values, a value that is not a number, an exception, or a call that runs past
  ``timeout`` seconds: a :class:`RewardError` naming the function.
- a weighted reward beyond ``±MAX_REWARD`` (1e100): a :class:`RewardError` naming the function, because the group
  statistics square the rewards and would overflow float64 into NaN advantages.
"""

from __future__ import annotations

import math
import numbers
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["MAX_REWARD", "RewardError", "RewardFunction", "check_weights", "compute_rewards", "entropy_reward",
           "exact_match", "format_reward", "length_penalty", "final_answer", "model_fields"]

RewardFunction = Callable[..., Sequence[Any]]
MAX_REWARD = 1e100  # |weight * reward| at most this: squared deviations of a group stay finite in float64


class RewardError(ValueError):
    """A reward function failed or broke the contract above."""


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _call_with_timeout(fn: RewardFunction, timeout: float | None, args: tuple, kwargs: dict) -> Any:
    if timeout is None:
        return fn(*args, **kwargs)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001  (re-raised in the caller's thread)
            outcome["error"] = err

    # A daemon thread: a call that never returns is abandoned and cannot keep the process alive at exit.
    worker = threading.Thread(target=run, name=f"reward-{_name(fn)}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RewardError(f"reward function {_name(fn)!r} did not return within timeout={timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def check_weights(functions: Sequence[RewardFunction], weights: Sequence[float]) -> None:
    """ValueError unless there is one finite weight of size at most :data:`MAX_REWARD` per function."""
    if len(functions) != len(weights):
        raise ValueError(f"need one weight per reward function: {len(functions)} functions, {len(weights)} weights")
    for fn, weight in zip(functions, weights):
        if not math.isfinite(weight) or abs(weight) > MAX_REWARD:
            raise ValueError(f"the weight of reward function {_name(fn)!r} must be finite and at most {MAX_REWARD:g} "
                             f"in size, got {weight!r}")


def compute_rewards(functions: Sequence[RewardFunction], weights: Sequence[float], prompts: list[str],
                    completions: list[str], *, timeout: float | None = None, **kwargs: list[Any]) -> tuple[Tensor, Tensor]:
    """``(total [N], per_function [N, F])``; total is NaN where every function left the completion out."""
    check_weights(functions, weights)
    n = len(completions)
    table = torch.full((n, len(functions)), float("nan"), dtype=torch.float64)
    for j, fn in enumerate(functions):
        try:
            values = _call_with_timeout(fn, timeout, (prompts, completions), kwargs)
        except RewardError:
            raise
        except Exception as err:  # noqa: BLE001  (the user's code: name it and stop)
            raise RewardError(f"reward function {_name(fn)!r} raised {type(err).__name__}: {err}") from err
        if values is None or not hasattr(values, "__len__") or len(values) != n:
            got = "None" if values is None else (len(values) if hasattr(values, "__len__") else type(values).__name__)
            raise RewardError(f"reward function {_name(fn)!r} returned {got} values for {n} completions")
        missing = 0
        for i, value in enumerate(values):
            if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
                value = value.item()  # numpy scalars, 0-d tensors
            if value is None or (isinstance(value, numbers.Real) and math.isnan(value)):
                missing += 1
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isinf(value):
                raise RewardError(f"reward function {_name(fn)!r} returned {value!r} for completion {i}: "
                                  "rewards are finite numbers or None")
            if abs(float(value) * weights[j]) > MAX_REWARD:
                raise RewardError(f"reward function {_name(fn)!r} returned {value!r} for completion {i} (weight "
                                  f"{weights[j]!r}): weighted rewards must be at most {MAX_REWARD:g} in size, or the "
                                  "group statistics overflow")
            table[i, j] = float(value)
        if missing:
            warnings.warn(f"reward function {_name(fn)!r} returned None/NaN for {missing} of {n} completions; "
                          "they are left out of its term", stacklevel=2)
    w = torch.tensor(list(weights), dtype=torch.float64)
    present = ~torch.isnan(table)
    total = torch.where(present, table * w, 0.0).sum(-1)
    total[~present.any(-1)] = float("nan")
    if bool(torch.isnan(total).any()):
        warnings.warn(f"{int(torch.isnan(total).sum())} completions have no reward at all and are excluded",
                      stacklevel=2)
    return total, table


def model_fields(functions: Sequence[RewardFunction]) -> set[str]:
    """The fields the trainer must compute from the policy for these functions (their ``model_fields`` attribute:
    ``"completion_entropy"``, :func:`rl.confidence.completion_entropy`)."""
    wanted = set()
    for fn in functions:
        wanted |= set(getattr(fn, "model_fields", ()))
    unknown = wanted - {"completion_entropy"}
    if unknown:
        raise RewardError(f"reward functions ask for unknown model fields {sorted(unknown)}; known: "
                          "['completion_entropy']")
    return wanted


def entropy_reward(prompts: list[str], completions: list[str], completion_entropy: list[float],
                   **kwargs: Any) -> list[float]:
    """RENT (Prabhudesai et al. 2025): ``-H(y)``, the negative mean entropy of the policy's own predictions over the
    completion, which the trainer computes because this function lists ``completion_entropy`` in its
    ``model_fields`` (:func:`rl.confidence.completion_entropy`).  Unsupervised: alone it rewards confidence, mixed
    with a task reward it sharpens the policy where the task says little.

    >>> entropy_reward(["q"], ["a"], completion_entropy=[0.25])
    [-0.25]
    """
    return [-float(h) for h in completion_entropy]


entropy_reward.model_fields = ("completion_entropy",)  # type: ignore[attr-defined]


def final_answer(text: str) -> str | None:
    """The text after the last ``####`` or ``answer:`` marker, else the last whitespace-separated word.

    >>> final_answer("so 3 + 4 = 7 #### 7")
    '7'
    >>> final_answer("Answer: 12")
    '12'
    >>> final_answer("   ") is None
    True
    """
    for marker in ("####", "answer:"):
        index = text.lower().rfind(marker)
        if index >= 0:
            tail = text[index + len(marker):].strip()
            return tail or None
    words = text.split()
    return words[-1] if words else None


def exact_match(prompts: list[str], completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the completion's final answer equals the reference ``answer``, else 0.0.

    >>> exact_match(["2+2="], ["the sum is #### 4"], answer=["4"])
    [1.0]
    >>> exact_match(["2+2=", "1+1="], ["5", ""], answer=["4", "2"])
    [0.0, 0.0]
    """
    return [float(final_answer(c) == str(a).strip()) for c, a in zip(completions, answer)]


def format_reward(pattern: str, reward: float = 1.0) -> RewardFunction:
    """A reward function giving ``reward`` to completions that fully match the regular expression ``pattern``.

    >>> digits = format_reward(r"\\d{3}")
    >>> digits(["q", "q"], ["123", "12a"])
    [1.0, 0.0]
    >>> digits.__name__
    'format_reward(\\\\d{3})'
    """
    compiled = re.compile(pattern)

    def check(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        return [reward if compiled.fullmatch(c.strip()) else 0.0 for c in completions]

    check.__name__ = f"format_reward({pattern})"
    return check


def length_penalty(max_chars: int, per_char: float = 0.01) -> RewardFunction:
    """A reward function: ``-per_char`` for each character beyond ``max_chars`` (0 otherwise).

    >>> penalty = length_penalty(4, per_char=0.5)
    >>> penalty(["q", "q"], ["abc", "abcdefg"])
    [0.0, -1.5]
    """
    if max_chars < 0 or per_char < 0:
        raise ValueError(f"max_chars and per_char must be >= 0, got max_chars={max_chars}, per_char={per_char}")

    def penalty(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        return [per_char * min(0, max_chars - len(c)) for c in completions]

    penalty.__name__ = f"length_penalty({max_chars})"
    return penalty
