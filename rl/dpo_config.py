"""``DPOConfig``: every knob of a DPO run on preference pairs, validated once, never changed after construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffusion.data.instructions import FORMATS

from diffusion.estimators import ELBO_ESTIMATORS
from .run_settings import RunSettings, _help

__all__ = ["DPOConfig"]


@dataclass(frozen=True)
class DPOConfig(RunSettings):
    """DPO of a masked diffusion LM with ELBO log-likelihoods and VRPO's variance reduction (LLaDA 1.5).

    VRPO's three levers: a budget of ``num_points`` network calls per ELBO estimate; that budget spent on times
    (``estimator="monte_carlo"``, one mask per time; ``"one_time"`` spends it on masks at one time instead); and
    ``antithetic`` sampling, the policy and the reference scored under the same times and masks.
    """

    output_dir: str = _help("where checkpoints, metrics.jsonl and the final model go", default="runs/dpo")
    max_steps: int = _help("optimizer steps", default=100)
    pairs_per_step: int = _help("preference pairs per optimizer step", default=8)
    completion_length: int = _help("answer tokens: each answer is right-padded with EOS to it (a longer one is "
                                   "refused)", default=32)
    beta: float = _help("DPO's beta: the implicit reward is beta * log(pi_theta / pi_ref)", default=0.1)
    estimator: str = _help("ELBO estimator: 'monte_carlo' (VRPO: the budget spent on times, one mask each), "
                           "'stratified' or 'quadrature' (the same, times spread over [0, 1]), 'one_time' (the budget "
                           "spent on masks at one shared time)", choices=list(ELBO_ESTIMATORS), default="monte_carlo")
    num_points: int = _help("network calls per ELBO estimate (VRPO's budget n)", default=4)
    antithetic: bool = _help("score the policy and the reference under the same times and masks (VRPO); False draws "
                             "the reference's independently", default=True)
    format: str = _help("how prompt and answer are joined: 'auto' (the chat template if the tokenizer has one), "
                        "'chat' or 'plain' (prompt ids, answer ids, EOS)", choices=list(FORMATS), default="auto")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("pairs_per_step", "completion_length", "num_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got beta={self.beta!r}")
        if self.estimator not in ELBO_ESTIMATORS:
            raise ValueError(f"estimator must be one of {list(ELBO_ESTIMATORS)} (DPO compares ELBOs), got "
                             f"estimator={self.estimator!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {list(FORMATS)}, got format={self.format!r}")
