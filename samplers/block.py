"""Block diffusion sampling (BD3-LM, Arriola et al. 2025): blocks left to right, masked ancestral steps inside each.

Block ``b`` starts all MASK and runs ``num_steps / blocks`` ancestral steps from t = 1 to ``t_final`` (a masked
token unmasks with probability ``(alpha_s - alpha_t) / (1 - alpha_t)``, to ``y ~ p_theta(. | x_t^b, x^{<b})``),
then takes the most likely token wherever MASK is left.  With ``kv_cache`` the keys and values of the other
blocks are computed once per block and reused (:class:`~samplers.kv_cache.BlockCaller`): exact for the
block-causal models block diffusion trains (``attention_block_size``), where a block never sees later ones.
Inside a block the network is called again only when a token of the block changed (the network is
time-free), and two uniforms per position and step are drawn either way, so neither cache changes a token.

With ``stop_at_eos`` a sequence is finished once a block holds its EOS, and sampling stops when every sequence
is: variable-length generation, with each sequence's length in ``SampleOutput.lengths``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffusion.spec import DiffusionSpec

from .base import (
    FREE,
    SampleOutput,
    Sampler,
    check_filters,
    check_positive_int,
    eos_id_of,
    finish_at_eos,
    register_sampler,
    sample_categorical,
    sequence_lengths,
    split_steps,
    token_probs,
    uniforms,
)
from .kv_cache import BlockCaller

__all__ = ["BlockDiffusionSampler"]


@register_sampler
class BlockDiffusionSampler(Sampler):
    """Block diffusion: semi-autoregressive blocks, masked ancestral sampling within each.

    Args:
        block_length: positions per block (None: the model's ``attention_block_size``, which a block-diffusion model
            was trained with).
        t_final: the time each block's last step ends at.
        kv_cache: reuse the other blocks' keys/values while a block is decoded (None: when the model can, i.e. a
            DDiTModel; a converted causal LM recomputes them).
        temperature, top_k, top_p: filters on each token distribution (temperature 0: argmax).
        stop_at_eos: finish a sequence once a block holds its EOS; stop when every sequence is finished.
    """

    name = "block"
    masked_only = True

    def __init__(self, block_length: int | None = None, t_final: float = 1e-5, kv_cache: bool | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 stop_at_eos: bool = False) -> None:
        if block_length is not None:
            check_positive_int("block_length", block_length)
        if not 0.0 < t_final < 1.0:
            raise ValueError(f"t_final must be in (0, 1), got t_final={t_final!r}")
        check_filters(temperature, top_k, top_p)
        self.block_length, self.t_final, self.kv_cache, self.stop_at_eos = block_length, t_final, kv_cache, stop_at_eos
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def _generate(self, model: Any, spec: DiffusionSpec, canvas: Tensor, num_steps: int,
                  generator: torch.Generator | None, return_trajectory: bool, callback: Any) -> SampleOutput:
        supported = bool(getattr(model, "supports_kv_cache", False))
        if self.kv_cache and not supported:
            raise ValueError("kv_cache=True needs a model whose forward takes past_key_values (a DDiTModel)")
        kv_cache = supported if self.kv_cache is None else self.kv_cache
        eos_id = eos_id_of(model) if self.stop_at_eos else None
        block_length = self.block_length or spec.block_size
        if block_length is None:
            raise ValueError("block_length=None needs a block-diffusion model (config.attention_block_size); this "
                             "model has none: pass block_length")
        mask_id, schedule, length = spec.mask_id, spec.schedule, canvas.shape[1]
        x = torch.where(canvas == FREE, torch.full_like(canvas, mask_id), canvas)
        starts = [b for b in range(0, length, block_length) if bool((canvas[:, b : b + block_length] == FREE).any())]
        block_steps = split_steps(num_steps, len(starts), block_length)
        nfe, trajectory, step_index = 0, [x.clone()] if return_trajectory else None, 0
        positions = torch.arange(length, device=x.device)
        for start, steps in zip(starts, block_steps):
            times = torch.linspace(1.0, self.t_final, steps + 1, dtype=torch.float64)
            end = min(start + block_length, length)
            in_block = (positions >= start) & (positions < end)
            call = BlockCaller(model, "dual" if kv_cache else None, start, end)
            cached, changed = None, True
            for i in range(len(times) - 1):
                masked = (x == mask_id) & in_block
                total_noise = schedule.total_noise(times[i]).float().expand(x.shape[0]).to(x.device)
                if (changed or spec.time_conditioning) and bool(masked.any()):  # the block changed since the last call
                    cached = self._full_block_log_probs(call, x, total_noise, in_block)
                    nfe += 1
                alpha_t, alpha_s = schedule.alpha(times[i]), schedule.alpha(times[i + 1])
                p_unmask = float((alpha_s - alpha_t) / (1 - alpha_t))
                u_move = uniforms(x.shape, generator, x.device)
                u_token = uniforms(x.shape, generator, x.device)
                move = masked & (u_move < p_unmask)
                changed = bool(move.any())
                if changed:
                    x = x.clone()
                    probs = token_probs(cached[move[:, start:end]], exclude=mask_id, temperature=self.temperature,
                                        top_k=self.top_k, top_p=self.top_p)
                    x[move] = sample_categorical(probs, None, u=u_token[move])
                if trajectory is not None:
                    trajectory.append(x.clone())
                if callback is not None:
                    callback(step_index, x)
                step_index += 1
            still = (x == mask_id) & in_block
            if bool(still.any()):  # noise removal: the most likely token
                if changed or cached is None:
                    total_noise = schedule.total_noise(times[-1]).float().expand(x.shape[0]).to(x.device)
                    cached = self._full_block_log_probs(call, x, total_noise, in_block)
                    nfe += 1
                x = x.clone()
                x[still] = token_probs(cached[still[:, start:end]], exclude=mask_id, temperature=0).argmax(-1)
            if eos_id is not None:
                x, done = finish_at_eos(x, canvas, end, eos_id)
                if bool(done.all()):
                    break
        lengths = sequence_lengths(x, canvas, eos_id) if eos_id is not None else None
        return SampleOutput(tokens=x, nfe=nfe, trajectory=trajectory, lengths=lengths)

    @staticmethod
    def _full_block_log_probs(call: BlockCaller, x: Tensor, total_noise: Tensor, in_block: Tensor) -> Tensor:
        """``log p_theta(x0 | x)`` at every position of the block: ``[B, block, V]``."""
        where = in_block[None].expand_as(x)
        out = call(x, total_noise, where).float()  # (B * block, V), row-major
        return out.view(x.shape[0], int(in_block.sum()), -1)
