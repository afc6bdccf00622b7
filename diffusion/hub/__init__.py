"""Hub export: a self-describing folder (config, safetensors, model code, tokenizer, sampler defaults, card).

    from diffusion.hub import export_for_hub, push_folder
    folder = export_for_hub("runs/shakespeare/final", "hub/shakespeare")
"""

from .card import model_card, usage_snippet
from .export import SAMPLER_CONFIG, export_for_hub, push_folder, read_sampler_config

__all__ = ["SAMPLER_CONFIG", "export_for_hub", "model_card", "push_folder", "read_sampler_config", "usage_snippet"]
