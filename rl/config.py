"""``GRPOConfig``: every knob of a GRPO run, validated once, never changed after construction."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from diffusion.estimators import ELBO_ESTIMATORS, ESTIMATORS
from .run_settings import RunSettings, _help
from .tree import TREE_SAMPLERS

__all__ = ["GRPOConfig"]


@dataclass(frozen=True)
class GRPOConfig(RunSettings):
    """A GRPO fine-tuning run of a masked diffusion LM (d1 / DiffuCoder / GDPO family)."""

    output_dir: str = _help("where checkpoints, metrics.jsonl and the final model go", default="runs/rl")
    max_steps: int = _help("rollout steps (each: one batch of rollouts, then inner_steps optimizer steps)",
                           default=100)
    prompts_per_step: int = _help("prompts per rollout step", default=8)
    group_size: int = _help("completions per prompt (G)", default=8)
    inner_steps: int = _help("optimizer steps per rollout batch (mu); masks are re-drawn for each", default=1)
    completion_length: int = _help("tokens per completion", default=32)
    estimator: str = _help("likelihood estimator", choices=sorted(ESTIMATORS), default="coupled")
    p_mask_prompt: float = _help("one_step: probability of masking each prompt token", default=0.15)
    coupled_t_min: float = _help("coupled: lower end of t ~ U(t_min, t_max)", default=0.2)
    coupled_t_max: float = _help("coupled: upper end of t ~ U(t_min, t_max)", default=0.8)
    coupled_full_mask: bool = _help("coupled: add the fully masked d1 view and average, as DiffuCoder's code does "
                                    "(3 calls instead of 2)", default=False)
    num_points: int = _help("quadrature / monte_carlo: time points (network calls) per estimate", default=2)
    level: str = _help("importance ratio per 'token' or per 'sequence' (length-normalised, GDPO/GSPO); 'auto': "
                       "sequence for the ELBO estimators (quadrature, monte_carlo, stratified, one_time), token otherwise",
                   choices=["auto", "token", "sequence"], default="auto")
    objective: str = _help("policy loss: 'grpo' (the clipped ratio surrogate) or 'wd1' (ratio-free: each group's "
                           "likelihoods weighted by softmax(A / wd1_temperature) up and softmax(-A / wd1_temperature) "
                           "down) or 'spg' (ratio-free: the ELBO raised for A >= 0, a mixture of EUBO and ELBO "
                           "lowered for A < 0; estimator 'coupled' or 'one_step')",
                           choices=["grpo", "wd1", "spg"], default="grpo")
    wd1_temperature: float = _help("wd1: temperature tau of its softmax weights", default=1.0)
    spg_beta: float = _help("spg: exponent beta >= 1 of the upper bound (1/beta) log E[w(t) p^beta]", default=1.0)
    spg_mixture: float = _help("spg: weight omega of the upper bound in omega * EUBO + (1 - omega) * ELBO for "
                               "negative advantages", default=0.5)
    clip_eps_low: float = _help("clip range below 1: rho >= 1 - clip_eps_low", default=0.2)
    clip_eps_high: float = _help("clip range above 1: rho <= 1 + clip_eps_high", default=0.2)
    beta: float = _help("weight of the k3 KL to the frozen reference model (0: no reference model)", default=0.0)
    advantage_scale: str = _help("'group' (divide by the group std, GRPO) or 'none' (Dr. GRPO, d1, GDPO)",
                                 choices=["group", "none"], default="group")
    sampler: str = _help("rollout sampler (any name from samplers.SAMPLERS)", default="remask")
    rollout: str = _help("'flat' (group_size independent completions per prompt) or 'tree' (tree_branches ** "
                         "tree_depth leaves sharing their beginnings: the steps cut into tree_depth segments, every "
                         "canvas copied tree_branches times after each; the same batched calls)",
                         choices=["flat", "tree"], default="flat")
    tree_branches: int = _help("tree: children of every node (K)", default=2)
    tree_depth: int = _help("tree: segments, i.e. branching levels (D); group_size must be K ** D", default=3)
    tree_advantages: str = _help("tree: 'sibling' (a token committed in segment d is judged against the siblings of "
                                 "its depth-d node, per token) or 'group' (the leaf's flat group advantage)",
                                 choices=["sibling", "group"], default="sibling")
    sampling_steps: int = _help("rollout sampling steps", default=32)
    sampler_options: dict | None = _help("JSON object of extra sampler options, e.g. {\"block_length\": 8} (None: "
                                         "the sampler's defaults)", default=None)
    temperature: float = _help("rollout sampling temperature", default=1.0)
    reward_timeout: float | None = _help("seconds a reward function may take per call (None: no limit)",
                                         default=60.0)
    variance_draws: int = _help("extra likelihood draws per logged step to measure the estimator's variance "
                                "(0 disables)", default=4)
    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("prompts_per_step", "inner_steps", "completion_length", "sampling_steps", "num_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        for name in ("variance_draws",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {name}={value!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"group_size must be an int >= 2 (advantages compare completions), "
                             f"got group_size={self.group_size!r}")
        if self.variance_draws == 1:
            raise ValueError("variance_draws must be 0 or >= 2 (a variance needs two draws), got variance_draws=1")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator={self.estimator!r}; valid: {sorted(ESTIMATORS)}")
        choices = {"level": ("auto", "token", "sequence"), "advantage_scale": ("group", "none"),
                   "objective": ("grpo", "wd1", "spg")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {name}={getattr(self, name)!r}")
        positive = {"wd1_temperature": self.wd1_temperature}
        non_negative = {"beta": self.beta, "clip_eps_low": self.clip_eps_low, "clip_eps_high": self.clip_eps_high, "temperature": self.temperature}
        for name, value in positive.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {name}={value!r}")
        for name, value in non_negative.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}")
        if self.rollout not in ("flat", "tree") or self.tree_advantages not in ("sibling", "group"):
            raise ValueError(f"rollout must be 'flat' or 'tree' and tree_advantages 'sibling' or 'group', got "
                             f"rollout={self.rollout!r}, tree_advantages={self.tree_advantages!r}")
        if self.rollout == "tree":
            self._check_tree()
        if self.objective != "grpo" and self.beta > 0:
            raise ValueError(f"objective={self.objective!r} has no KL term to a reference model: beta must be 0, "
                             f"got beta={self.beta}")
        if self.objective == "spg" and self.estimator not in ("coupled", "one_step"):
            raise ValueError(f"objective='spg' needs every completion token masked in some view (its upper bound is "
                             f"log 0 otherwise): estimator must be 'coupled' or 'one_step', got "
                             f"estimator={self.estimator!r}")
        if not 1 <= self.spg_beta:
            raise ValueError(f"spg_beta must be >= 1 (the bound needs it), got spg_beta={self.spg_beta}")
        if not 0 <= self.spg_mixture <= 1:
            raise ValueError(f"spg_mixture must be in [0, 1], got spg_mixture={self.spg_mixture}")
        if self.clip_eps_low >= 1:
            raise ValueError(f"clip_eps_low must be < 1 (the ratio is positive), got clip_eps_low={self.clip_eps_low}")
        if not 0 <= self.p_mask_prompt < 1:
            raise ValueError(f"p_mask_prompt must be in [0, 1), got p_mask_prompt={self.p_mask_prompt}")
        if not 0 < self.coupled_t_min <= self.coupled_t_max < 1:
            raise ValueError(f"need 0 < coupled_t_min <= coupled_t_max < 1, got coupled_t_min={self.coupled_t_min}, "
                             f"coupled_t_max={self.coupled_t_max}")
        if self.reward_timeout is not None and not self.reward_timeout > 0:
            raise ValueError(f"reward_timeout must be > 0 or None, got reward_timeout={self.reward_timeout!r}")
        if self.sampler_options is not None and not isinstance(self.sampler_options, dict):
            raise ValueError(f"sampler_options must be a dict, got sampler_options={self.sampler_options!r}")

    def _check_tree(self) -> None:
        for name in ("tree_branches", "tree_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "tree_branches" else 1):
                raise ValueError(f"{name} must be an int >= {2 if name == 'tree_branches' else 1}, got {name}={value!r}")
        if self.group_size != self.tree_branches ** self.tree_depth:
            raise ValueError(f"a tree has tree_branches ** tree_depth = {self.tree_branches ** self.tree_depth} leaves "
                             f"per prompt: group_size must equal it, got group_size={self.group_size}")
        if self.tree_depth > self.sampling_steps:
            raise ValueError(f"tree_depth={self.tree_depth} exceeds sampling_steps={self.sampling_steps}: every "
                             "segment needs a step")
        if self.sampler not in TREE_SAMPLERS:
            raise ValueError(f"rollout='tree' stops the sampler between segments, which {list(TREE_SAMPLERS)} "
                             f"support; got sampler={self.sampler!r}")
        if self.tree_advantages == "sibling" and (self.objective != "grpo" or self.resolved_level != "token"):
            raise ValueError(f"sibling advantages are per token: they need objective='grpo' and level 'token', got "
                             f"objective={self.objective!r}, level resolved to {self.resolved_level!r} (pass "
                             "level='token' or tree_advantages='group')")

    @property
    def resolved_level(self) -> str:
        """The ratio level used: ELBO estimates are only meaningful per sequence (their per-token terms are
        weighted, masked contributions, not per-token likelihoods)."""
        if self.level != "auto":
            return self.level
        return "sequence" if self.estimator in ELBO_ESTIMATORS else "token"

    def estimator_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`diffusion.estimators.get_estimator` for the chosen estimator."""
        return {"one_step": {"p_mask_prompt": self.p_mask_prompt},
                "coupled": {"t_min": self.coupled_t_min, "t_max": self.coupled_t_max,
                            "with_full_mask": self.coupled_full_mask},
                "quadrature": {"num_points": self.num_points},
                "monte_carlo": {"num_points": self.num_points},
                "stratified": {"num_points": self.num_points},
                "one_time": {"num_points": self.num_points},
                "sepo": {}}[self.estimator]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)
