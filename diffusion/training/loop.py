"""The training loop: one code path for one CPU, several CPU processes (gloo) and multi-GPU DDP.

Determinism is built in rather than saved: the batch of global step ``s`` and its noise (t and the
masks) are pure functions of ``(seed, s)`` (:func:`~diffusion.training.seeding.derive_generator`), drawn
for the *global* batch on every rank, and each rank scores its own rows.  Hence two ranks with batch B
follow one process with batch 2B, and a resumed run follows an uninterrupted one bit for bit: only the
weights, optimizer, LR schedule, EMA and the global torch RNG (dropout) travel through the checkpoint.

:func:`train` reads as its steps: build, resume, then per step :func:`_optimizer_step`, logging,
:func:`_evaluate`, :meth:`RunOutput.save`; at the end :func:`export_final`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..block_diffusion import BlockDiffusionObjective
from ..duo_curriculum import DuoCurriculum
from ..duo_distill import DuoDistillation
from ..data import load_tokenizer
from ..data.split_record import check_unchanged, write_record
from ..data.tokenizer import parse_trained_vocab
from ..evaluation.autoregressive import AutoregressiveObjective, build_causal_lm
from ..evaluation.held_out import scored_bytes
from ..modeling_ddit import DDiTConfig, DDiTModel
from ..glauber import GlauberObjective, GlauberProcess
from ..markov_bridge import BridgeObjective, BridgeRate
from ..structured import nearest_neighbours
from ..objectives import DiffusionObjective
from ..spec import DiffusionSpec
from .checkpoint import (
    CheckpointError,
    check_resumable,
    checkpoint_run_id,
    find_latest_checkpoint,
    is_complete,
    load_tensors,
    load_train_state,
    read_json,
)
from .config import RESUMABLE_CHANGES, TrainConfig
from .distributed import clip_gradients, end_distributed, resolve_distributed, shard_model
from .init_model import load_init_model, load_token_embeddings
from .run_data import RunData, load_run_data
from .run_folder import claim_run_folder
from .run_output import Preemption, RunOutput, export_final, log_eval, shared_run_id, stop_diverged
from .ema import EMA
from .seeding import derive_generator

__all__ = ["TrainResult", "build_model_and_objective", "build_model_config", "evaluate_loss", "held_out_objective",
           "lr_factor", "resolve_precision", "train"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    step: int
    final_dir: Path | None
    eval_loss: float | None
    metrics_path: Path


def lr_factor(step: int, config: Any) -> float:
    """Multiplier of the peak LR at optimizer step ``step``: linear warm-up, then cosine to min_lr_ratio (``config``:
    any run config with ``resolved_warmup_steps``, ``max_steps`` and ``min_lr_ratio``)."""
    warmup = config.resolved_warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, config.max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ----- build ---------------------------------------------------------------------------------------------

def build_model_config(config: TrainConfig, tokenizer: Any) -> DDiTConfig:
    """The model a run trains: the absorbing process uses every tokenizer id (MASK last); the uniform
    process leaves the MASK id out of its state space."""
    schedule, schedule_kwargs = config.resolved_schedule
    with_mask = config.process in ("absorbing", "bridge")  # MASK is the last state
    return DDiTConfig(
        vocab_size=len(tokenizer) if with_mask else len(tokenizer) - 1,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        cond_dim=config.cond_dim,
        max_position_embeddings=config.max_position_embeddings,
        dropout=config.dropout,
        attention_dropout=config.attention_dropout,
        process=config.process,
        schedule=schedule,
        schedule_kwargs=schedule_kwargs,
        parameterization=config.resolved_parameterization,
        time_conditioning=config.resolved_time_conditioning,
        mask_token_id=tokenizer.mask_token_id if with_mask else None,
        tie_word_embeddings=config.tie_embeddings,
        pad_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation=config.attention,
        trained_length=config.seq_len,
        attention_block_size=config.block_size,
        init_scheme=config.init_scheme,
        constant_modulation=config.constant_modulation,
        **({"scale_by_sigma": False, "glauber_sweeps": config.glauber_sweeps} if config.objective == "glauber" else {}),
        **({"transition_neighbours": config.neighbours} if config.process == "nearest_neighbour" else {}),
    )


def build_model_and_objective(config: TrainConfig, tokenizer: Any, model: torch.nn.Module | None = None,
                              ) -> tuple[torch.nn.Module, Any]:
    """The model a run trains (freshly initialised, or ``model``: the ``init_from`` one) and the objective that
    scores it: block diffusion with ``block_size``, else ``config.objective``."""
    if model is not None and config.objective == "duo_distill":
        spec = DiffusionSpec.of(model)
        if (spec.process_name, spec.parameterization) != ("uniform", "x0"):
            raise ValueError(f"--init-from must be a uniform x0 model (a Duo model) to distil, got process="
                             f"{spec.process_name!r}, parameterization={spec.parameterization!r}")
        base = DiffusionObjective.from_spec(spec, "score_entropy", t_min=config.t_min, antithetic=config.antithetic)
        return model, DuoDistillation(base, copy.deepcopy(model), float(config.distill_dt))
    if model is not None:
        spec = DiffusionSpec.of(model)
        if not spec.masked:
            raise ValueError(f"init_from must be a masked-diffusion model, got process={spec.process_name!r}, "
                             f"parameterization={spec.parameterization!r}")
        return model, _diffusion_objective(config, spec)
    if config.objective == "autoregressive":
        model = build_causal_lm(vocab_size=len(tokenizer), hidden_size=config.hidden_size,
                                num_layers=config.num_layers, num_heads=config.num_heads,
                                max_positions=config.max_position_embeddings, mlp_ratio=config.mlp_ratio,
                                tie_word_embeddings=config.tie_embeddings, eos_token_id=tokenizer.eos_token_id,
                                attn_implementation=config.attention, trained_length=config.seq_len)
        return model, AutoregressiveObjective(len(tokenizer))
    model = DDiTModel(build_model_config(config, tokenizer))
    if config.process == "nearest_neighbour":  # the graph is part of the model: it is set before the objective reads it
        embeddings = load_token_embeddings(config.transition_embeddings, model.config.num_tokens,
                                           trust_remote_code=config.trust_remote_code)
        model.neighbour_graph.neighbours.copy_(nearest_neighbours(embeddings, config.neighbours))
    return model, _diffusion_objective(config, DiffusionSpec.of(model))


def _diffusion_objective(config: TrainConfig, spec: DiffusionSpec) -> Any:
    if spec.process_name == "bridge":  # score learning and matrix learning in one loss (diffusion/markov_bridge.py)
        return BridgeObjective(DiffusionObjective.from_spec(spec, config.objective, t_min=config.t_min,
                                                            antithetic=config.antithetic))
    if config.objective == "glauber":
        return GlauberObjective(GlauberProcess(spec.num_tokens, config.seq_len, config.glauber_sweeps), spec.mask_id)
    if config.objective == "duo":
        base = DiffusionObjective.from_spec(spec, "score_entropy", t_min=config.t_min, antithetic=config.antithetic)
        end = config.duo_curriculum_steps or max(2, config.max_steps // 2)
        return DuoCurriculum(base, end=end, anneal_from=end // 2)
    if config.block_size is not None:
        return BlockDiffusionObjective.from_spec(spec, config.block_size, t_low=config.t_min, t_high=config.t_max,
                                                 antithetic=config.antithetic)
    return DiffusionObjective.from_spec(spec, config.objective, t_min=config.t_min, antithetic=config.antithetic,
                                        discrete_time=config.discrete_time, hybrid=float(config.hybrid_lambda))


def held_out_objective(objective: Any, time_free: bool = False) -> Any:
    """The objective held-out evaluation uses: block diffusion's clipped range widened to the bound's ``t_high = 1``;
    for a time-free masked model (``time_free``) trained with the continuous ``masked_elbo``, the exact-count
    (``ardm``) estimator of the same bound.

    Why the exact count: a time-free model's continuous bound ``int_0^1 (1/t) E_{x_t ~ Bernoulli(t) masks}
    [sum_{i masked} -log p(x0^i | x_t)] dt`` puts weight ``int_0^1 t^{m-1} (1-t)^{D-m} dt = 1 / (m C(D, m))`` on
    each set of m masked positions out of D, which is what drawing m uniform on ``1..D``, a uniform set of that
    size and the weight ``D / m`` gives: the same expectation (tested in float64 on an enumerated toy), without
    the heavy tail of ``1/t`` at a small t with one masked token.  On the main job's 256 held-out blocks, four
    evaluation seeds of one model spread over 0.66 nats with Bernoulli masks and 0.11 with exact counts.
    (The loglinear schedule's ``eps`` and ``t_min`` leave out two slivers of the continuous bound, of order
    1e-3 of it; the exact count has neither.)"""
    if time_free and isinstance(objective, DiffusionObjective) and objective.objective == "masked_elbo" \
            and objective.discrete_time is None:
        return dataclasses.replace(objective, objective="ardm")
    if isinstance(objective, BlockDiffusionObjective) and objective.t_high < 1.0:
        return dataclasses.replace(objective, t_high=1.0)
    if isinstance(objective, (DuoCurriculum, DuoDistillation)):  # the x0 model's own ELBO is the bound
        return objective.base
    return objective


@dataclass
class _State:
    """What a run updates: the model (``wrapped`` by DDP when several processes share it; FSDP shards it in place),
    its optimizer (``stepper``: accelerate's wrapper of it, or itself), LR schedule, EMA and counters.  ``step``
    is the number of optimizer steps taken (skipped ones included); ``counters["blocks_consumed"]`` the data
    position."""

    model: Any
    wrapped: Any
    objective: Any
    eval_objective: Any
    optimizer: Any
    stepper: Any
    scheduler: Any
    ema: EMA | None
    mode: str
    step: int = 0
    counters: dict[str, Any] = field(default_factory=lambda: {"tokens_seen": 0, "skipped_steps": 0,
                                                              "blocks_consumed": 0})


def _build(config: TrainConfig, tokenizer: Any, mode: str, acc: Any, init_model: Any = None) -> _State:
    """Model, objective, optimizer, LR schedule and EMA; under FSDP the model is sharded before the optimizer and
    the EMA are made, so that both hold shards too.  ``init_model``: the model ``init_from`` gave."""
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model, objective = build_model_and_objective(config, tokenizer, init_model)
    if isinstance(objective, DuoDistillation):
        objective.teacher.to(acc.device)
    if config.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if mode == "fsdp":
        shard_model(model.to(acc.device), acc.device, bf16=resolve_precision(config) == "bf16")
    # fused: one kernel over all parameters (CPU and CUDA), 4-5x faster than the foreach loop on a CPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_eps, weight_decay=config.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
    time_free = not getattr(model.config, "needs_sigma", True)
    return _State(model, model, objective, held_out_objective(objective, time_free), optimizer, optimizer, scheduler,
                  ema, mode)


def _prepare(state: _State, acc: Any) -> None:
    """Hand the model to DDP (``ddp``, ``none``: accelerate's device placement); FSDP needs nothing more."""
    if state.mode != "fsdp":
        state.wrapped, state.stepper = acc.prepare(state.model, state.optimizer)


def resolve_precision(config: Any) -> str:
    """The precision a run uses: ``config.precision``, with auto as bf16 where the device computes it fast."""
    if config.precision != "auto":
        if config.precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("precision='fp16' has no fast kernels on the CPU (about 80x slower); use bf16 or no")
        return config.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no"


def _accelerator(config: TrainConfig) -> tuple[Any, str]:
    """The accelerator and the distributed mode (see :mod:`diffusion.training.distributed`).

    Under FSDP the precision is FSDP's own policy, so accelerate runs without autocast.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType

    world = PartialState(cpu=not torch.cuda.is_available()).num_processes
    mode = resolve_distributed(config.distributed, world)
    log_with = None if config.report_to == "none" else config.report_to
    # cpu=True on GPU-less machines lets torchrun / accelerate launch ranks form a gloo group (MULTI_CPU).
    acc = Accelerator(mixed_precision="no" if mode == "fsdp" else resolve_precision(config), log_with=log_with,
                      project_dir=config.output_dir, cpu=not torch.cuda.is_available())
    if acc.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        raise ValueError(f"accelerate's distributed type {acc.distributed_type} is not used by this loop: launch "
                         "plain processes (torchrun, or accelerate launch without an FSDP/DeepSpeed config) and choose "
                         "--distributed ddp or fsdp")
    if log_with:
        acc.init_trackers("ddlm", config={k: str(v) for k, v in config.to_dict().items()})
    return acc, mode


# ----- resume --------------------------------------------------------------------------------------------

def _resolve_resume(config: TrainConfig, root: Path) -> Path | None:
    if not config.resume:
        return None
    if config.resume == "auto":
        return find_latest_checkpoint(root)
    path = Path(config.resume)
    if not path.exists():
        raise FileNotFoundError(f"resume checkpoint does not exist: resume={config.resume!r}")
    if not is_complete(path):
        raise CheckpointError(f"resume checkpoint is incomplete (no COMPLETE marker): resume={config.resume!r}")
    return path


def _restore_rng(path: Path, rank: int, allow_inexact: bool) -> None:
    rng_file = path / f"rng-{rank}.safetensors"
    if not rng_file.is_file():
        if allow_inexact:
            logger.warning("checkpoint %s has no RNG state (%s): resuming inexactly, as allow_inexact_resume asks",
                           path, rng_file.name)
            return
        raise CheckpointError(f"checkpoint {path} has no RNG state ({rng_file.name}), so the resumed run would not "
                              "repeat the original; pass --allow-inexact-resume true to resume anyway")
    rng = load_tensors(rng_file)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))


def _resume(path: Path, state: _State, config: TrainConfig, acc: Any) -> None:
    """Load a checkpoint into ``state`` (weights, EMA, optimizer, LR schedule, counters, RNG).

    Any checkpoint loads into any mode (one process, DDP, FSDP) and is resharded to the run's processes; with
    another number of processes than the writer's, the run cannot repeat the original (each rank's dropout
    stream and share of the batch change), so that needs ``--allow-inexact-resume``.
    """
    saved = read_json(path / "trainer_state.json")
    # a checkpoint written before a field existed ran with that field's old (and default) behaviour
    written = {"init_scheme": "normal", "constant_modulation": False, **saved.get("config", {})}
    check_resumable(written, config.to_dict(), RESUMABLE_CHANGES, path)
    written_by = saved.get("num_processes")
    if written_by != acc.num_processes and not config.allow_inexact_resume:
        raise CheckpointError(
            f"checkpoint {path} was written by {written_by} processes, this run has {acc.num_processes}: resume "
            f"with {written_by} processes to continue exactly, or pass --allow-inexact-resume true to reshard it "
            "(the dropout streams and each rank's rows then differ from the original run)")
    load_train_state(path, state.model, state.optimizer, state.ema)
    if state.ema is not None:
        state.ema.num_updates = int(saved["ema_updates"])
    state.scheduler.load_state_dict(saved["scheduler"])
    _restore_rng(path, acc.process_index, config.allow_inexact_resume or written_by != acc.num_processes)
    state.step = saved["step"]
    global_batch = config.batch_size * (written_by or 1) * config.grad_accum_steps
    state.counters = {"tokens_seen": saved.get("tokens_seen", 0), "skipped_steps": saved.get("skipped_steps", 0),
                      "blocks_consumed": saved.get("blocks_consumed", state.step * global_batch),
                      "stream_positions": saved.get("stream_positions")}


# ----- one step, evaluation, export ----------------------------------------------------------------------

def _optimizer_step(state: _State, objective: Any, x0_global: Tensor, xt_global: Tensor, t_global: Tensor,
                    config: TrainConfig, acc: Any) -> tuple[Tensor, Tensor, bool]:
    """Forward/backward of ``objective`` (the run's objective at this step) over this rank's micro-batches of the
    global batch, then an optimizer step unless the loss or the gradient norm is non-finite on any rank.  Returns
    ``(loss, grad_norm, skipped)``."""
    world, micro = acc.num_processes, config.batch_size
    step_loss = torch.zeros((), dtype=torch.float64, device=acc.device)
    fsdp = state.mode == "fsdp"
    for m in range(config.grad_accum_steps):
        rows = slice((m * world + acc.process_index) * micro, (m * world + acc.process_index + 1) * micro)
        x0, xt, t = (v[rows].to(acc.device) for v in (x0_global, xt_global, t_global))
        last = m == config.grad_accum_steps - 1
        if fsdp:  # FSDP reduce-scatters the gradients only after the last micro-step
            state.model.set_requires_gradient_sync(last)
            sync_context = nullcontext()
        else:
            sync_context = acc.no_sync(state.wrapped) if not last else nullcontext()
        with sync_context, acc.autocast():
            out = objective.loss(state.wrapped, x0, xt, t)
            acc.backward(out.loss / config.grad_accum_steps)
        step_loss += out.loss.detach().double() / config.grad_accum_steps
    # The norm is always computed (max_norm=inf clips nothing) so that non-finite gradients are caught.
    max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
    grad_norm = clip_gradients(state.model.parameters(), max_norm) if fsdp else \
        acc.clip_grad_norm_(state.wrapped.parameters(), max_norm)
    bad = torch.tensor(float(not (torch.isfinite(step_loss) and torch.isfinite(grad_norm))), device=acc.device)
    skipped = acc.reduce(bad, reduction="sum").item() > 0  # every rank skips together
    if not skipped:
        state.stepper.step()
        state.scheduler.step()
        if state.ema is not None:
            state.ema.update(state.model)
    state.stepper.zero_grad(set_to_none=True)
    return step_loss, grad_norm, skipped


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, objective: DiffusionObjective, blocks: Tensor, batch_size: int, seed: int,
    accelerator: Any = None,
) -> float:
    """Mean held-out loss (nats per token) with noise fixed by ``seed``: comparable across evaluations
    and the same for any number of ranks (batch i is drawn with its own generator; rank i % world runs it).

    Every rank makes the same number of forward passes (a rank out of batches repeats the last one and counts
    nothing), because a sharded model gathers its weights across all ranks in every pass.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    starts = list(range(0, len(blocks), batch_size))
    for turn in range(-(-len(starts) // world)):
        index = turn * world + rank
        counted = index < len(starts)
        index = min(index, len(starts) - 1)
        x0 = blocks[starts[index] : starts[index] + batch_size]
        t, xt = objective.corrupt(x0, generator=derive_generator(seed, index, "eval"))
        context = accelerator.autocast() if accelerator else nullcontext()
        with context:
            out = objective.loss(model, x0.to(device), xt.to(device), t.to(device))
        if counted:
            total += torch.tensor([out.per_sequence.double().sum().item(), out.num_tokens], dtype=torch.float64,
                                  device=device)
    if hasattr(model, "reshard"):  # FSDP keeps the root's weights gathered after a forward without backward
        model.reshard()
    if accelerator is not None and world > 1:
        total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    return (total[0] / total[1]).item()


def _evaluate(state: _State, blocks: Tensor, config: TrainConfig, acc: Any) -> float:
    """Held-out loss of the EMA weights (of the raw weights when EMA is off)."""
    weights = state.ema.applied(state.model) if state.ema is not None else nullcontext(state.model)
    with weights as model:
        return evaluate_loss(model, state.eval_objective, blocks, config.eval_batch_size, config.seed, acc)


# ----- the run -------------------------------------------------------------------------------------------

def train(config: TrainConfig) -> TrainResult:
    """Train a denoiser as ``config`` says; returns where the final model went and the last held-out loss.

    The run holds its folder for its lifetime (:mod:`diffusion.training.run_folder`): a second run into it is
    refused, and so is a fresh run into a folder holding a previous run, unless ``overwrite`` replaces it."""
    resume_path = _resolve_resume(config, Path(config.output_dir) / "checkpoints")  # a bad path fails before any work
    # A resumed run keeps its id; a checkpoint whose files name different runs is refused here.
    run_id = checkpoint_run_id(resume_path) if resume_path is not None else None
    acc, mode = _accelerator(config)
    run_id = run_id or shared_run_id(acc)
    lock = claim_run_folder(Path(config.output_dir), fresh=not config.resume, overwrite=config.overwrite,
                            accelerator=acc)
    try:
        return _train(config, resume_path, acc, mode, run_id)
    finally:
        lock.release()


def _train(config: TrainConfig, resume_path: Path | None, acc: Any, mode: str, run_id: str) -> TrainResult:
    run = RunOutput(config, acc, run_id)
    init_model, init_tokenizer = load_init_model(config) if config.init_from else (None, None)
    positions = read_json(resume_path / "trainer_state.json").get("stream_positions") if resume_path else None
    if resume_path is not None and parse_trained_vocab(config.resolved_tokenizer) is not None:
        init_tokenizer = load_tokenizer(str(resume_path / "tokenizer"))  # the one this run trained, not a retrain
    data: RunData = load_run_data(config, acc, stream_positions=positions, tokenizer=init_tokenizer)
    if data.split_record is not None:
        if resume_path is not None:
            check_unchanged(run.root, data.split_record)
        if acc.is_main_process:
            write_record(run.root, data.split_record)
    state = _build(config, data.tokenizer, mode, acc, init_model)
    if config.process == "bridge":  # its prior starts from the training data's token frequencies, plus one for every
        counts = data.batches.token_counts(state.model.config.vocab_size)  # real token (a held-out token unseen in
        counts[:-1] += 1  # training keeps a finite prior term); MASK (last) has none
        BridgeRate.of_model(state.model).set_data_marginal(counts)
    if resume_path is not None:
        _resume(resume_path, state, config, acc)
        acc.print(f"resumed from {resume_path} at step {state.step}")
    run.write_config()  # after the resume was accepted: a refused one leaves the run's record as it was
    _prepare(state, acc)

    world = acc.num_processes
    global_batch = config.batch_size * world * config.grad_accum_steps
    tokens_per_step = global_batch * config.seq_len
    stop = config.stop_after_steps or config.max_steps
    num_params = sum(_numel(p) for p in state.model.parameters())
    precision = "bf16 (FSDP policy)" if mode == "fsdp" and resolve_precision(config) == "bf16" else \
        ("no" if mode == "fsdp" else acc.mixed_precision)
    origin = f" from {config.init_from}" if config.init_from else ""
    acc.print(f"model{origin}: {num_params / 1e6:.2f}M parameters | train blocks/step {global_batch} x {config.seq_len} | "
              f"held-out blocks {len(data.valid_blocks)} | precision {precision} | processes {world} ({mode})")

    eval_loss = None
    held_out_bytes = scored_bytes(data.valid_blocks, data.tokenizer, skip_first=config.objective == "autoregressive")
    if state.step == 0 and config.eval_every:
        eval_loss = _evaluate(state, data.valid_blocks, config, acc)
        log_eval(run, 0, eval_loss, config, held_out_bytes)
    bar = tqdm(total=config.max_steps, initial=state.step, disable=not (acc.is_main_process and config.progress),
               desc="train", dynamic_ncols=True)
    window_loss = torch.zeros((), dtype=torch.float64, device=acc.device)
    window_steps, window_start, consecutive_skips = 0, time.perf_counter(), 0
    state.wrapped.train()
    preemption = Preemption(run.ckpt_root)  # SIGTERM or Ctrl-C: finish the step, checkpoint, exit cleanly
    try:
        while state.step < stop:
            x0_global = data.global_batch(state.counters["blocks_consumed"], global_batch, acc)
            state.counters["blocks_consumed"] += global_batch
            objective = state.objective.at_step(state.step) if hasattr(state.objective, "at_step") else state.objective
            t_global, xt_global = objective.corrupt(x0_global, generator=derive_generator(config.seed, state.step, "batch"))
            if config.anneal_steps:
                state.model.set_step(state.step)
            step_loss, grad_norm, skipped = _optimizer_step(state, objective, x0_global, xt_global, t_global, config, acc)
            state.step += 1
            done = state.step
            if skipped:
                state.counters["skipped_steps"] += 1
                consecutive_skips += 1
                run.log({"step": done, "skipped": True, "skipped_steps": state.counters["skipped_steps"],
                         "loss": float(step_loss), "grad_norm": float(grad_norm)})
                if consecutive_skips >= config.max_consecutive_skips:
                    raise stop_diverged(run, consecutive_skips, done)
            else:
                consecutive_skips = 0
                window_loss += step_loss
                window_steps += 1
                state.counters["tokens_seen"] += tokens_per_step

            if (done % config.log_every == 0 or done == stop) and window_steps > 0:
                loss = acc.reduce(window_loss, reduction="mean").item() / window_steps
                elapsed = time.perf_counter() - window_start
                record = {"step": done, "loss": loss, "lr": state.scheduler.get_last_lr()[0],
                          "tokens_per_s": window_steps * tokens_per_step / max(elapsed, 1e-9),
                          "tokens_seen": state.counters["tokens_seen"], "grad_norm": float(grad_norm)}
                run.log(record)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                window_loss.zero_()
                window_steps, window_start = 0, time.perf_counter()
            bar.update(1)

            if (config.eval_every and done % config.eval_every == 0) or done == stop:
                eval_loss = _evaluate(state, data.valid_blocks, config, acc)
                log_eval(run, done, eval_loss, config, held_out_bytes)
            saved = (config.save_every and done % config.save_every == 0) or done == stop
            if saved:
                run.save(state, data.tokenizer, data)
            if preemption.requested(acc) and done < stop:
                if not saved:
                    run.save(state, data.tokenizer, data)
                bar.close()
                print(f"ddlm-train: received {preemption.signal_name}: checkpoint saved at step {done} in "
                      f"{run.ckpt_root}; continue with --resume auto", file=sys.stderr, flush=True)
                end_distributed(acc)
                return TrainResult(step=done, final_dir=None, eval_loss=eval_loss, metrics_path=run.metrics_path)
    finally:
        bar.close()
        preemption.restore()

    final_dir = export_final(run, state, data) if stop == config.max_steps else None
    end_distributed(acc)
    return TrainResult(step=stop, final_dir=final_dir, eval_loss=eval_loss, metrics_path=run.metrics_path)


def _numel(parameter: Tensor) -> int:
    """Elements of a parameter, whole even when it is a shard."""
    return parameter.numel() if not hasattr(parameter, "full_tensor") else int(torch.Size(parameter.shape).numel())
