"""``GRPOTrainer``: reinforcement learning from verifiable rewards for masked diffusion LMs.

One rollout step (GRPO, Shao et al. 2024; with d1's, DiffuCoder's and GDPO's likelihood estimators):

1. take ``prompts_per_step`` prompt records, draw ``group_size`` completions each with a sampler;
2. score them with the reward functions (weighted sum; see :mod:`rl.rewards` for failures) and turn the
   rewards into group advantages;
3. draw one set of masks per inner step and compute ``l_old`` (and ``l_ref``) under them, no gradient;
4. ``inner_steps`` times: recompute ``l_theta`` under the same masks, minimise :func:`rl.objective.grpo_loss`.

Every random choice is drawn from a generator seeded by ``(seed, step, purpose)``
(:func:`diffusion.training.seeding.derive_generator`, shared with the training loop), so a resumed run
replays exactly what an uninterrupted one does.  Checkpoints are pickle-free (safetensors + JSON) and
written atomically.  The model stays in eval mode (no dropout) so that l_theta = l_old at the first inner step.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffusion.adapters import DiffusionLMAdapter
from diffusion.spec import DiffusionSpec
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
    save_weights,
    write_json,
)
from diffusion.training.seeding import derive_generator
from samplers import FREE, get_sampler

from .config import GRPOConfig
from .estimators import LikelihoodEstimator, get_estimator
from .objective import group_advantages, grpo_loss
from .rewards import RewardFunction, compute_rewards

__all__ = ["GRPOTrainer", "completion_mask", "wrap_lora"]

# Settings a resumed run may change: bookkeeping, not the run's course.
RESUMABLE_CHANGES = frozenset({"max_steps", "resume", "progress", "save_every", "keep_last", "log_every", "output_dir"})


def completion_mask(completions: Tensor, eos_id: int | None) -> Tensor:
    """``[B, Lc]`` bool: completion tokens up to and including the first EOS (all of them without EOS).

    >>> completion_mask(torch.tensor([[5, 0, 7, 0], [5, 6, 7, 8]]), eos_id=0).tolist()
    [[True, True, False, False], [True, True, True, True]]
    """
    if eos_id is None:
        return torch.ones_like(completions, dtype=torch.bool)
    is_eos = (completions == eos_id).int()
    before = torch.cumsum(is_eos, dim=-1) - is_eos  # EOS tokens strictly before each position
    return before == 0


def wrap_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> nn.Module:
    """``model`` with LoRA adapters (peft) on the Linear layers named in ``targets``; only they train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("lora_rank > 0 needs peft: pip install 'ddlm[rl]'") from err
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"lora_targets {missing} name no Linear layer of {type(model).__name__}; it has {sorted(names)}")
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))


