"""Instruction supervised fine-tuning of a masked-diffusion LM (LLaDA's recipe), optionally with LoRA.

Each step takes ``batch_size`` examples (prompt, completion) of :mod:`diffusion.data.instructions`, masks each
completion token with probability ``t ~ U(t_min, 1)`` (never a prompt token) and minimises
:func:`diffusion.lambda_form.completion_loss`, nats per completion token.  Any denoiser
:func:`~diffusion.adapters.load_denoiser` reads trains: a DDiT model, a converted causal LM (``ddlm-convert``),
a LLaDA/Dream-style model (``trust_remote_code``) or a BERT-style masked LM.

Like the pre-training loop, a step's examples and noise are functions of ``(seed, step)``
(:func:`~diffusion.training.seeding.derive_generator`), and a checkpoint (``checkpoints/step-N``, written
atomically) holds the weights, AdamW state, LR schedule and RNG: a resumed run repeats an uninterrupted one.
``output_dir/final`` is the fine-tuned model (LoRA merged) with its tokenizer.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters import load_denoiser, save_denoiser
from ..data.instructions import FORMATS, InstructionExample, collate, encode_examples, load_instruction_rows
from ..lambda_form import completion_loss
from ..spec import DiffusionSpec
from .checkpoint import (
    CheckpointError,
    atomic_directory,
    check_resumable,
    checkpoint_name,
    find_latest_checkpoint,
    load_tensors,
    load_train_state,
    prune_checkpoints,
    refuse_nonfinite_weights,
    read_json,
    save_train_state,
    save_weights,
    write_json,
)
from .lora import default_lora_targets, merged, wrap_lora
from .loop import lr_factor, resolve_precision
from .seeding import derive_generator

__all__ = ["SFTConfig", "SFTResult", "train_sft"]

RESUMABLE_CHANGES = frozenset({"output_dir", "resume", "progress", "save_every", "keep_last", "log_every"})


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class SFTConfig:
    """An instruction fine-tuning run."""

    model: str = _f("", "the denoiser to fine-tune: a folder or Hub id (ddit, converted, LLaDA/Dream-style, BERT-style)",
                    required=True)
    data: str = _f("builtin:shakespeare-dialogue", "instruction data: builtin:shakespeare-dialogue, a .json/.jsonl/"
                                                    ".parquet file or folder, or a datasets Hub name")
    split: str = _f("train", "split of a Hub dataset")
    dataset_config: str | None = _f(None, "configuration of a Hub dataset (None: the dataset's default)")
    format: str = _f("auto", "chat (the tokenizer's chat template), plain (prompt ids, completion ids, EOS) or auto "
                             "(chat when the tokenizer has a template)", choices=list(FORMATS))
    output_dir: str = _f("runs/sft", "folder for checkpoints, metrics.jsonl and the final model")
    max_length: int = _f(256, "longest prompt + completion; longer completions are cut, longer prompts dropped")
    pad_with_eos: bool = _f(False, "pad every sequence to max_length with EOS and train on those EOS (LLaDA), so the "
                                   "model learns to end its answers; otherwise padding carries no loss")
    batch_size: int = _f(8, "examples per step")
    max_steps: int = _f(500, "optimizer steps")
    lr: float = _f(1e-4, "peak learning rate (AdamW)")
    warmup_steps: int | None = _f(None, "linear warm-up steps (None: 10% of max_steps, at most 100)")
    min_lr_ratio: float = _f(0.1, "cosine decay floor as a fraction of lr")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(1.0, "gradient-norm clipping threshold (0 turns it off)")
    t_min: float = _f(1e-3, "smallest masking probability drawn, t ~ U(t_min, 1)")
    lora_rank: int = _f(0, "LoRA rank through peft (0: train every weight)")
    lora_alpha: float = _f(16.0, "LoRA alpha")
    lora_targets: str = _f("auto", "comma-separated names of the Linear layers LoRA adapts (auto: all but the head)")
    precision: str = _f("auto", "no (float32), bf16, or auto (bf16 where the device has fast bf16)",
                        choices=["auto", "no", "bf16"])
    trust_remote_code: bool = _f(False, "run the model repository's own code (LLaDA, Dream)")
    seed: int = _f(0, "seed of example order, masks and LoRA initialisation")
    log_every: int = _f(10, "steps between metric records")
    save_every: int = _f(200, "steps between checkpoints (0: only at the end)")
    keep_last: int = _f(2, "checkpoints kept on disk")
    resume: str = _f("", "'' (fresh run), 'auto' (newest checkpoint in output_dir, if any) or a checkpoint path")
    progress: bool = _f(True, "show a progress bar")

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {list(choices)}, got {f.name}={getattr(self, f.name)!r}")
        if not self.model:
            raise ValueError("model is required: the folder or Hub id of the denoiser to fine-tune")
        for name in ("max_length", "batch_size", "max_steps", "log_every", "keep_last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        for name in ("save_every", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {name}={value!r}")
        checks = [("lr", self.lr > 0, "must be > 0"), ("t_min", 0 < self.t_min < 1, "must be in (0, 1)"),
                  ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"),
                  ("grad_clip", self.grad_clip >= 0, "must be >= 0"), ("lora_alpha", self.lora_alpha > 0, "must be > 0"),
                  ("warmup_steps", self.resolved_warmup_steps <= self.max_steps,
                   f"must not exceed max_steps={self.max_steps}")]
        for name, ok, message in checks:
            if not ok:
                raise ValueError(f"{name} {message}, got {name}={getattr(self, name)!r}")

    @property
    def resolved_warmup_steps(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(100, self.max_steps // 10)


@dataclass(frozen=True)
class SFTResult:
    step: int
    final_dir: Path | None
    last_loss: float | None
    metrics_path: Path


def _step_examples(examples: list[InstructionExample], step: int, batch_size: int, seed: int) -> list[InstructionExample]:
    """The examples of step ``step``: consecutive slices of one seeded permutation per pass over the data."""
    n, orders, chosen = len(examples), {}, []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, index = divmod(position, n)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=derive_generator(seed, epoch, "sft-order"))
        chosen.append(examples[int(orders[epoch][index])])
    return chosen


def _save(root: Path, step: int, model: Any, optimizer: Any, scheduler: Any, tokenizer: Any, config: SFTConfig) -> Path:
    target = root / "checkpoints" / checkpoint_name(step)
    refuse_nonfinite_weights(model, step, root / "checkpoints")
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(target, complete=True) as tmp:
        save_weights({"cpu": torch.get_rng_state()}, tmp / "rng-0.safetensors")
        save_train_state(tmp, model, optimizer, None)
        tokenizer.save_pretrained(tmp / "tokenizer")
        write_json(tmp / "trainer_state.json", {"step": step, "scheduler": scheduler.state_dict(),
                                                "config": asdict(config)})
    prune_checkpoints(root / "checkpoints", config.keep_last)
    return target


def _resume(config: SFTConfig, root: Path, model: Any, optimizer: Any, scheduler: Any) -> int:
    if not config.resume:
        return 0
    path = find_latest_checkpoint(root / "checkpoints") if config.resume == "auto" else Path(config.resume)
    if path is None:
        return 0
    if not path.is_dir():
        raise FileNotFoundError(f"resume checkpoint does not exist: resume={config.resume!r}")
    saved = read_json(path / "trainer_state.json")
    check_resumable(saved["config"], asdict(config), RESUMABLE_CHANGES, path)
    load_train_state(path, model, optimizer, None)
    scheduler.load_state_dict(saved["scheduler"])
    rng = path / "rng-0.safetensors"
    if not rng.is_file():
        raise CheckpointError(f"checkpoint {path} has no RNG state ({rng.name})")
    torch.set_rng_state(load_tensors(rng)["cpu"])
    return int(saved["step"])


def train_sft(config: SFTConfig, model: Any = None, tokenizer: Any = None) -> SFTResult:
    """Fine-tune ``config.model`` on ``config.data`` (see the module docstring); returns where the model went.

    ``model`` and ``tokenizer``: ``config.model`` already loaded (:func:`~diffusion.adapters.load_denoiser`)."""
    if model is None or tokenizer is None:
        model, tokenizer = load_denoiser(config.model, trust_remote_code=config.trust_remote_code)
    spec = DiffusionSpec.of(model)
    if not spec.masked:
        raise ValueError(f"SFT needs a masked-diffusion (absorbing, subs) model, got process={spec.process_name!r}, "
                         f"parameterization={spec.parameterization!r}")
    if config.pad_with_eos and tokenizer.eos_token_id is None:
        raise ValueError("pad_with_eos=True needs a tokenizer with an EOS token, and this one has none")
    rows = load_instruction_rows(config.data, split=config.split, dataset_config=config.dataset_config)
    examples, dropped = encode_examples(rows, tokenizer, max_length=config.max_length, format=config.format)
    if not examples:
        raise ValueError(f"no example of data={config.data!r} fits max_length={config.max_length}")
    root = Path(config.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "sft_config.json", asdict(config))

    model.train()
    if config.lora_rank:
        targets = default_lora_targets(model) if config.lora_targets == "auto" else \
            [t.strip() for t in config.lora_targets.split(",") if t.strip()]
        model = wrap_lora(model, config.lora_rank, config.lora_alpha, targets, seed=config.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    step = _resume(config, root, model, optimizer, scheduler)
    bf16 = resolve_precision(config) == "bf16"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    completion_tokens = sum(len(e.completion) for e in examples)
    print(f"sft: {len(examples)} examples ({completion_tokens} completion tokens; {dropped} dropped: prompt longer "
          f"than max_length) | trainable {sum(p.numel() for p in trainable) / 1e6:.2f}M parameters"
          f"{' (LoRA)' if config.lora_rank else ''} | precision {'bf16' if bf16 else 'no'}")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    metrics_path = root / "metrics.jsonl"
    bar = tqdm(total=config.max_steps, initial=step, disable=not config.progress, desc="sft", dynamic_ncols=True)
    window, window_steps, started, loss_value = 0.0, 0, time.perf_counter(), None
    while step < config.max_steps:
        batch = collate(_step_examples(examples, step, config.batch_size, config.seed), eos_id=eos,
                        pad_with_eos=config.pad_with_eos, max_length=config.max_length)
        attention = batch.attention_mask.to(device) if batch.attention_mask is not None else None
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            loss = completion_loss(model, batch.sequences.to(device), batch.completion.to(device), spec.mask_id,
                                   derive_generator(config.seed, step, "sft"), config.t_min, attention)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip if config.grad_clip > 0 else math.inf)
        if torch.isfinite(loss) and torch.isfinite(norm):  # a non-finite step changes nothing, as in pre-training
            optimizer.step()
            scheduler.step()
        step += 1
        loss_value = loss.item()
        window += loss_value
        window_steps += 1
        bar.update(1)
        if step % config.log_every == 0 or step == config.max_steps:
            record = {"step": step, "loss": window / window_steps, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": float(norm), "seconds": time.perf_counter() - started}
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            window, window_steps = 0.0, 0
        if (config.save_every and step % config.save_every == 0) or step == config.max_steps:
            _save(root, step, model, optimizer, scheduler, tokenizer, config)
    bar.close()
    model.eval()
    final = root / "final"
    refuse_nonfinite_weights(model, step, root / "checkpoints")
    with atomic_directory(final, complete=True) as tmp:
        save_denoiser(merged(model), tokenizer, tmp)
    return SFTResult(step=step, final_dir=final, last_loss=loss_value, metrics_path=metrics_path)
