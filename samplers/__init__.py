"""ddlm.samplers: turn a trained denoiser into text. Every sampler counts its network calls (``nfe``).

Built so far: masked ancestral sampling with exact per-sequence caching; the samplers issue adds the rest.
"""

from .ancestral import MaskedAncestralSampler
from .base import SampleOutput

__all__ = ["MaskedAncestralSampler", "SampleOutput"]
