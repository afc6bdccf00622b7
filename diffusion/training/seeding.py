"""One rule for every random stream of a run: a generator per ``(seed, step, purpose, index)``.

A training step draws its batch and noise, an RL step its prompts, rollouts and masks, from generators
that are pure functions of these four numbers, so a resumed or re-sharded run replays exactly what an
uninterrupted one does, and no two purposes share a stream.  The four numbers are mixed by numpy's
``SeedSequence`` (a hash designed for this), not by arithmetic that could make two streams collide.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["PURPOSES", "derive_generator"]

# Every stream a trainer draws from; a new purpose gets a new number, never a reused one.
PURPOSES = {"batch": 0, "eval": 1, "prompts": 2, "rollout": 3, "masks": 4, "variance": 5, "sft-order": 6, "sft": 7,
            "pairs": 8, "reference": 9, "confidence": 10}


def derive_generator(seed: int, step: int, purpose: str, index: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``(seed, step, purpose, index)``.

    >>> a = derive_generator(0, 5, "batch").initial_seed()
    >>> a == derive_generator(0, 5, "batch").initial_seed() != derive_generator(0, 5, "eval").initial_seed()
    True
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {sorted(PURPOSES)}, got purpose={purpose!r}")
    for name, value in (("seed", seed), ("step", step), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {name}={value!r}")
    state = np.random.SeedSequence([seed, step, PURPOSES[purpose], index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
