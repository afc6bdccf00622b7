"""rl: GRPO-family fine-tuning of masked diffusion LMs with pluggable likelihood estimators.

    from rl import GRPOConfig, GRPOTrainer
    trainer = GRPOTrainer(model, tokenizer, GRPOConfig(...), [reward_fn, ...], records)
    trainer.train()
"""

from .config import GRPOConfig
from .estimators import ESTIMATORS, get_estimator
from .objective import group_advantages, grpo_loss, k3_kl
from .rewards import (
    RewardError,
    compute_rewards,
    exact_match,
    format_reward,
    length_penalty,
)
from .trainer import GRPOTrainer

__all__ = [
    "GRPOConfig", "GRPOTrainer", "ESTIMATORS", "get_estimator", "group_advantages", "grpo_loss", "k3_kl",
    "RewardError", "compute_rewards", "exact_match", "format_reward", "length_penalty",
]
