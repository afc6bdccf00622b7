"""Block diffusion (BD3-LM, Arriola et al., ICLR 2025): autoregressive over blocks, masked diffusion inside each.

A sequence of L tokens is cut into blocks of ``block_size``; ``log p(x) = sum_b log p(x^b | x^{<b})`` and each
block's conditional is bounded by the masked ELBO at its own noise level ``t_b``:

    L(x) = sum_b w(t_b) sum_{i in b, x_t^i = MASK} -log p_theta(x0^i | x_t^b, x0^{<b}),   w(t) = sigma / (e^sigma_bar - 1)

All blocks train in one pass over the concatenation ``x_t (+) x0`` (length 2L, positions ``0..L-1`` twice) under
the three-part mask of :func:`block_diffusion_mask`: a noisy block sees itself (bidirectionally) and the clean
blocks before it; a clean block sees the clean blocks up to itself.  The loss reads the noisy half only.
Block size L is MDLM's masked ELBO (one block, no clean context); block size 1 is the autoregressive NLL
(with every token masked each block predicts its token from the clean prefix).  ``t_b ~ U(t_low, t_high)``: the
"clipped" range of the paper lowers the variance of training; the bound itself needs the full range.
At sampling the model runs with block-causal attention (``DDiTConfig.attention_block_size``), where a noisy block
sees itself and the clean blocks before it: the same conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .losses import masked_elbo
from .modeling_ddit import accepts_score_mask
from .objectives import ObjectiveOutput
from .processes import mask_tokens
from .schedules import Schedule
from .spec import DiffusionSpec
from .time_nodes import sample_t

__all__ = ["BlockDiffusionObjective", "block_diffusion_mask"]


def block_diffusion_mask(length: int, block_size: int, device: torch.device | str = "cpu") -> Tensor:
    """``BoolTensor[2L, 2L]``: which of ``x_t (+) x0`` each position may attend to (True).

    Noisy to noisy: the same block.  Noisy to clean: strictly earlier blocks.  Clean to clean: the same or
    earlier blocks.  Clean to noisy: never.
    """
    if length % block_size:
        raise ValueError(f"block_size={block_size} must divide the sequence length {length}")
    block = torch.arange(length, device=device) // block_size
    query, key = block[:, None], block[None, :]
    noisy_noisy = query == key
    noisy_clean = key < query
    clean_clean = key <= query
    top = torch.cat([noisy_noisy, noisy_clean], dim=1)
    bottom = torch.cat([torch.zeros_like(noisy_noisy), clean_clean], dim=1)
    return torch.cat([top, bottom], dim=0)


@dataclass(frozen=True)
class BlockDiffusionObjective:
    """The block-diffusion training loss with the ``corrupt`` / ``loss`` interface of ``DiffusionObjective``.

    Args:
        schedule: the noise schedule (masking probability and ELBO weight of each block's ``t_b``).
        mask_id: the MASK id; ``num_states``: the token states (real tokens and MASK, ids below it).
        block_size: tokens per block; it must divide the sequence length.
        t_low, t_high: each block's time is drawn from ``U(t_low, t_high)``.
        antithetic: stratify the draws of ``t`` across the batch's blocks.
    """

    schedule: Schedule
    mask_id: int
    num_states: int
    block_size: int
    t_low: float = 1e-3
    t_high: float = 1.0
    antithetic: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got block_size={self.block_size!r}")
        if not 0.0 < self.t_low < self.t_high <= 1.0:
            raise ValueError(f"need 0 < t_low < t_high <= 1, got t_low={self.t_low!r}, t_high={self.t_high!r}")

    @classmethod
    def from_spec(cls, spec: DiffusionSpec, block_size: int, **kwargs: Any) -> BlockDiffusionObjective:
        if not spec.masked:
            raise ValueError("block diffusion needs a masked (absorbing, subs) model, got process="
                             f"{spec.process_name!r}, parameterization={spec.parameterization!r}")
        return cls(spec.schedule, spec.mask_id, spec.num_states, block_size, **kwargs)

    def _blocks(self, x0: Tensor) -> int:
        if x0.dim() != 2:
            raise ValueError(f"x0 must be [batch, length], got shape {tuple(x0.shape)}")
        if x0.shape[1] % self.block_size:
            raise ValueError(f"block_size={self.block_size} must divide the sequence length {x0.shape[1]}")
        return x0.shape[1] // self.block_size

    def corrupt(self, x0: Tensor, *, t: Tensor | None = None, generator: torch.Generator | None = None,
                ) -> tuple[Tensor, Tensor]:
        """``t [B, blocks]`` (unless given) and ``x_t [B, L]``: each block masked at its own level."""
        blocks = self._blocks(x0)
        if x0.numel() and (int(x0.min()) < 0 or int(x0.max()) >= self.num_states or bool((x0 == self.mask_id).any())):
            raise ValueError(f"x0 holds ids outside the {self.num_states - 1} real tokens (or the mask id {self.mask_id})")
        if t is None:
            u = sample_t(x0.shape[0] * blocks, t_min=0.0, antithetic=self.antithetic, generator=generator,
                         device=x0.device)
            t = (self.t_low + (self.t_high - self.t_low) * u).view(x0.shape[0], blocks)
        probability = self.schedule.mask_probability(t).repeat_interleave(self.block_size, dim=1)  # (B, L)
        xt, _ = mask_tokens(x0, probability, self.mask_id, generator=generator)
        return t, xt

    def loss(self, model: torch.nn.Module, x0: Tensor, xt: Tensor, t: Tensor, *,
             attention_mask: Tensor | None = None) -> ObjectiveOutput:
        """Run the model on ``x_t (+) x0`` under the block-diffusion mask; the masked ELBO of the noisy half."""
        if attention_mask is not None:
            raise ValueError("block diffusion trains on packed blocks: attention_mask (padding) is not supported")
        if not accepts_score_mask(model):
            raise ValueError(f"block diffusion needs a DDiTModel or a converted causal LM (a forward that takes "
                             f"attention_pattern), got {type(model).__name__}")
        batch, length = x0.shape
        self._blocks(x0)  # checks the shape
        masked = xt == self.mask_id
        scored = torch.cat([masked, torch.zeros_like(masked)], dim=1)  # outputs of the noisy half only
        positions = torch.arange(length, device=x0.device).repeat(2)
        pattern = block_diffusion_mask(length, self.block_size, device=x0.device)
        log_probs = model(input_ids=torch.cat([xt, x0], dim=1), positions=positions, attention_pattern=pattern,
                          score_mask=scored).logits  # (n, S) at the masked noisy positions, row-major
        weight = self.schedule.elbo_weight(t).repeat_interleave(self.block_size, dim=1)  # (B, L): w(t_b) per token
        rows = masked.nonzero(as_tuple=True)[0]
        per_sequence = masked_elbo(log_probs, x0[masked], None, rows=rows, position_weight=weight[masked], batch=batch)
        num_tokens = x0.numel()
        return ObjectiveOutput(per_sequence.sum() / max(num_tokens, 1), per_sequence, t, num_tokens)

    def __call__(self, model: torch.nn.Module, x0: Tensor, *, t: Tensor | None = None,
                 generator: torch.Generator | None = None, attention_mask: Tensor | None = None) -> ObjectiveOutput:
        t, xt = self.corrupt(x0, t=t, generator=generator)
        return self.loss(model, x0, xt, t, attention_mask=attention_mask)
