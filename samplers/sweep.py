"""Quality against network calls: each sampler of a model family at several call budgets, scored alike.

Every sampler paper shows the same picture: generative perplexity (under a reference causal LM) and unigram entropy
of unconditional samples against the network calls spent on them.  :func:`sweep` draws it for one model: for each
:class:`SweepEntry` and each budget k it generates ``num_samples`` samples with ``num_steps = k`` and records the
calls actually made per sample (a sampler may stop early: the exact cache of ``ancestral`` skips calls that cannot
change the canvas, ``threshold`` and ``entropy_bound`` commit more than one token when confident, and a masked sampler
that commits one token per call cannot use more calls than there are positions; ``remdm``'s loop can).  ``ardm`` is
given only budgets k <= L, where its plan uses exactly k calls.

Generative perplexity alone rewards repetition (a sample of one repeated word scores well), which is why the
unigram entropy of each sample (:func:`~diffusion.evaluation.sample_quality.unigram_entropy`) is recorded beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from diffusion.evaluation.sample_quality import generative_perplexity, unigram_entropy
from diffusion.spec import DiffusionSpec

from .base import FREE, get_sampler
from .cli.batches import generate_in_batches

__all__ = ["SweepEntry", "default_entries", "sweep"]


@dataclass(frozen=True)
class SweepEntry:
    """One line of the picture: ``get_sampler(sampler, **options)`` at every budget (``at_most_length``: only
    budgets up to the sample length, for samplers that refuse more)."""

    label: str
    sampler: str
    options: dict[str, Any] = field(default_factory=dict)
    at_most_length: bool = False


def default_entries(spec: DiffusionSpec, curve: list[float] | None = None) -> list[SweepEntry]:
    """The samplers compared for a model: for time-free masked (``subs``) models ancestral, ReMDM's loop, low-confidence
    remasking, threshold decoding, entropy-bounded acceptance and ARDM's planned budget (over ``curve``, the model's
    stored loss curve, else even groups); for masked models with time ancestral and ReMDM; for score models the
    analytic and Euler samplers (also for uniform x0 models)."""
    if not spec.masked:
        return [SweepEntry("analytic", "analytic"), SweepEntry("euler", "euler")]
    entries = [SweepEntry("ancestral", "ancestral"),
               SweepEntry("ReMDM loop (eta 0.02)", "remdm", {"schedule": "loop", "eta": 0.02})]
    if not spec.time_free_masked:
        return entries
    return entries + [SweepEntry("remask (low confidence)", "remask", {"strategy": "low_confidence"}),
                      SweepEntry("threshold 0.9", "threshold", {"threshold": 0.9}),
                      SweepEntry("entropy-bounded (1 nat)", "remask", {"entropy_bound": 1.0}),
                      SweepEntry("ARDM plan", "ardm", {"curve": curve}, at_most_length=True)]


def sweep(model: Any, reference: Any, *, entries: Sequence[SweepEntry], budgets: Sequence[int], length: int,
          num_samples: int, batch_size: int, seed: int = 0, sample_tokenizer: Any = None,
          reference_tokenizer: Any = None, on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """One row per (entry, budget): ``label``, ``sampler``, ``options``, ``budget`` (the ``num_steps`` asked),
    ``calls`` (network calls per sample: each batch's count, averaged over batches), ``gen_ppl``, ``nats_per_token``,
    ``unigram_entropy``, ``seconds``.  Every row starts from the same seed.  ``on_row`` sees each row as it is done."""
    for k in budgets:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"budgets must be positive ints, got {list(budgets)!r}")
    if not entries:
        raise ValueError("sweep needs at least one entry")
    samplers = [get_sampler(entry.sampler, **entry.options) for entry in entries]  # bad options fail before sampling
    rows = []
    for entry, sampler in zip(entries, samplers):
        for k in budgets:
            if entry.at_most_length and k > length:
                continue
            start = time.perf_counter()
            outs = list(generate_in_batches(sampler, model, [FREE] * length, num_samples, batch_size, num_steps=k,
                                            generator=torch.Generator().manual_seed(seed)))
            seconds = time.perf_counter() - start
            tokens = torch.cat([out.tokens for out in outs])
            quality = generative_perplexity(tokens, reference, sample_tokenizer=sample_tokenizer,
                                            reference_tokenizer=reference_tokenizer)
            row = {"label": entry.label, "sampler": entry.sampler, "options": _printable(entry.options), "budget": k,
                   "calls": sum(out.nfe for out in outs) / len(outs), "gen_ppl": quality["gen_ppl"],
                   "nats_per_token": quality["nats_per_token"], "unigram_entropy": unigram_entropy(tokens),
                   "seconds": round(seconds, 3)}
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def _printable(options: dict[str, Any]) -> dict[str, Any]:
    """Options as JSON keeps them (a loss curve is summarised by its length)."""
    return {key: (f"<{len(value)} values>" if isinstance(value, list) else value) for key, value in options.items()}
