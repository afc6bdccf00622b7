"""``DiffusionSpec``: the diffusion a model was trained for, as objects built once from its config.

A config stores the diffusion as strings and numbers (``process``, ``schedule``, ``schedule_kwargs``,
``parameterization``, ``time_conditioning``, ``mask_token_id``, ``vocab_size``) so that it serialises; the
objective, the samplers, the likelihood code and RL read the objects here instead of rebuilding them.

Vocabulary: ``num_states`` is the number of token states the model embeds and predicts (its
``config.vocab_size``); ``num_tokens`` (N) the real tokens, ``num_states - 1`` for the absorbing process
(MASK is the extra state) and ``num_states`` for the uniform one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import torch

from .processes import MODEL_PROCESSES, Process, get_process
from .schedules import Schedule, get_schedule

__all__ = ["DiffusionSpec"]


@dataclass(frozen=True)
class DiffusionSpec:
    """Process, schedule and output parameterisation of a denoiser.

    Args:
        process_name: ``absorbing`` or ``uniform``.
        schedule: the noise schedule.
        parameterization: ``subs`` (log p(x0 | x_t), absorbing), ``x0`` (log p(x0 | x_t), uniform) or ``score``
            (log-scores).
        time_conditioning: whether the network reads the noise level (no exact sampler cache if so).
        num_states: token states the model predicts (``config.vocab_size``).
        mask_id: the MASK state (absorbing), anywhere in ``[0, num_states)`` for outside models; None (uniform).
        block_size: a block-diffusion model's block (its attention is block-causal); None for one block.
        glauber_sweeps: a Glauber model's sweeps (``--objective glauber``, :mod:`diffusion.glauber`): a classifier,
            not a denoiser, which only its own sampler reads; None for every other model.
        rates: the tensors a model's process is built from when its weights carry it (:meth:`of` passes them,
            shared): a ``bridge`` model's :class:`~diffusion.modeling_ddit.BridgeRates`, a ``nearest_neighbour``
            model's :class:`~diffusion.modeling_ddit.NeighbourGraph`; None otherwise.
    """

    process_name: str
    schedule: Schedule
    parameterization: str
    time_conditioning: bool
    num_states: int
    mask_id: int | None
    block_size: int | None = None
    glauber_sweeps: int | None = None
    rates: Any = None

    def __post_init__(self) -> None:
        if self.process_name not in MODEL_PROCESSES:
            raise ValueError(f"process must be one of {list(MODEL_PROCESSES)}, got process={self.process_name!r}")
        if self.process_name == "bridge" and self.parameterization != "score":
            raise ValueError(f"the bridge process is a score model, got parameterization={self.parameterization!r}")
        if self.process_name == "bridge" and self.mask_id != self.num_states - 1:
            raise ValueError(f"the bridge process needs MASK last (id {self.num_states - 1}), got mask_id={self.mask_id!r}")
        if self.parameterization not in ("subs", "score", "x0"):
            raise ValueError(f"parameterization must be 'subs', 'score' or 'x0', got {self.parameterization!r}")
        absorbing = self.process_name == "absorbing"
        if absorbing and not (isinstance(self.mask_id, int) and 0 <= self.mask_id < self.num_states):
            raise ValueError(f"the absorbing process needs a mask id in [0, {self.num_states}), got mask_id={self.mask_id!r}")
        if self.process_name in ("uniform", "nearest_neighbour") and self.mask_id is not None:
            raise ValueError(f"the uniform process has no MASK state, got mask_id={self.mask_id!r}")
        if self.parameterization == "subs" and not absorbing:
            raise ValueError(f"parameterization='subs' needs the absorbing process, got {self.process_name!r}")
        if self.parameterization == "x0" and self.process_name not in ("uniform", "nearest_neighbour"):
            raise ValueError("parameterization='x0' needs the uniform or nearest_neighbour process (an absorbing x0 "
                             f"model is 'subs'), got {self.process_name!r}")
        if self.block_size is not None and not (self.masked and isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"block_size needs a masked (absorbing, subs) model and a positive int, got "
                             f"block_size={self.block_size!r}")

    @classmethod
    def from_config(cls, config: Any) -> DiffusionSpec:
        """The spec a model config records (a :class:`~diffusion.DDiTConfig`, an adapter's config, ...)."""
        return cls(process_name=config.process, schedule=get_schedule(config.schedule, **config.schedule_kwargs),
                   parameterization=config.parameterization,
                   time_conditioning=bool(getattr(config, "time_conditioning", False)),
                   num_states=config.vocab_size, mask_id=config.mask_token_id,
                   block_size=getattr(config, "attention_block_size", None),
                   glauber_sweeps=getattr(config, "glauber_sweeps", None))

    @classmethod
    def of(cls, model: Any) -> DiffusionSpec:
        """The spec of ``model``: :meth:`from_config` of its config, with the tensors of a process that lives in
        the model's weights (``bridge``, ``nearest_neighbour``)."""
        spec = cls.from_config(model.config)
        owner = {"bridge": "bridge_rates", "nearest_neighbour": "neighbour_graph"}.get(spec.process_name)
        return spec if owner is None else replace(spec, rates=getattr(model, owner, None))

    @property
    def absorbing(self) -> bool:
        return self.process_name == "absorbing"

    @property
    def num_tokens(self) -> int:
        """N, the real (non-MASK) tokens."""
        return self.num_states - 1 if self.mask_id is not None else self.num_states

    @property
    def masked(self) -> bool:
        """A masked-diffusion denoiser: absorbing with the subs parameterisation (predicts x0)."""
        return self.absorbing and self.parameterization == "subs"

    @property
    def predicts_x0(self) -> bool:
        """The network returns ``log p(x0 | x_t)`` (``subs`` or ``x0``), which the score-based code turns into
        log-scores with the process's ``log_score_from_log_probs``."""
        return self.parameterization in ("subs", "x0")

    @property
    def time_free_masked(self) -> bool:
        """A masked denoiser that ignores time: exact caching and RADD's lambda form apply."""
        return self.masked and not self.time_conditioning

    @property
    def default_sampler(self) -> str:
        """The sampler a command uses when none is named: block diffusion for block models, the heat bath for
        Glauber models, masked ancestral for other subs models, SEDD's analytic (Tweedie) step for score and x0 models
        (for x0 models the analytic step is D3PM's x0-parameterised reverse step, :mod:`diffusion.d3pm`)."""
        if self.block_size is not None:
            return "block"
        if self.glauber_sweeps is not None:
            return "glauber"
        return "ancestral" if self.parameterization == "subs" else "analytic"

    def chain_steps(self, length: int) -> int | None:
        """The sampling steps a model fixes for a canvas of ``length`` positions: a Glauber model's chain has
        ``sweeps x length``; None for every other model (any number of steps)."""
        return None if self.glauber_sweeps is None else self.glauber_sweeps * length

    @property
    def default_sampling_steps(self) -> int:
        """Sampling steps of an exported model's ``sampler_config.json``."""
        return 128

    @cached_property
    def process(self) -> Process:
        """The forward process over ``num_tokens`` real tokens.

        Its states are ``0..N-1`` and (absorbing) MASK = N, so a model whose mask id sits elsewhere (an outside
        model) has no such process: the score-based code (SEDD samplers, score entropy) refuses it here.
        """
        if self.absorbing and self.mask_id != self.num_states - 1:
            raise ValueError(f"this needs MASK as the last state (id {self.num_states - 1}), but the model's mask id "
                             f"is {self.mask_id}: only the masked-diffusion (subs) samplers and estimators take it")
        if self.process_name in ("bridge", "nearest_neighbour") and self.rates is None:
            raise ValueError(f"a {self.process_name} model's process lives in its weights: build its spec with "
                             f"DiffusionSpec.of(model), not from the config alone")
        if self.process_name == "bridge":
            from .markov_bridge import BridgeProcess, BridgeRate

            sigma_end = float(self.schedule.total_noise(torch.ones((), dtype=torch.float64)))
            return BridgeProcess(BridgeRate(self.num_states, tensors=self.rates), sigma_end)
        if self.process_name == "nearest_neighbour":
            return _neighbour_process(self.rates)
        return get_process(self.process_name, self.num_tokens)


def _neighbour_process(graph: Any) -> Process:
    """The :class:`~diffusion.structured.SymmetricRateProcess` of a model's neighbour lists, kept on the graph module
    while its spectrum is unchanged (:meth:`~diffusion.modeling_ddit.NeighbourGraph.spectrum`)."""
    from .structured import SymmetricRateProcess

    rate, eigenvalues, vectors = graph.spectrum()
    cached = graph.__dict__.get("_process")
    if cached is None or cached[0] is not vectors:
        cached = (vectors, SymmetricRateProcess(rate, spectrum=(eigenvalues, vectors)))
        graph.__dict__["_process"] = cached
    return cached[1]
