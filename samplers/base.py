"""The sampler interface, the registry, and the pieces every sampler shares.

A sampler turns a denoiser into tokens: ``get_sampler(name, **hyper_parameters).generate(model, ...)``.
The model is anything with a ``config`` (``process``, ``parameterization``, ``mask_token_id``,
``vocab_size``, ``max_position_embeddings``, ``schedule``, ``schedule_kwargs``, ``time_conditioning``)
whose call ``model(input_ids=x, total_noise=sigma_bar).logits`` gives log-probabilities of x0 (``subs``) or
log-scores (``score``) over ``vocab_size`` states: a :class:`~diffusion.DDiTModel`, or an outside model
through :mod:`diffusion.adapters`.  :meth:`Sampler.generate` reads the config once into a
:class:`~diffusion.DiffusionSpec` (process, schedule, mask id) and hands it to the algorithm.

The canvas: ``LongTensor[B, L]`` whose entries are fixed tokens or :data:`FREE` (-1) for positions to
generate; prompts (prefix, suffix or anywhere) are fixed tokens and are never changed.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffusion.modeling_ddit import accepts_score_mask
from diffusion.spec import DiffusionSpec

__all__ = [
    "FREE",
    "SAMPLERS",
    "LengthWarning",
    "RowStreams",
    "draw_rows",
    "uniforms",
    "SampleOutput",
    "Sampler",
    "check_filters",
    "check_stop_at_eos",
    "eos_id_of",
    "finish_at_eos",
    "sequence_lengths",
    "split_steps",
    "check_positive_int",
    "get_sampler",
    "make_canvas",
    "outputs_at",
    "register_sampler",
    "remove_remaining_noise",
    "sample_categorical",
    "token_probs",
]

FREE = -1


class RowStreams:
    """One random stream per group of ``rows_each`` consecutive rows of a batch.

    A sampler given a ``RowStreams`` instead of a ``torch.Generator`` draws the random numbers of each group's
    rows from that group's generator, so a group's tokens do not depend on which groups share its batch: GRPO
    gives every prompt's group its own stream and gets the same rollouts on any number of processes.
    """

    def __init__(self, generators: list[torch.Generator], rows_each: int) -> None:
        check_positive_int("rows_each", rows_each)
        if not generators:
            raise ValueError("RowStreams needs at least one generator")
        self.generators, self.rows_each = list(generators), rows_each

    @property
    def rows(self) -> int:
        return len(self.generators) * self.rows_each


def draw_rows(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | RowStreams | None, draw: Any) -> Tensor:
    """``draw(shape, generator)``, or for :class:`RowStreams` one draw per group of rows, concatenated."""
    if not isinstance(generator, RowStreams):
        return draw(tuple(shape), generator)
    if shape[0] != generator.rows:
        raise ValueError(f"RowStreams covers {generator.rows} rows, the batch has {shape[0]}")
    sub = (generator.rows_each, *shape[1:])
    return torch.cat([draw(sub, g) for g in generator.generators])


def uniforms(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | RowStreams | None,
             device: torch.device | str) -> Tensor:
    """float64 uniforms of ``shape`` (rows first) on ``device``, drawn where the generator(s) live."""
    return draw_rows(shape, generator, lambda sub, g: torch.rand(sub, generator=g, dtype=torch.float64)).to(device)


class LengthWarning(UserWarning):
    """A canvas longer than the blocks the model was trained on: it runs, but quality drops past that length."""


@dataclass(frozen=True)
class SampleOutput:
    """``tokens``: ``LongTensor[B, L]``; ``nfe``: network calls made; ``trajectory``: the canvas after each step
    (free positions still noisy show MASK for absorbing models); ``lengths``: ``[B]`` each sequence's length up to
    and including its first generated EOS (samplers that stop at EOS; the positions after it hold EOS)."""

    tokens: Tensor
    nfe: int
    trajectory: list[Tensor] | None = None
    lengths: Tensor | None = None


def eos_id_of(model: Any) -> int:
    """The EOS id a sampler stops at, from the model's config."""
    eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if not isinstance(eos, int):
        raise ValueError("stop_at_eos=True needs the model's config to name its eos_token_id, and it names none")
    return eos


def finish_at_eos(x: Tensor, canvas: Tensor, upto: int, eos_id: int) -> tuple[Tensor, Tensor]:
    """Rows whose generated positions before ``upto`` hold an EOS are finished: their free positions from ``upto`` on
    become EOS (so nothing more is generated for them).  Returns ``(x, done [B])``."""
    free = canvas == FREE
    decided = free.clone()
    decided[:, upto:] = False
    done = ((x == eos_id) & decided).any(-1)
    rest = free & ~decided & done[:, None]
    return torch.where(rest, torch.full_like(x, eos_id), x), done


