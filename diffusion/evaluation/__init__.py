"""Evaluation: likelihood bounds with 95% intervals, sample quality, and the autoregressive baseline.

    from diffusion.evaluation import evaluate_likelihood
    result = evaluate_likelihood(model, held_out_blocks, method="quadrature", num_points=8)
"""

from .autoregressive import AutoregressiveObjective, build_causal_lm, causal_nll
from .likelihood import (
    LikelihoodResult,
    any_order_nll,
    evaluate_causal_likelihood,
    evaluate_likelihood,
    sequence_nelbo,
    summarize,
)
from .sample_quality import generative_perplexity, unigram_entropy

__all__ = [
    "AutoregressiveObjective",
    "LikelihoodResult",
    "any_order_nll",
    "build_causal_lm",
    "causal_nll",
    "evaluate_causal_likelihood",
    "evaluate_likelihood",
    "generative_perplexity",
    "sequence_nelbo",
    "summarize",
    "unigram_entropy",
]
