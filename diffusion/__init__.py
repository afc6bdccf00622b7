"""ddlm.diffusion: the maths and the model of discrete diffusion language models.

Nothing here imports ``samplers`` or ``rl``.
"""

from transformers import AutoConfig, AutoModelForMaskedLM

from .modeling_ddit import DDiTConfig, DDiTModel
from .processes import AbsorbingProcess, Process, UniformProcess, get_process
from .schedules import (
    CosineSchedule,
    GeometricSchedule,
    LinearSchedule,
    LogLinearSchedule,
    Schedule,
    get_schedule,
)

# Make "ddit" checkpoints loadable through the Auto classes once this package is imported.
AutoConfig.register(DDiTConfig.model_type, DDiTConfig, exist_ok=True)
AutoModelForMaskedLM.register(DDiTConfig, DDiTModel, exist_ok=True)

__all__ = [
    "AbsorbingProcess",
    "CosineSchedule",
    "DDiTConfig",
    "DDiTModel",
    "GeometricSchedule",
    "LinearSchedule",
    "LogLinearSchedule",
    "Process",
    "Schedule",
    "UniformProcess",
    "get_process",
    "get_schedule",
]
