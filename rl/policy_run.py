"""``PolicyRun``: the run machinery every fine-tuning method of :mod:`rl` shares.

A subclass supplies ``train_step(step) -> metrics``; this class holds the model (LoRA-wrapped when asked), the
frozen reference, the optimiser and the process group, and runs the steps: metrics to ``metrics.jsonl``,
pickle-free checkpoints (safetensors + JSON) written atomically, a bit-exact resume, and the exported model.
Every random choice of a step comes from a generator seeded by ``(seed, step, purpose)``
(:func:`diffusion.training.seeding.derive_generator`), so a resumed run replays exactly what an uninterrupted one
does.  The model stays in eval mode (no dropout): the same masks give the same scores.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffusion.adapters import save_denoiser
from diffusion.training.checkpoint import (
    CheckpointError,
    atomic_directory,
    check_resumable,
    checkpoint_name,
    find_latest_checkpoint,
    load_tensors,
    optimizer_from_files,
    optimizer_to_files,
    prune_checkpoints,
    read_json,
    refuse_nonfinite_weights,
    save_weights,
    write_json,
)
from diffusion.training.lora import merged, wrap_lora

from .run_settings import RunSettings

__all__ = ["PolicyRun", "RESUMABLE_CHANGES", "left_pad"]

# Settings a resumed run may change: bookkeeping, not the run's course.
RESUMABLE_CHANGES = frozenset({"max_steps", "resume", "progress", "save_every", "keep_last", "log_every", "output_dir"})


def _step_of(line: str) -> float:
    """The step of a metrics line; a line a crash cut short counts as after every checkpoint (dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def _plain_state(module: nn.Module) -> dict[str, Tensor]:
    """The state dict with every tensor copied: tied weights (BERT's decoder) become separate safetensors entries."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}



def left_pad(encoded: list[list[int]], tokenizer: Any) -> Tensor:
    """``[B, width]`` prompts left-padded to the longest with the tokenizer's pad token (else EOS), so that every
    completion starts at the same position."""
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None and any(len(e) != width for e in encoded):
        raise ValueError("prompts of different token lengths need a pad or EOS token to left-pad with")
    return torch.tensor([[pad] * (width - len(e)) + e for e in encoded], dtype=torch.long)


class PolicyRun:
    """Model, reference, optimiser and process group of a run, and the loop, checkpoints and export around its steps.

    Args:
        model: the policy (a subs denoiser); wrapped with LoRA when ``config.lora_rank > 0``.
        tokenizer: saved with the exported model.
        config: the run's settings.
        needs_reference: keep a frozen copy of the starting model (with LoRA the base model is the reference, so no
            copy is made).
    """

    run_name = "run"  # the progress bar's label and the name of the saved ``<run_name>_config.json``

    def __init__(self, model: nn.Module, tokenizer: Any, config: RunSettings, *, needs_reference: bool) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        targets = [t.strip() for t in config.lora_targets.split(",") if t.strip()]
        if config.lora_rank:
            self.model = wrap_lora(model, config.lora_rank, config.lora_alpha, targets, seed=config.seed)
        else:
            self.model = model
        self.model.to(self.accelerator.device).eval()
        self.reference = None
        if needs_reference and not config.lora_rank:
            self.reference = copy.deepcopy(self.model).requires_grad_(False)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.output_dir = Path(config.output_dir)

    def train_step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def _postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows after a step."""
        return {"loss": f"{metrics['loss']:.3f}"}

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        """The frozen reference to score with: the copy, or (LoRA) the model with its adapters disabled."""
        if self.reference is not None:
            yield self.reference
        else:
            with self.model.disable_adapter():
                yield self.model

    def _sum(self, value: Tensor | float) -> Tensor:
        """``value`` summed over the processes (itself with one)."""
        value = torch.as_tensor(value, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(value, reduction="sum") if self.world > 1 else value

    def optimizer_step(self, loss: Tensor) -> None:
        """Backward, gradients summed over the processes (each rank's loss is its share of the global mean),
        clipping, one AdamW step: every rank takes the same step, that of one process with the whole batch."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            for p in trainable:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                p.grad = self.accelerator.reduce(grad, reduction="sum")
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, self.config.max_grad_norm)
        self.optimizer.step()

    # ----- the run ----------------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        """Run (or resume) to ``max_steps``; returns the metrics of the steps run now."""
        cfg = self.config
        main = self.accelerator.is_main_process
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self._resume_if_asked()
        if self.step == 0 and main:
            write_json(self.output_dir / f"{self.run_name}_config.json", asdict(cfg))
        history = []
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (cfg.progress and main), desc=self.run_name)
        metrics_file = self.output_dir / "metrics.jsonl"
        while self.step < cfg.max_steps:
            metrics = self.train_step(self.step)
            self.step += 1
            history.append(metrics)
            if main and ((self.step - 1) % cfg.log_every == 0 or self.step == cfg.max_steps):
                with metrics_file.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
            bar.update(1)
            bar.set_postfix(self._postfix(metrics))
            if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.max_steps:
                self.save_checkpoint()
        bar.close()
        self.export(self.output_dir / "final")
        return history

    def save_checkpoint(self) -> Path:
        """``checkpoints/step-N``, written by the main process (every rank holds the same weights and state)."""
        root = self.output_dir / "checkpoints"
        target = root / checkpoint_name(self.step)
        refuse_nonfinite_weights(self.model, self.step, root)  # every rank holds the same weights
        if self.accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            with atomic_directory(target, complete=True) as tmp:
                save_weights(_plain_state(self.model), tmp / "model.safetensors")
                if self.reference is not None:
                    save_weights(_plain_state(self.reference), tmp / "reference.safetensors")
                (tmp / "optimizer").mkdir()
                optimizer_to_files(self.optimizer, tmp / "optimizer")
                write_json(tmp / "trainer_state.json", {"step": self.step, "config": asdict(self.config),
                                                        "num_processes": self.world})
            prune_checkpoints(root, self.config.keep_last)
        self.accelerator.wait_for_everyone()
        return target

    def _resume_if_asked(self) -> None:
        resume = self.config.resume
        if resume is None:
            return
        path = find_latest_checkpoint(self.output_dir / "checkpoints") if resume == "auto" else Path(resume)
        if path is None:
            return  # auto and nothing to resume: start fresh
        if not path.is_dir():
            raise FileNotFoundError(f"resume checkpoint does not exist: {str(path)!r}")
        state = read_json(path / "trainer_state.json")
        check_resumable(state["config"], asdict(self.config), RESUMABLE_CHANGES, path)
        self._load_state(self.model, load_tensors(path / "model.safetensors"), path)
        if self.reference is not None:
            self._load_state(self.reference, load_tensors(path / "reference.safetensors"), path)
        optimizer_from_files(self.optimizer, path / "optimizer")
        self.step = int(state["step"])
        metrics = self.output_dir / "metrics.jsonl"
        self.accelerator.wait_for_everyone()
        if metrics.is_file() and self.accelerator.is_main_process:  # drop lines a crashed run wrote after it
            kept = [line for line in metrics.read_text().splitlines() if _step_of(line) < self.step]
            metrics.write_text("".join(line + "\n" for line in kept))

    @staticmethod
    def _load_state(module: nn.Module, tensors: dict[str, Tensor], path: Path) -> None:
        expected = module.state_dict()
        if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
            raise CheckpointError(f"checkpoint {path} does not match the model (different keys or shapes)")
        module.load_state_dict(tensors, strict=True)

    def export(self, folder: Path) -> Path:
        """The fine-tuned model (LoRA merged) and tokenizer as a folder :func:`~diffusion.adapters.load_denoiser` reads."""
        refuse_nonfinite_weights(self.model, self.step, self.output_dir / "checkpoints")
        if not self.accelerator.is_main_process:  # every rank holds the same weights: one writes them
            self.accelerator.wait_for_everyone()
            return Path(folder)
        with atomic_directory(Path(folder), complete=True) as tmp:
            save_denoiser(merged(self.model), self.tokenizer, tmp)
        self.accelerator.wait_for_everyone()
        return Path(folder)
