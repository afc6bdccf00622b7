"""diffusion: the maths and the model of discrete diffusion language models.

The top level holds the maths and the model: noise schedules, forward processes, the time-node rules,
the losses, the :class:`DiffusionSpec` a model config describes, the training objectives (one block, and block
diffusion), the DDiT denoiser, adapters for outside models and the conversion of causal LMs.  The run machinery sits in sub-packages: ``data`` (corpus,
tokenizer, packing), ``training`` (config, loop, checkpoints, EMA), ``evaluation`` (likelihood, sample
quality, the AR baseline), ``hub`` (export) and ``cli`` (argument parsing, ``ddlm-push``).

Nothing here imports ``samplers``, ``rl`` or ``scripts``.
"""

from transformers import AutoConfig, AutoModelForMaskedLM

from .adapters import DiffusionLMAdapter, MaskedLMAdapter, load_denoiser, save_denoiser
from .block_diffusion import BlockDiffusionObjective
from .convert import convert_causal_lm
from .modeling_ddit import DDiTConfig, DDiTModel
from .objectives import DiffusionObjective
from .processes import AbsorbingProcess, Process, UniformProcess, get_process
from .schedules import (
    LINEAR_MASKING,
    CosineSchedule,
    GeometricSchedule,
    LinearSchedule,
    LogLinearSchedule,
    Schedule,
    get_schedule,
)
from .spec import DiffusionSpec

# Make "ddit" checkpoints loadable through the Auto classes once this package is imported.
AutoConfig.register(DDiTConfig.model_type, DDiTConfig, exist_ok=True)
AutoModelForMaskedLM.register(DDiTConfig, DDiTModel, exist_ok=True)

__all__ = [
    "LINEAR_MASKING",
    "AbsorbingProcess",
    "BlockDiffusionObjective",
    "CosineSchedule",
    "DDiTConfig",
    "DDiTModel",
    "DiffusionLMAdapter",
    "DiffusionObjective",
    "DiffusionSpec",
    "GeometricSchedule",
    "LinearSchedule",
    "LogLinearSchedule",
    "MaskedLMAdapter",
    "Process",
    "Schedule",
    "UniformProcess",
    "convert_causal_lm",
    "get_process",
    "get_schedule",
    "load_denoiser",
    "save_denoiser",
]
