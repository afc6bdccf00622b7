"""samplers: one interface, many decoding algorithms; every sampler counts its network calls (``nfe``).

    from samplers import get_sampler
    out = get_sampler("ancestral").generate(model, batch_size=4, length=128, num_steps=128)
"""

from .ancestral import MaskedAncestralSampler
from .ardm import ARDMPolicySampler
from .base import FREE, SAMPLERS, SampleOutput, Sampler, get_sampler, register_sampler
from .block import BlockDiffusionSampler
from .glauber import GlauberSampler
from .posterior import SplitGibbsPosteriorSampler
from .psi import PsiSampler
from .remasking import ConfidenceRemaskingSampler
from .remdm import RemaskingAncestralSampler
from .sedd import AnalyticSampler, D3PMSampler, EulerSampler
from .threshold import ThresholdSampler

__all__ = [
    "FREE",
    "SAMPLERS",
    "ARDMPolicySampler",
    "AnalyticSampler",
    "BlockDiffusionSampler",
    "ConfidenceRemaskingSampler",
    "D3PMSampler",
    "EulerSampler",
    "GlauberSampler",
    "MaskedAncestralSampler",
    "PsiSampler",
    "RemaskingAncestralSampler",
    "SampleOutput",
    "SplitGibbsPosteriorSampler",
    "Sampler",
    "ThresholdSampler",
    "get_sampler",
    "register_sampler",
]
