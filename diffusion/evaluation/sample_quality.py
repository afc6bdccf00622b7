"""Quality of generated samples: generative perplexity under a reference causal LM, and unigram entropy.

- ``generative_perplexity``: ``exp(sum of -log p_ref(x_i | x_<i) / number of scored tokens)`` over the
  samples, scored by an autoregressive reference (the AR baseline by default, any Hugging Face causal LM
  by name).  When the reference uses another tokenizer the samples are decoded and re-encoded.
- ``unigram_entropy``: the mean over samples of the entropy (nats) of each sample's token histogram.  Low
  values flag degenerate repetition, which a low generative perplexity alone rewards.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .autoregressive import causal_nll

__all__ = ["generative_perplexity", "unigram_entropy"]


def unigram_entropy(samples: Sequence[Sequence[int]] | Tensor) -> float:
    """Mean over samples of ``-sum_v p_v log p_v`` with p the sample's own token frequencies (nats).

    >>> round(unigram_entropy([[1, 1, 2, 2], [3, 3, 3, 3]]), 6)  # (log 2 + 0) / 2
    0.346574
    """
    rows = samples.tolist() if isinstance(samples, Tensor) else [list(s) for s in samples]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("unigram_entropy needs non-empty samples")
    total = 0.0
    for row in rows:
        counts = Counter(row)
        n = len(row)
        total -= sum(c / n * math.log(c / n) for c in counts.values())
    return total / len(rows)


@torch.no_grad()
def generative_perplexity(samples: Sequence[Sequence[int]] | Tensor, reference: Any, *, sample_tokenizer: Any = None,
                          reference_tokenizer: Any = None, batch_size: int = 16,
                          max_length: int | None = None) -> dict[str, float]:
    """Generative perplexity of ``samples`` (token ids of ``sample_tokenizer``) under the causal LM ``reference``.

    With both tokenizers given and different vocabularies, samples are decoded and re-encoded with the reference's
    tokenizer (its BOS/EOS is put first so the first real token is scored too); with the same vocabulary
    (or none given) ids are scored directly, first token as context.  Returns ``{"gen_ppl", "nats_per_token",
    "tokens"}``.
    """
    rows = samples.tolist() if isinstance(samples, Tensor) else [list(s) for s in samples]
    if not rows:
        raise ValueError("generative_perplexity needs at least one sample")
    same_vocabulary = (reference_tokenizer is None or sample_tokenizer is None
                       or reference_tokenizer.get_vocab() == sample_tokenizer.get_vocab())
    if not same_vocabulary:
        start = reference_tokenizer.bos_token_id if reference_tokenizer.bos_token_id is not None \
            else reference_tokenizer.eos_token_id
        texts = [sample_tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        rows = [([start] if start is not None else []) + reference_tokenizer(t, add_special_tokens=False)["input_ids"]
                for t in texts]
    limit = max_length or getattr(reference.config, "max_position_embeddings", None) or max(len(r) for r in rows)
    rows = [r[:limit] for r in rows if len(r) >= 2]
    if not rows:
        raise ValueError("every sample is shorter than 2 tokens: nothing to score")
    device = next(reference.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        nll, scored = causal_nll(reference, ids.to(device), mask.to(device))
        total += float(nll.sum())
        count += int(scored.sum())
    nats = total / count
    return {"gen_ppl": math.exp(min(nats, 700.0)), "nats_per_token": nats, "tokens": count}
