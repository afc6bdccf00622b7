"""The run machinery: training config, the loop on accelerate, checkpoints, EMA and seeded streams.

    from diffusion.training import TrainConfig, train
    result = train(TrainConfig(output_dir="runs/demo", max_steps=200))   # result.final_dir: a from_pretrained folder
    train_sft(SFTConfig(model=str(result.final_dir), output_dir="runs/demo-sft"))   # instruction fine-tuning
"""

from .checkpoint import CheckpointError, atomic_directory, check_resumable, find_latest_checkpoint
from .config import TrainConfig
from .ema import EMA
from .loop import TrainResult, build_model_and_objective, build_model_config, evaluate_loss, lr_factor, train
from .seeding import derive_generator
from .sft import SFTConfig, SFTResult, train_sft

__all__ = [
    "EMA",
    "SFTConfig",
    "SFTResult",
    "CheckpointError",
    "TrainConfig",
    "TrainResult",
    "atomic_directory",
    "build_model_and_objective",
    "build_model_config",
    "check_resumable",
    "derive_generator",
    "evaluate_loss",
    "find_latest_checkpoint",
    "lr_factor",
    "train",
    "train_sft",
]
