"""``TrainConfig``: every knob of a training run, with help text and validation that names bad values.

The user's config is never rewritten: values left on ``auto`` are resolved by properties.
"""

from __future__ import annotations

import codecs
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..data.loading import TEXT_SPLITS
from ..data.prepare import is_prepared
from ..data.tokenizer import parse_trained_vocab
from ..modeling_ddit import INIT_SCHEMES
from ..objectives import MASKED_OBJECTIVES, OBJECTIVES
from ..processes import MODEL_PROCESSES
from ..schedules import SCHEDULES, get_schedule
from .distributed import DISTRIBUTED

TRAIN_OBJECTIVES = (*OBJECTIVES, "duo", "duo_distill", "glauber", "autoregressive")  # autoregressive: the causal-LM baseline of the same size

__all__ = ["PRECISIONS", "RESUMABLE_CHANGES", "TRAIN_OBJECTIVES", "TrainConfig"]

PRECISIONS = ("auto", "no", "bf16", "fp16")

# Fields a resumed run may change (bookkeeping); every other field must match the checkpoint's.
RESUMABLE_CHANGES = frozenset({
    "output_dir", "eval_every", "eval_blocks", "eval_batch_size", "log_every", "save_every", "keep_last",
    "resume", "stop_after_steps", "report_to", "progress", "attention", "max_consecutive_skips",
    "allow_inexact_resume", "distributed", "gradient_checkpointing", "trust_remote_code", "overwrite",
})


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class TrainConfig:
    """A training run of a discrete diffusion LM."""

    # where
    output_dir: str = _f("runs/ddlm", "folder for checkpoints, metrics.jsonl and the final model")
    # data
    dataset: str = _f("builtin:shakespeare", "builtin:shakespeare, builtin:shakespeare-full, a local file/folder, or a datasets Hub name")
    dataset_config: str | None = _f(None, "configuration name for a Hub dataset (None: the dataset's default)")
    text_column: str = _f("text", "column holding the text (json/parquet/Hub datasets)")
    text_split: str = _f("paragraph", ".txt/.md files: what a document is: a paragraph (lines between blank lines), "
                                      "a line, or a whole file", choices=list(TEXT_SPLITS))
    encoding: str = _f("utf-8", ".txt/.md files: their text encoding (latin-1, cp1252, ...)")
    trust_remote_code: bool = _f(False, "let a --tokenizer or --init-from folder run its own code (auto_map); "
                                        "read that code first")
    valid_fraction: float = _f(0.02, "fraction of documents held out when the source has no validation split")
    streaming: bool = _f(False, "stream a Hub dataset instead of loading it into memory")
    stream_shards: int = _f(8, "streaming: the stream is cut into this many shards (datasets' split_dataset_by_node), "
                               "dealt to the ranks; each shard's position is checkpointed, so a resume with another "
                               "number of processes neither repeats nor skips a block")
    tokenizer: str = _f("auto", "tokenizer: 'builtin' (shipped BPE, 4096 + mask), a local folder, a Hub id, or "
                                "'train:VOCAB_SIZE' (a byte-level BPE trained on this run's training documents only, "
                                "saved with the run); auto: builtin, or the --init-from model's own")
    seq_len: int = _f(128, "tokens per training block")
    # model
    init_from: str | None = _f(None, "start from this model instead of a fresh one: a causal LM (LLaMA, Qwen, GPT-2, "
                                     "an autoregressive baseline; converted on the fly, see diffusion/convert.py), a "
                                     "model ddlm-convert wrote, or a ddit model; its architecture replaces the model "
                                     "flags below (None: a fresh model)")
    shift_logits: bool = _f(True, "--init-from a causal LM: the output at position i-1 predicts token i (the "
                                  "next-token alignment the model was trained with)")
    anneal_steps: int = _f(0, "--init-from a causal LM: training steps over which its attention goes from causal to "
                              "bidirectional (0: bidirectional from the start)")
    hidden_size: int = _f(256, "transformer width")
    num_layers: int = _f(4, "number of transformer blocks")
    num_heads: int = _f(4, "attention heads")
    cond_dim: int = _f(128, "noise-embedding width (time-conditioned models)")
    mlp_ratio: float = _f(4.0, "MLP width as a multiple of hidden_size")
    dropout: float = _f(0.0, "dropout on attention and MLP outputs")
    attention_dropout: float | None = _f(None, "dropout on attention probabilities (None: --dropout; SEDD and MDLM "
                                               "train with 0)")
    tie_embeddings: bool = _f(False, "share the output head with the token embedding")
    init_scheme: str = _f("normal", "initialisation of a fresh model: normal (N(0, 0.02), GPT-2's residual scaling) or "
                                    "fan_in (the reference DiT code's: PyTorch's default Linear init, a zero head)",
                        choices=list(INIT_SCHEMES))
    constant_modulation: bool = _f(False, "a time-free model keeps adaLN-zero modulations fed a learnt constant "
                                          "(MDLM's time-free DIT); needs --time-conditioning off or auto for subs")
    max_position_embeddings: int = _f(1024, "longest sequence the model will accept")
    attention: str = _f("sdpa", "attention implementation: sdpa (scaled_dot_product_attention) or eager (faster on "
                        "CPUs in bf16)", choices=["sdpa", "eager"])
    gradient_checkpointing: bool = _f(False, "recompute each block's activations in the backward pass: same loss and "
                                             "gradients, less memory, about a third more compute")
    # diffusion
    process: str = _f("absorbing", "forward process: absorbing, uniform, bridge (the Discrete Markov Bridge: a "
                                   "score model trained with score_entropy while it learns its rate matrix, which "
                                   "starts as the absorbing process) or nearest_neighbour (D3PM's nearest-neighbour "
                                   "transitions between the real tokens, from --transition-embeddings)",
                      choices=list(MODEL_PROCESSES))
    transition_embeddings: str | None = _f(None, "with process nearest_neighbour: a model (a ddit folder or a causal "
                                                 "LM, e.g. the autoregressive baseline, with this run's tokenizer) "
                                                 "whose input embeddings define each token's neighbours by cosine "
                                                 "similarity (None: no nearest-neighbour process)")
    neighbours: int = _f(8, "with process nearest_neighbour: neighbours per token (the rate is 1 between neighbours "
                            "either way)")
    objective: str = _f("masked_elbo", "loss: masked_elbo (MDLM/RADD), ardm (order-agnostic ARDM: exactly m of D "
                                       "positions masked, weight D/m), score_entropy (SEDD), duo (Duo's curriculum for a "
                                       "uniform x0 model), duo_distill (a round of Duo's consistency distillation of --init-from); "
                                       "autoregressive trains the LLaMA-style causal-LM baseline of "
                                       "the same width and depth",
                        choices=list(TRAIN_OBJECTIVES))
    parameterization: str = _f("auto", "model output: subs (log p(x0|x_t), absorbing), x0 (log p(x0|x_t), uniform: "
                                       "D3PM's uniform chain, UDLM/Duo's ELBO with score_entropy), score (log-scores) "
                                       "or auto (subs for masked_elbo and ardm, else score)",
                               choices=["auto", "subs", "x0", "score"])
    time_conditioning: str = _f("auto", "adaLN noise conditioning: on, off or auto (on for score and x0, off for subs)",
                                choices=["auto", "on", "off"])
    schedule: str = _f("auto", "noise schedule, or auto (loglinear absorbing, geometric uniform)",
                       choices=["auto", *sorted(SCHEDULES)])
    schedule_kwargs: dict | None = _f(None, "schedule arguments as JSON, e.g. '{\"eps\": 1e-3}' (None: eps 1e-3 for "
                                            "loglinear, sigma 1e-4 to 20 for geometric, the schedule's own otherwise)")
    t_min: float = _f(1e-3, "smallest diffusion time drawn in training, t ~ U(t_min, t_max)")
    t_max: float = _f(1.0, "largest diffusion time drawn in training (below 1: block diffusion's clipped range; the "
                           "held-out bound always integrates over (t_min, 1))")
    block_size: int | None = _f(None, "block diffusion (BD3-LM): tokens per block, dividing seq_len; each block is "
                                      "denoised given the clean blocks before it (None: one block, MDLM)")
    antithetic: bool = _f(True, "stratified (low-discrepancy) draws of t across the global batch")
    duo_curriculum_steps: int | None = _f(None, "with objective duo: steps of Duo's curriculum (the tempered softmax "
                                                "of the Gaussian latent as input; its temperature falls from 0.1 to "
                                                "0.01 over the second half), then the x0 model's plain ELBO (None: "
                                                "half of max_steps)")
    distill_dt: float | None = _f(None, "with objective duo_distill: the round's time step dt in (0, 1] (Duo doubles "
                                        "it each round from 1/64); the teacher is the --init-from model (None: no distillation)")
    glauber_sweeps: int = _f(4, "with objective glauber: sweeps R of the round-robin noising (R x seq_len steps, "
                                "the sampler's network calls)")
    discrete_time: int | None = _f(None, "D3PM: train on T discrete steps (the T-step bound L_vb of a model that "
                                         "predicts x0: absorbing with masked_elbo, or uniform with parameterization "
                                         "x0; None: continuous time)")
    hybrid_lambda: float = _f(0.0, "D3PM's hybrid loss: weight of -log p(x0 | x_t) added to L_vb (needs "
                                   "discrete_time; the paper used 0.01 for text)")
    # optimisation
    batch_size: int = _f(32, "blocks per device per micro-step")
    grad_accum_steps: int = _f(1, "micro-steps per optimizer step")
    max_steps: int = _f(2000, "optimizer steps of the whole run (sets the LR schedule)")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    warmup_steps: int | None = _f(None, "linear warm-up steps (None: 10% of max_steps, at most 100)")
    min_lr_ratio: float = _f(0.1, "cosine decay floor as a fraction of lr")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "gradient-norm clipping threshold (0 turns it off)")
    allow_inexact_resume: bool = _f(False, "resume from a checkpoint without RNG state (the run will not repeat "
                                           "the original exactly)")
    max_consecutive_skips: int = _f(10, "a step whose loss or gradients are NaN/inf is skipped (no optimizer, "
                                        "scheduler or EMA update); after this many in a row the run stops")
    ema_decay: float = _f(0.999, "EMA decay of the weights used for evaluation and the final model (0 turns EMA off)")
    precision: str = _f("auto", "no (float32), bf16, fp16 (GPU only) or auto (bf16 where the device has fast bf16)",
                        choices=list(PRECISIONS))
    distributed: str = _f("auto", "how several processes share the work: ddp (whole model on every rank), fsdp "
                                  "(FSDP2: weights, gradients and optimizer state sharded), none, or auto (ddp when "
                                  "launched with several processes)", choices=list(DISTRIBUTED))
    seed: int = _f(0, "seed of initialisation, data order and noise")
    # bookkeeping
    eval_every: int = _f(250, "steps between held-out evaluations (0: only at the end)")
    eval_blocks: int = _f(256, "held-out blocks per evaluation")
    eval_batch_size: int = _f(64, "blocks per evaluation forward pass")
    log_every: int = _f(10, "steps between metric records")
    save_every: int = _f(500, "steps between checkpoints (0: only at the end)")
    keep_last: int = _f(2, "checkpoints kept on disk")
    overwrite: bool = _f(False, "replace the run already in output_dir (its checkpoints, final model and metrics "
                                "are deleted); without it a fresh run into a used folder is refused")
    resume: str = _f("", "'' (fresh run), 'auto' (newest complete checkpoint in output_dir, if any) or a checkpoint path")
    stop_after_steps: int | None = _f(None, "stop (after a checkpoint) at this step without changing the schedule "
                                            "(None: run to max_steps)")
    report_to: str = _f("none", "also log through accelerate trackers", choices=["none", "tensorboard", "wandb", "all"])
    progress: bool = _f(True, "show a progress bar on the main process")

    def __post_init__(self) -> None:
        for f in fields(self):  # the named choices first: a typo is the likeliest mistake
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {list(choices)}, got {f.name}={getattr(self, f.name)!r}")
        positive = ("max_consecutive_skips", "stream_shards", "seq_len", "hidden_size", "num_layers", "num_heads", "cond_dim", "batch_size",
                    "grad_accum_steps", "max_steps", "eval_blocks", "eval_batch_size", "log_every",
                    "keep_last", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        for name in ("eval_every", "save_every", "warmup_steps"):
            value = getattr(self, name)
            if value is None and name == "warmup_steps":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {name}={value!r}")
        for f in fields(self):  # inf and NaN pass every comparison below or none: refuse them by name first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {f.name}={value!r}")
        checks = [
            ("seq_len", self.seq_len >= 2, "must be >= 2"),
            ("seq_len", self.seq_len <= self.max_position_embeddings,
             f"must not exceed max_position_embeddings={self.max_position_embeddings}"),
            ("lr", 0 < self.lr <= 1, "must be in (0, 1] (AdamW's step size; larger only diverges)"),
            ("t_min", 0 < self.t_min < 1, "must be in (0, 1)"),
            ("t_max", self.t_min < self.t_max <= 1, f"must be in (t_min={self.t_min}, 1]"),
            ("valid_fraction", 0 < self.valid_fraction < 1, "must be in (0, 1)"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("ema_decay", 0 <= self.ema_decay < 1, "must be in [0, 1)"),
            ("dropout", 0 <= self.dropout < 1, "must be in [0, 1)"),
            ("attention_dropout", self.attention_dropout is None or 0 <= self.attention_dropout < 1,
             "must be in [0, 1) or None"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("warmup_steps", self.resolved_warmup_steps <= self.max_steps, f"must not exceed max_steps={self.max_steps}"),
            ("hidden_size", self.hidden_size % self.num_heads == 0 and (self.hidden_size // self.num_heads) % 2 == 0,
             f"must split into num_heads={self.num_heads} heads of even size"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise ValueError(f"{name} {message}, got {name}={getattr(self, name)!r}")
        if self.constant_modulation and self.objective != "autoregressive" and self.resolved_time_conditioning:
            raise ValueError("constant_modulation is for a time-free model, but this run's model reads the time "
                             f"(time_conditioning={self.time_conditioning!r}, parameterization="
                             f"{self.resolved_parameterization!r})")
        if self.stop_after_steps is not None and not 1 <= self.stop_after_steps <= self.max_steps:
            raise ValueError(f"stop_after_steps must be in [1, max_steps={self.max_steps}], got {self.stop_after_steps!r}")
        if self.objective in MASKED_OBJECTIVES and self.process != "absorbing":
            raise ValueError(f"objective={self.objective!r} needs process='absorbing', got process={self.process!r}")
        if self.resolved_parameterization == "subs" and self.process != "absorbing":
            raise ValueError(f"parameterization='subs' needs process='absorbing', got process={self.process!r}")
        if self.objective in MASKED_OBJECTIVES and self.resolved_parameterization != "subs":
            raise ValueError(f"objective={self.objective!r} needs parameterization='subs' (or auto), got "
                             f"{self.resolved_parameterization!r}")
        if self.resolved_parameterization == "x0" and self.objective != "duo_distill" and (
                self.process not in ("uniform", "nearest_neighbour") or self.objective not in ("score_entropy", "duo")):
            raise ValueError(f"parameterization='x0' is a uniform or nearest-neighbour model trained with objective="
                             f"'score_entropy' (the continuous ELBO, or with discrete_time D3PM's L_vb) or 'duo' "
                             f"(uniform), got process={self.process!r}, objective={self.objective!r}")
        if self.objective == "glauber":
            if self.process != "absorbing" or self.parameterization == "subs" or self.time_conditioning == "off":
                raise ValueError("objective='glauber' trains a classifier over the absorbing vocabulary (its MASK id "
                                 "marks the visited position) with raw outputs and time input: leave process, "
                                 f"parameterization and time_conditioning at their defaults, got process="
                                 f"{self.process!r}, parameterization={self.parameterization!r}, time_conditioning="
                                 f"{self.time_conditioning!r}")
            if isinstance(self.glauber_sweeps, bool) or not isinstance(self.glauber_sweeps, int) \
                    or self.glauber_sweeps < 1:
                raise ValueError(f"glauber_sweeps must be an int >= 1, got glauber_sweeps={self.glauber_sweeps!r}")
            if self.block_size is not None or self.init_from is not None:
                raise ValueError("objective='glauber' trains a fresh DDiT on full blocks: no block_size or init_from")
        if (self.process == "nearest_neighbour") != (self.transition_embeddings is not None):
            raise ValueError(f"process='nearest_neighbour' and transition_embeddings go together, got process="
                             f"{self.process!r}, transition_embeddings={self.transition_embeddings!r}")
        if self.process == "nearest_neighbour":
            if self.objective != "score_entropy":
                raise ValueError(f"process='nearest_neighbour' trains with objective='score_entropy' (parameterization "
                                 f"score, or x0 with discrete_time for D3PM), got objective={self.objective!r}")
            if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 1:
                raise ValueError(f"neighbours must be an int >= 1, got neighbours={self.neighbours!r}")
            if self.block_size is not None or self.init_from is not None:
                raise ValueError("process='nearest_neighbour' trains a fresh DDiT on full blocks: no block_size or "
                                 "init_from")
        if self.process == "bridge":
            if self.objective != "score_entropy" or self.resolved_parameterization != "score":
                raise ValueError(f"process='bridge' trains a score model with objective='score_entropy', got "
                                 f"objective={self.objective!r}, parameterization={self.parameterization!r}")
            if self.block_size is not None or self.init_from is not None or self.discrete_time is not None:
                raise ValueError("process='bridge' trains a fresh DDiT in continuous time: no block_size, init_from "
                                 "or discrete_time")
            if self.streaming or self.distributed == "fsdp":
                raise ValueError(f"process='bridge' counts the training tokens for its prior and keeps its rates "
                                 f"whole: no streaming and no fsdp, got streaming={self.streaming!r}, distributed="
                                 f"{self.distributed!r}")
        if self.objective == "duo":
            if self.process != "uniform" or self.resolved_parameterization != "x0":
                raise ValueError(f"objective='duo' trains a uniform x0 model: use process='uniform' and "
                                 f"parameterization 'x0' or auto, got process={self.process!r}, parameterization="
                                 f"{self.parameterization!r}")
            steps = self.duo_curriculum_steps
            if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                      or not 2 <= steps <= self.max_steps):
                raise ValueError(f"duo_curriculum_steps must be an int in [2, max_steps={self.max_steps}] or None, got "
                                 f"duo_curriculum_steps={steps!r}")
            if self.block_size is not None or self.init_from is not None or self.discrete_time is not None:
                raise ValueError("objective='duo' trains a fresh DDiT in continuous time: no block_size, init_from "
                                 "or discrete_time")
        if self.discrete_time is not None:
            if isinstance(self.discrete_time, bool) or not isinstance(self.discrete_time, int) or self.discrete_time < 1:
                raise ValueError(f"discrete_time must be an int T >= 1 (or None), got discrete_time={self.discrete_time!r}")
            x0_model = self.objective == "masked_elbo" or self.resolved_parameterization == "x0"
            if not x0_model or self.block_size is not None:
                raise ValueError(f"discrete_time (D3PM) trains a model that predicts x0 (objective='masked_elbo', or "
                                 f"parameterization='x0' with the uniform process) and no block_size, got objective="
                                 f"{self.objective!r}, parameterization={self.parameterization!r}, block_size="
                                 f"{self.block_size!r}")
        if not (isinstance(self.hybrid_lambda, (int, float)) and self.hybrid_lambda >= 0):
            raise ValueError(f"hybrid_lambda must be a number >= 0, got hybrid_lambda={self.hybrid_lambda!r}")
        if self.hybrid_lambda and self.discrete_time is None:
            raise ValueError(f"hybrid_lambda is D3PM's hybrid loss: it needs discrete_time, got "
                             f"hybrid_lambda={self.hybrid_lambda!r} without it")
        self._check_start_and_blocks()
        self._check_trained_tokenizer()
        try:
            codecs.lookup(self.encoding)
        except LookupError as err:
            raise ValueError(f"encoding must be a text encoding Python knows (utf-8, latin-1, cp1252, ...), got "
                             f"encoding={self.encoding!r}") from err
        if self.schedule_kwargs is not None and not isinstance(self.schedule_kwargs, dict):
            raise ValueError(f"schedule_kwargs must be a dict, got schedule_kwargs={self.schedule_kwargs!r}")
        name, kwargs = self.resolved_schedule
        try:
            get_schedule(name, **kwargs)
        except TypeError as err:
            raise ValueError(f"schedule_kwargs={self.schedule_kwargs!r} do not fit schedule {name!r}: {err}") from err

    def _check_start_and_blocks(self) -> None:
        """--init-from, --block-size and --t-max: what they combine with."""
        if self.block_size is not None:
            if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
                raise ValueError(f"block_size must be a positive int or None, got block_size={self.block_size!r}")
            if self.seq_len % self.block_size:
                raise ValueError(f"block_size={self.block_size} must divide seq_len={self.seq_len}")
            if self.objective != "masked_elbo":
                raise ValueError(f"block_size (block diffusion) needs objective='masked_elbo', got {self.objective!r}")
            if self.time_conditioning == "on":
                raise ValueError("block_size (block diffusion) needs time_conditioning off: every block has its own "
                                 "noise level, and the denoiser reads none")
        if self.t_max < 1 and self.block_size is None:
            raise ValueError(f"t_max below 1 (a clipped range) is for block diffusion: set block_size, got "
                             f"t_max={self.t_max!r}")
        if isinstance(self.anneal_steps, bool) or not isinstance(self.anneal_steps, int) or self.anneal_steps < 0:
            raise ValueError(f"anneal_steps must be an int >= 0, got anneal_steps={self.anneal_steps!r}")
        if self.anneal_steps and self.block_size is not None:
            raise ValueError("anneal_steps anneals towards bidirectional attention; block diffusion (block_size) keeps "
                             "its block-causal attention from the start")
        if self.objective == "duo_distill":
            if self.init_from is None or self.distill_dt is None:
                raise ValueError("objective='duo_distill' distils the --init-from model (the teacher, a uniform x0 "
                                 f"model) with step --distill-dt: give both, got init_from={self.init_from!r}, "
                                 f"distill_dt={self.distill_dt!r}")
            if not (isinstance(self.distill_dt, (int, float)) and 0 < self.distill_dt <= 1):
                raise ValueError(f"distill_dt must be in (0, 1], got distill_dt={self.distill_dt!r}")
            if self.block_size is not None or self.discrete_time is not None:
                raise ValueError("objective='duo_distill' takes no block_size or discrete_time")
        elif self.distill_dt is not None:
            raise ValueError(f"distill_dt is for objective='duo_distill', got distill_dt={self.distill_dt!r} with "
                             f"objective={self.objective!r}")
        if self.init_from is not None:
            if self.objective not in ("masked_elbo", "duo_distill"):
                raise ValueError(f"init_from trains a masked-diffusion model (objective 'masked_elbo') or distils a "
                                 f"Duo model (objective 'duo_distill'), got {self.objective!r}")
            if self.tokenizer != "auto":
                raise ValueError(f"init_from brings its own tokenizer: leave tokenizer at 'auto', got "
                                 f"tokenizer={self.tokenizer!r}")
        elif self.anneal_steps:
            raise ValueError(f"anneal_steps is for a causal LM given by init_from, got anneal_steps={self.anneal_steps}")

    def _check_trained_tokenizer(self) -> None:
        if parse_trained_vocab(self.tokenizer) is None:
            return
        if self.streaming:
            raise ValueError(f"tokenizer={self.tokenizer!r} trains on the run's documents, which a streamed dataset "
                             "does not hold up front: train one with a non-streaming run and pass its folder")
        if is_prepared(self.dataset):
            raise ValueError(f"tokenizer={self.tokenizer!r}: dataset={self.dataset!r} is already tokenized "
                             "(ddlm-prepare); its tokenizer is the one it was prepared with")

    # --- resolved values (the config itself is never rewritten) ---------------------------

    @property
    def resolved_tokenizer(self) -> str:
        """``tokenizer``, with auto as builtin (a run with init_from takes the model's own instead)."""
        return "builtin" if self.tokenizer == "auto" else self.tokenizer

    @property
    def resolved_warmup_steps(self) -> int:
        """``warmup_steps``, or 10% of ``max_steps`` (at most 100) when left at None."""
        return self.warmup_steps if self.warmup_steps is not None else min(100, self.max_steps // 10)

    @property
    def resolved_parameterization(self) -> str:
        if self.parameterization != "auto":
            return self.parameterization
        if self.objective in ("duo", "duo_distill"):
            return "x0"
        return "subs" if self.objective in MASKED_OBJECTIVES else "score"

    @property
    def resolved_time_conditioning(self) -> bool:
        if self.time_conditioning != "auto":
            return self.time_conditioning == "on"
        return self.resolved_parameterization != "subs"

    @property
    def resolved_schedule(self) -> tuple[str, dict]:
        if self.schedule != "auto":
            return self.schedule, dict(self.schedule_kwargs or {})
        if self.process in ("uniform", "nearest_neighbour"):
            return "geometric", dict(self.schedule_kwargs or {"sigma_min": 1e-4, "sigma_max": 20.0})
        return "loglinear", dict(self.schedule_kwargs or {"eps": 1e-3})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