def sequence_lengths(x: Tensor, canvas: Tensor, eos_id: int) -> Tensor:
    """``[B]``: the position after each row's first generated EOS, or the canvas length if it has none."""
    generated_eos = (x == eos_id) & (canvas == FREE)
    first = torch.where(generated_eos.any(-1), generated_eos.float().argmax(-1) + 1,
                        torch.full((x.shape[0],), x.shape[1], device=x.device))
    return first.long()


def split_steps(num_steps: int, blocks: int, block_length: int | None) -> list[int]:
    """Steps of each of ``blocks`` semi-autoregressive blocks: ``num_steps`` shared as evenly as possible, the first
    ``num_steps % blocks`` blocks taking one more (a prompt that ends inside a block adds a partial block)."""
    if num_steps < blocks:
        raise ValueError(f"num_steps ({num_steps}) must be at least the number of blocks to decode ({blocks}, "
                         f"block_length={block_length})")
    base, extra = divmod(num_steps, blocks)
    return [base + (1 if b < extra else 0) for b in range(blocks)]


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")


def check_stop_at_eos(stop_at_eos: bool, block_length: int | None) -> None:
    if not isinstance(stop_at_eos, bool):
        raise ValueError(f"stop_at_eos must be True or False, got stop_at_eos={stop_at_eos!r}")
    if stop_at_eos and block_length is None:
        raise ValueError("stop_at_eos=True needs semi-autoregressive blocks (set block_length): a sequence decoded in "
                         "one block has no earlier point to stop at")


def check_filters(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not (isinstance(temperature, (int, float)) and 0 <= temperature < math.inf):
        raise ValueError(f"temperature must be >= 0 and finite, got temperature={temperature!r}")
    if top_k is not None:
        check_positive_int("top_k", top_k)
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got top_p={top_p!r}")


def token_probs(log_probs: Tensor, *, exclude: int | None, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None) -> Tensor:
    """Per-position distributions ``[..., V]`` (float64) after temperature, top-k and top-p.

    ``exclude`` (the MASK id) gets probability 0. ``temperature = 0`` puts all mass on the argmax.
    """
    logits = log_probs.to(torch.float64, copy=exclude is not None)  # a copy to write into, made once
    if exclude is not None:
        logits[..., exclude] = float("-inf")
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).double()
    if temperature != 1:  # x / 1 is x: the division over the whole vocabulary is skipped, the values are the same
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
        keep_sorted = before < top_p  # the smallest prefix whose mass reaches top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs * keep
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_categorical(probs: Tensor, generator: torch.Generator | None, u: Tensor | None = None) -> Tensor:
    """One draw per position from unnormalised non-negative ``probs [..., V]`` by the inverse CDF.

    Exactly one uniform is consumed per position, whatever the probabilities, so two runs that differ
    only in how their probabilities were computed (a cache) consume the same random stream.  ``u``
    (``probs.shape[:-1]``) supplies the uniforms instead of ``generator``.
    """
    if u is None:
        u = uniforms(probs.shape[:-1], generator, probs.device)
    cdf = probs.double().cumsum(-1)
    index = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    return index.clamp_max(probs.shape[-1] - 1)


def remove_remaining_noise(x: Tensor, mask_id: int, outputs: Any, trajectory: list[Tensor] | None) -> Tensor:
    """The last step of the masked samplers: every position still masked in ``x [B, L]`` takes its most likely
    token under ``outputs(where) -> log-probabilities [n, V]`` (one network call, only if any is masked)."""
    still_masked = x == mask_id
    if not bool(still_masked.any()):
        return x
    best = token_probs(outputs(still_masked), exclude=mask_id, temperature=0).argmax(-1)
    x = x.clone()
    x[still_masked] = best
    if trajectory is not None:
        trajectory.append(x.clone())
    return x


def outputs_at(model: Any, where: Tensor, input_ids: Tensor, **kwargs: Any) -> Any:
    """Call ``model(input_ids=..., **kwargs)`` for its outputs at the positions ``where [B, L]`` selects.

    The returned output's ``logits`` are ``[n, S]``, the selected positions in row-major order.  A model
    that takes ``score_mask`` (a :class:`~diffusion.DDiTModel`) runs its output head there only, which is
    most of a sampler step's saving when few positions are still masked; any other model computes every
    position and is indexed.
    """
    if accepts_score_mask(model):
        return model(input_ids=input_ids, score_mask=where, **kwargs)
    out = model(input_ids=input_ids, **kwargs)
    out.logits = out.logits[where]
    return out


