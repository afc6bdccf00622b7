"""rl: reinforcement learning (GRPO, wd1, SPG) and preference optimisation (DPO with VRPO) of masked diffusion LMs,
with pluggable likelihood estimators.

    from rl import GRPOConfig, GRPOTrainer
    trainer = GRPOTrainer(model, tokenizer, GRPOConfig(...), [reward_fn, ...], records)
    trainer.train()

    from rl import DPOConfig, DPOTrainer
    DPOTrainer(model, tokenizer, DPOConfig(...), rows).train()   # rows: prompt, chosen, rejected
"""

from .config import GRPOConfig
from .dpo import DPOTrainer
from .dpo_config import DPOConfig
from diffusion.estimators import ESTIMATORS, get_estimator
from .objective import dpo_loss, group_advantages, grpo_loss, k3_kl, spg_loss, wd1_loss
from .rewards import (
    RewardError,
    compute_rewards,
    exact_match,
    format_reward,
    length_penalty,
)
from .trainer import GRPOTrainer

__all__ = [
    "DPOConfig", "DPOTrainer", "GRPOConfig", "GRPOTrainer", "ESTIMATORS", "dpo_loss", "get_estimator",
    "group_advantages", "grpo_loss", "k3_kl", "spg_loss", "wd1_loss",
    "RewardError", "compute_rewards", "exact_match", "format_reward", "length_penalty",
]