def _step_of(line: str) -> float:
    """The step of a metrics line; a line a crash cut short counts as after every checkpoint (dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def _plain_state(module: nn.Module) -> dict[str, Tensor]:
    """The state dict with every tensor copied: tied weights (BERT's decoder) become separate safetensors entries."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


class GRPOTrainer:
    """GRPO on a masked diffusion LM with pluggable rollout sampler and likelihood estimator.

    Args:
        model: a subs denoiser (``DDiTModel`` with ``parameterization="subs"``, or an adapter from
            :mod:`samplers.adapters`).
        tokenizer: decodes completions for the reward functions and encodes prompts.
        config: the run.
        reward_functions, reward_weights: ``(prompts, completions, **fields) -> list[float | None]`` and their weights.
        records: prompt records, each a dict with ``"prompt"`` (text) and any fields the rewards read.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: GRPOConfig, reward_functions: Sequence[RewardFunction],
                 records: Sequence[dict[str, Any]], reward_weights: Sequence[float] | None = None) -> None:
        spec = DiffusionSpec.from_config(model.config)
        if not spec.masked:
            raise ValueError("GRPO needs a masked (absorbing, subs) denoiser, got process="
                             f"{spec.process_name!r}, parameterization={spec.parameterization!r}")
        if not reward_functions:
            raise ValueError("reward_functions is empty: GRPO needs at least one reward")
        if not records or any("prompt" not in r for r in records):
            raise ValueError("records must be a non-empty list of dicts with a 'prompt' field")
        self.config = config
        self.tokenizer = tokenizer
        self.records = list(records)
        self.reward_functions = list(reward_functions)
        self.reward_weights = list(reward_weights) if reward_weights is not None else [1.0] * len(reward_functions)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        if self.accelerator.num_processes > 1:
            raise NotImplementedError("GRPOTrainer runs in one process for now; launch it without accelerate/torchrun")
        self.mask_id = spec.mask_id
        self.eos_id = tokenizer.eos_token_id
        targets = [t.strip() for t in config.lora_targets.split(",") if t.strip()]
        if config.lora_rank:
            with torch.random.fork_rng(devices=[]):  # LoRA's init draws from the global generator: seed it, then
                torch.manual_seed(config.seed)       # give the caller's generator state back untouched
                self.model = wrap_lora(model, config.lora_rank, config.lora_alpha, targets)
        else:
            self.model = model
        self.model.to(self.accelerator.device).eval()
        self.reference = None
        if config.beta > 0 and not config.lora_rank:
            self.reference = copy.deepcopy(self.model).requires_grad_(False)
        self.estimator: LikelihoodEstimator = get_estimator(config.estimator, self.mask_id, **config.estimator_options())
        self.sampler = get_sampler(config.sampler, temperature=config.temperature, **(config.sampler_options or {}))
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.output_dir = Path(config.output_dir)

    # ----- one rollout step -------------------------------------------------------------------------
    def _prompt_ids(self, records: list[dict[str, Any]]) -> Tensor:
        encoded = [self.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in records]
        width = max(len(e) for e in encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        if pad is None and any(len(e) != width for e in encoded):
            raise ValueError("prompts of different token lengths need a pad or EOS token to left-pad with")
        return torch.tensor([[pad] * (width - len(e)) + e for e in encoded])

    def rollout(self, step: int) -> dict[str, Any]:
        """Prompts, completions, rewards and advantages of one step (no gradient)."""
        cfg = self.config
        picks = torch.randint(0, len(self.records), (cfg.prompts_per_step,),
                              generator=derive_generator(cfg.seed, step, "prompts"))
        records = [self.records[i] for i in picks.tolist() for _ in range(cfg.group_size)]
        batch = self._complete(records, derive_generator(cfg.seed, step, "rollout"))
        advantages = group_advantages(batch["rewards"], cfg.group_size, scale=cfg.advantage_scale).float()
        batch["advantages"] = torch.nan_to_num(advantages, nan=0.0)
        batch["mask"] = batch["mask"] & ~torch.isnan(batch["rewards"])[:, None]  # excluded: no loss
        return batch

    @torch.no_grad()
    def _complete(self, records: list[dict[str, Any]], generator: torch.Generator) -> dict[str, Any]:
        """Sample one completion per record, decode it up to its first EOS, and reward it."""
        prompt_ids = self._prompt_ids(records)
        canvas = torch.cat([prompt_ids, torch.full((len(records), self.config.completion_length), FREE)], dim=1)
        self.model.eval()
        out = self.sampler.generate(self.model, canvas=canvas, num_steps=self.config.sampling_steps, generator=generator)
        sequences = out.tokens.cpu()
        completions = sequences[:, prompt_ids.shape[1]:]
        mask = completion_mask(completions, self.eos_id)
        texts = [self.tokenizer.decode(c[m].tolist(), skip_special_tokens=True) for c, m in zip(completions, mask)]
        fields = {k: [r.get(k) for r in records] for k in records[0] if k != "prompt"}
        rewards, per_function = compute_rewards(self.reward_functions, self.reward_weights,
                                                [r["prompt"] for r in records], texts,
                                                timeout=self.config.reward_timeout, **fields)
        layout = torch.zeros_like(sequences, dtype=torch.bool)
        layout[:, prompt_ids.shape[1]:] = True
        return {"sequences": sequences, "layout": layout, "mask": mask, "rewards": rewards,
                "per_function": per_function, "texts": texts, "nfe": out.nfe}

    def evaluate(self, records: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, float]:
        """Mean total and per-function reward of one sampled completion per record (a held-out check)."""
        batch = self._complete(list(records), torch.Generator().manual_seed(seed))
        result = {"reward": float(batch["rewards"].nanmean())}
        for j, fn in enumerate(self.reward_functions):
            result[f"reward/{getattr(fn, '__name__', j)}"] = float(batch["per_function"][:, j].nanmean())
        return result

    def _score(self, model: nn.Module, draw: Any) -> Tensor:
        return self.estimator.estimate(model, draw)

    @torch.no_grad()
    def _reference_scores(self, draw: Any) -> Tensor | None:
        if self.config.beta == 0:
            return None
        if self.reference is not None:
            return self._score(self.reference, draw)
        with self.model.disable_adapter():  # LoRA: the base model is the reference
            return self._score(self.model, draw)

    @torch.no_grad()
    def estimator_variance(self, batch: dict[str, Any], step: int) -> float:
        """Mean over completions of the variance of the sequence estimate across ``variance_draws`` draws."""
        mask = batch["mask"].to(next(self.model.parameters()).device)
        draws = []
        for k in range(self.config.variance_draws):
            generator = derive_generator(self.config.seed, step, "variance", k)
            draw = self.estimator.draw(batch["sequences"], batch["layout"], generator)
            draws.append(torch.where(mask, self._score(self.model, draw), 0.0).sum(-1))  # what the loss sees
        return float(torch.stack(draws).var(dim=0).mean())

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        start = time.perf_counter()
        batch = self.rollout(step)
        rollout_seconds = time.perf_counter() - start
        draws = [self.estimator.draw(batch["sequences"], batch["layout"], derive_generator(cfg.seed, step, "masks", j))
                 for j in range(cfg.inner_steps)]
        with torch.no_grad():  # pi_old is the policy that drew the rollouts
            old = [self._score(self.model, d) for d in draws] if cfg.inner_steps > 1 else [None]
            ref = [self._reference_scores(d) for d in draws]
        losses, stats = [], []
        device = next(self.model.parameters()).device
        advantages, mask = batch["advantages"].to(device), batch["mask"].to(device)
        for j, draw in enumerate(draws):
            current = self._score(self.model, draw)
            previous = old[j] if old[j] is not None else current.detach()
            loss, info = grpo_loss(current, previous, advantages, mask, clip_eps_low=cfg.clip_eps_low,
                                   clip_eps_high=cfg.clip_eps_high, beta=cfg.beta, log_ref=ref[j],
                                   level=cfg.resolved_level)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                               cfg.max_grad_norm)
            self.optimizer.step()
            losses.append(loss.item())
            stats.append(info)
        rewards = batch["rewards"][~torch.isnan(batch["rewards"])]
        metrics = {
            "step": step, "loss": sum(losses) / len(losses),
            "reward_mean": float(rewards.mean()) if rewards.numel() else float("nan"),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "completion_length": float(batch["mask"].sum(-1).float().mean()),
            "clip_low": sum(s.clip_low for s in stats) / len(stats),
            "clip_high": sum(s.clip_high for s in stats) / len(stats),
            "kl": sum(s.kl for s in stats) / len(stats), "ratio_mean": sum(s.ratio_mean for s in stats) / len(stats),
            "rollout_nfe": batch["nfe"], "rollout_seconds": rollout_seconds,
        }
        for j, fn in enumerate(self.reward_functions):
            column = batch["per_function"][:, j]
            column = column[~torch.isnan(column)]
            metrics[f"reward/{getattr(fn, '__name__', j)}"] = float(column.mean()) if column.numel() else float("nan")
        if cfg.variance_draws and step % cfg.log_every == 0:
            metrics["estimator_variance"] = self.estimator_variance(batch, step)
        metrics["seconds"] = time.perf_counter() - start
        return metrics

    # ----- the run ----------------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        """Run (or resume) to ``max_steps``; returns the metrics of the steps run now."""
        cfg = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._resume_if_asked()
        if self.step == 0:
            write_json(self.output_dir / "grpo_config.json", asdict(cfg))
        history = []
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not cfg.progress, desc="grpo")
        metrics_file = self.output_dir / "metrics.jsonl"
        while self.step < cfg.max_steps:
            metrics = self.train_step(self.step)
            self.step += 1
            history.append(metrics)
            if (self.step - 1) % cfg.log_every == 0 or self.step == cfg.max_steps:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{metrics['loss']:.3f}")
            if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.max_steps:
                self.save_checkpoint()
        bar.close()
        self.export(self.output_dir / "final")
        return history

    def save_checkpoint(self) -> Path:
        root = self.output_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        target = root / checkpoint_name(self.step)
        with atomic_directory(target, complete=True) as tmp:
            save_weights(_plain_state(self.model), tmp / "model.safetensors")
            if self.reference is not None:
                save_weights(_plain_state(self.reference), tmp / "reference.safetensors")
            (tmp / "optimizer").mkdir()
            optimizer_to_files(self.optimizer, tmp / "optimizer")
            write_json(tmp / "trainer_state.json", {"step": self.step, "config": asdict(self.config)})
        prune_checkpoints(root, self.config.keep_last)
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
        if metrics.is_file():  # drop lines the crashed run wrote after this checkpoint
            kept = [line for line in metrics.read_text().splitlines() if _step_of(line) < self.step]
            metrics.write_text("".join(line + "\n" for line in kept))

    @staticmethod
    def _load_state(module: nn.Module, tensors: dict[str, Tensor], path: Path) -> None:
        expected = module.state_dict()
        if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
            raise CheckpointError(f"checkpoint {path} does not match the model (different keys or shapes)")
        module.load_state_dict(tensors, strict=True)

    def export(self, folder: Path) -> Path:
        """The fine-tuned model (LoRA merged) and tokenizer as a ``from_pretrained`` folder."""
        model = self.model
        if self.config.lora_rank:
            model = copy.deepcopy(model).merge_and_unload()
        outside = isinstance(model, DiffusionLMAdapter)
        if outside:
            model = model.model  # an outside model: save it in its own format
        if not hasattr(model, "save_pretrained"):
            raise ValueError(f"cannot export a {type(model).__name__}: it has no save_pretrained")
        with atomic_directory(Path(folder), complete=True) as tmp:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            if outside:  # keep the mask id with the model wherever the original kept it (Dream: generation config)
                from transformers import GenerationConfig

                found = (tmp / "generation_config.json").is_file()
                generation = GenerationConfig.from_pretrained(tmp) if found else GenerationConfig()
                generation.mask_token_id = self.mask_id
                generation.save_pretrained(tmp)
        return Path(folder)