def make_canvas(config: Any, *, batch_size: int | None, prompt_ids: Tensor | None, length: int | None,
                canvas: Tensor | None) -> Tensor:
    """The starting canvas ``[B, L]`` (fixed ids, :data:`FREE` elsewhere), validated before any model call.

    Exactly one of: ``batch_size`` + ``length`` (unconditional), ``prompt_ids [B, P]`` + ``length`` (prefix
    prompt, ``length`` new tokens), or ``canvas [B, L]`` (fixed tokens anywhere).
    """
    given = [name for name, value in (("batch_size", batch_size), ("prompt_ids", prompt_ids), ("canvas", canvas))
             if value is not None]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of batch_size, prompt_ids, canvas; got {given or 'none'}")
    if canvas is None:
        check_positive_int("length", length)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
        canvas = torch.full((batch_size, length), FREE, dtype=torch.long)
    elif prompt_ids is not None:
        if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
            raise ValueError(f"prompt_ids must be a non-empty [batch, length] tensor, got shape {tuple(prompt_ids.shape)}")
        canvas = torch.cat([prompt_ids.long().cpu(), torch.full((prompt_ids.shape[0], length), FREE, dtype=torch.long)], 1)
    elif canvas.dim() != 2:
        raise ValueError(f"canvas must be [batch, length], got shape {tuple(canvas.shape)}")
    canvas = canvas.long().cpu()
    if canvas.shape[1] > config.max_position_embeddings:
        raise ValueError(
            f"prompt plus length is {canvas.shape[1]} tokens, beyond the model's context of "
            f"{config.max_position_embeddings}"
        )
    fixed = canvas[canvas != FREE]
    if fixed.numel():
        invalid = (fixed < 0) | (fixed >= config.vocab_size)
        if config.mask_token_id is not None:
            invalid |= fixed == config.mask_token_id
        bad = fixed[invalid]
        if bad.numel():
            raise ValueError(
                f"prompt token ids must be real tokens in [0, {config.vocab_size}) and not the mask id "
                f"{config.mask_token_id}; got {sorted(set(bad.tolist()))[:5]}"
            )
    if not bool((canvas == FREE).any()):
        raise ValueError("the canvas has no free position to generate")
    return canvas


class Sampler(ABC):
    """A decoding algorithm. Subclasses validate their hyper-parameters in ``__init__`` and implement
    :meth:`_generate` on a validated canvas.  ``masked_only`` samplers need a masked-diffusion denoiser
    (absorbing, ``subs``): they read ``p_theta(x0 | x_t)`` and the mask id, never a score."""

    name: ClassVar[str]
    masked_only: ClassVar[bool] = False

    @torch.no_grad()
    def generate(
        self,
        model: Any,
        *,
        batch_size: int | None = None,
        prompt_ids: Tensor | None = None,
        length: int | None = None,
        canvas: Tensor | None = None,
        num_steps: int,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        callback: Any = None,
    ) -> SampleOutput:
        """Generate tokens. ``callback(step, x)`` (optional) sees the canvas after every step."""
        check_positive_int("num_steps", num_steps)
        spec = DiffusionSpec.of(model)
        if spec.glauber_sweeps is not None and self.name != "glauber":
            raise ValueError(f"a Glauber model (--objective glauber) is a classifier that only the glauber sampler "
                             f"reads, not the {self.name} sampler")
        self.check_model(spec)
        start = make_canvas(model.config, batch_size=batch_size, prompt_ids=prompt_ids, length=length, canvas=canvas)
        trained = getattr(model.config, "trained_length", None)
        if trained is not None and start.shape[1] > trained:
            warnings.warn(LengthWarning(f"the canvas (prompt, length and suffix) is {start.shape[1]} tokens, longer "
                                        f"than the {trained}-token blocks this model was trained on; expect worse "
                                        "text past that length"), stacklevel=2)
        device = next(model.parameters()).device
        return self._generate(model, spec, start.to(device), num_steps, generator, return_trajectory, callback)

    def check_model(self, spec: DiffusionSpec) -> None:
        """Raise ``ValueError`` when the model's process or parameterisation does not suit this sampler."""
        if self.masked_only and not spec.masked:
            raise ValueError(
                f"the {self.name} sampler needs an absorbing model with parameterization='subs', got "
                f"process={spec.process_name!r}, parameterization={spec.parameterization!r}"
            )

    @abstractmethod
    def _generate(self, model: Any, spec: DiffusionSpec, canvas: Tensor, num_steps: int,
                  generator: torch.Generator | None, return_trajectory: bool, callback: Any) -> SampleOutput:
        """Fill ``canvas [B, L]`` (on the model's device; :data:`FREE` marks positions to generate)."""


SAMPLERS: dict[str, type[Sampler]] = {}


def register_sampler(cls: type[Sampler]) -> type[Sampler]:
    """Class decorator adding a sampler to :data:`SAMPLERS` under ``cls.name`` (a duplicate name raises)."""
    if cls.name in SAMPLERS:
        raise ValueError(f"a sampler named {cls.name!r} is already registered ({SAMPLERS[cls.name].__name__})")
    SAMPLERS[cls.name] = cls
    return cls


def get_sampler(name: str, **kwargs: Any) -> Sampler:
    """Build a registered sampler by name, e.g. ``get_sampler("ancestral", temperature=0.9)``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler name={name!r}; valid names: {sorted(SAMPLERS)}")
    return SAMPLERS[name](**kwargs)
