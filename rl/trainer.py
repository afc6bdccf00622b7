"""``GRPOTrainer``: reinforcement learning from verifiable rewards for masked diffusion LMs.

One rollout step (GRPO, Shao et al. 2024; with d1's, DiffuCoder's and GDPO's likelihood estimators):

1. take ``prompts_per_step`` prompt records, draw ``group_size`` completions each with a sampler;
2. score them with the reward functions (weighted sum; see :mod:`rl.rewards` for failures) and turn the
   rewards into group advantages;
3. draw one set of masks per inner step and compute ``l_old`` (and ``l_ref``) under them, no gradient;
4. ``inner_steps`` times: recompute ``l_theta`` under the same masks, minimise :func:`rl.objective.grpo_loss`
   (or, with ``objective="wd1"`` or ``"spg"``, :func:`rl.objective.wd1_loss` or :func:`rl.objective.spg_loss`,
   which need neither ``l_old`` nor ``l_ref``).

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

from diffusion.adapters import save_denoiser
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
    refuse_nonfinite_weights,
    save_weights,
    write_json,
)
from diffusion.training.lora import merged, wrap_lora
from diffusion.training.seeding import derive_generator
from samplers import FREE, get_sampler
from samplers.base import RowStreams

from .config import GRPOConfig
from .estimators import LikelihoodEstimator, concat_draws, get_estimator, weighted_sum
from .objective import LossStats, group_advantages, grpo_loss, spg_loss, spg_upper_bound, wd1_loss
from .rewards import RewardFunction, check_weights, compute_rewards

__all__ = ["GRPOTrainer", "completion_mask"]

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
        check_weights(self.reward_functions, self.reward_weights)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        if config.prompts_per_step % self.world:
            raise ValueError(f"prompts_per_step ({config.prompts_per_step}) must be divisible by the number of "
                             f"processes ({self.world}): every rank rolls out whole groups")
        self.mask_id = spec.mask_id
        self.eos_id = tokenizer.eos_token_id
        targets = [t.strip() for t in config.lora_targets.split(",") if t.strip()]
        if config.lora_rank:
            self.model = wrap_lora(model, config.lora_rank, config.lora_alpha, targets, seed=config.seed)
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

    def _groups(self) -> range:
        """The prompt groups (indices into a step's prompts) this rank rolls out and scores."""
        per_rank = self.config.prompts_per_step // self.world
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    def rollout(self, step: int) -> dict[str, Any]:
        """This rank's prompts, completions, rewards and advantages of one step (no gradient).

        Every group (one prompt, ``group_size`` completions) is sampled from its own stream, so the rollouts of a
        step are the same however the groups are dealt to the processes.
        """
        cfg = self.config
        picks = torch.randint(0, len(self.records), (cfg.prompts_per_step,),
                              generator=derive_generator(cfg.seed, step, "prompts")).tolist()
        groups = self._groups()
        records = [self.records[picks[g]] for g in groups for _ in range(cfg.group_size)]
        streams = RowStreams([derive_generator(cfg.seed, step, "rollout", g) for g in groups], cfg.group_size)
        batch = self._complete(records, streams)
        advantages = group_advantages(batch["rewards"], cfg.group_size, scale=cfg.advantage_scale).float()
        batch["advantages"] = torch.nan_to_num(advantages, nan=0.0)
        batch["mask"] = batch["mask"] & ~torch.isnan(batch["rewards"])[:, None]  # excluded: no loss
        return batch

    def _draw(self, batch: dict[str, Any], step: int, purpose: str, index: int) -> Any:
        """Masks of this rank's rows, group by group, each group from its own stream (as :meth:`rollout`)."""
        size, draws = self.config.group_size, []
        for k, g in enumerate(self._groups()):
            rows = slice(k * size, (k + 1) * size)
            generator = derive_generator(self.config.seed, step, purpose, index * self.config.prompts_per_step + g)
            draws.append(self.estimator.draw(batch["sequences"][rows], batch["layout"][rows], generator))
        return concat_draws(draws)

    def _sum(self, value: Tensor | float) -> Tensor:
        """``value`` summed over the processes (itself with one)."""
        value = torch.as_tensor(value, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(value, reduction="sum") if self.world > 1 else value

    @torch.no_grad()
    def _complete(self, records: list[dict[str, Any]], generator: Any) -> dict[str, Any]:
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
        """Mean total and per-function reward of one sampled completion per record (a held-out check); with several
        processes each scores its share of the records."""
        share = list(records)[self.rank::self.world]
        batch = self._complete(share, torch.Generator().manual_seed(seed + self.rank))
        columns = {"reward": batch["rewards"]}
        for j, fn in enumerate(self.reward_functions):
            columns[f"reward/{getattr(fn, '__name__', j)}"] = batch["per_function"][:, j]
        result = {}
        for name, column in columns.items():
            present = ~torch.isnan(column)
            total, count = self._sum(column[present].sum()), self._sum(present.sum())
            result[name] = float(total / count) if count > 0 else float("nan")
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
            draw = self._draw(batch, step, "variance", k)
            draws.append(torch.where(mask, self._score(self.model, draw), 0.0).sum(-1))  # what the loss sees
        variances = torch.stack(draws).var(dim=0)
        return float(self._sum(variances.sum()) / self._sum(variances.numel()))

    def _policy_loss(self, draw: Any, old: Tensor | None, ref: Tensor | None, advantages: Tensor, mask: Tensor,
                     units: float, normalizer: Tensor) -> tuple[Tensor, LossStats]:
        """The configured objective's loss on one draw, and its diagnostics (this rank's shares)."""
        cfg = self.config
        ratio_free = LossStats(ratio_mean=units / float(normalizer), clip_low=0.0, clip_high=0.0, kl=0.0)
        if cfg.objective == "spg":
            log_probs, weights = self.estimator.view_log_probs(self.model, draw)
            elbo = weighted_sum(log_probs, weights)
            eubo = spg_upper_bound(log_probs, weights.to(log_probs.device), beta=cfg.spg_beta)
            return spg_loss(elbo, eubo, advantages, mask, mixture=cfg.spg_mixture, normalizer=normalizer), ratio_free
        current = self._score(self.model, draw)
        if cfg.objective == "wd1":
            loss = wd1_loss(torch.where(mask, current, 0.0).sum(-1), advantages, cfg.group_size,
                            temperature=cfg.wd1_temperature, valid=mask.any(-1), normalizer=normalizer)
            return loss, ratio_free
        previous = old if old is not None else current.detach()
        return grpo_loss(current, previous, advantages, mask, clip_eps_low=cfg.clip_eps_low,
                         clip_eps_high=cfg.clip_eps_high, beta=cfg.beta, log_ref=ref, level=cfg.resolved_level,
                         normalizer=normalizer)

    def train_step(self, step: int) -> dict[str, float]:
        """One rollout step and its ``inner_steps`` optimizer steps.

        With several processes each rank rolls out and scores its own groups; its loss is its share of the global
        mean (the global count of scored units normalises it), the gradients are summed across ranks, and every
        rank takes the same optimizer step: the update of one process with the whole batch.
        """
        cfg = self.config
        start = time.perf_counter()
        batch = self.rollout(step)
        rollout_seconds = time.perf_counter() - start
        draws = [self._draw(batch, step, "masks", j) for j in range(cfg.inner_steps)]
        with torch.no_grad():  # pi_old is the policy that drew the rollouts (wd1 and SPG have no ratio)
            old = [self._score(self.model, d) for d in draws] if cfg.inner_steps > 1 and cfg.objective == "grpo" \
                else [None] * cfg.inner_steps
            ref = [self._reference_scores(d) for d in draws]
        losses, stats = [], []
        device = next(self.model.parameters()).device
        advantages, mask = batch["advantages"].to(device), batch["mask"].to(device)
        level = cfg.resolved_level
        if cfg.objective == "wd1":  # averaged over the groups that have a completion with a reward
            units = (mask.any(-1).view(-1, cfg.group_size).any(-1)).sum()
        else:  # SPG, like token-level GRPO, averages over the scored tokens
            units = mask.sum() if level == "token" or cfg.objective == "spg" else (mask.sum(-1) > 0).sum()
        normalizer = self._sum(units).clamp_min(1).float()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        for j, draw in enumerate(draws):
            loss, info = self._policy_loss(draw, old[j], ref[j], advantages, mask, float(units), normalizer)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.world > 1:  # each rank's loss is its share of the global mean: the gradients add up
                for p in trainable:
                    grad = p.grad if p.grad is not None else torch.zeros_like(p)
                    p.grad = self.accelerator.reduce(grad, reduction="sum")
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            self.optimizer.step()
            losses.append(float(self._sum(loss.detach())))
            stats.append({k: float(self._sum(v)) for k, v in vars(info).items()})
        rewards = batch["rewards"][~torch.isnan(batch["rewards"])]
        count = self._sum(rewards.numel())
        mean = self._sum(rewards.sum()) / count.clamp_min(1)
        spread = self._sum(((rewards.double() - mean.cpu()) ** 2).sum()) / (count - 1).clamp_min(1)
        lengths = batch["mask"].sum(-1).float()
        metrics = {
            "step": step, "loss": sum(losses) / len(losses),
            "reward_mean": float(mean) if count > 0 else float("nan"),
            "reward_std": float(spread.sqrt()) if count > 1 else 0.0,
            "completion_length": float(self._sum(lengths.sum()) / self._sum(lengths.numel())),
            **{name: sum(s[name] for s in stats) / len(stats) for name in ("clip_low", "clip_high", "kl", "ratio_mean")},
            "rollout_nfe": int(self._sum(batch["nfe"])), "rollout_seconds": rollout_seconds,
        }
        for j, fn in enumerate(self.reward_functions):
            column = batch["per_function"][:, j]
            column = column[~torch.isnan(column)]
            present = self._sum(column.numel())
            metrics[f"reward/{getattr(fn, '__name__', j)}"] = float(self._sum(column.sum()) / present) \
                if present > 0 else float("nan")
        if cfg.variance_draws and step % cfg.log_every == 0:
            metrics["estimator_variance"] = self.estimator_variance(batch, step)
        metrics["seconds"] = time.perf_counter() - start
        return metrics

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
            write_json(self.output_dir / "grpo_config.json", asdict(cfg))
        history = []
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (cfg.progress and main), desc="grpo")
        metrics_file = self.output_dir / "metrics.jsonl"
        while self.step < cfg.max_steps:
            metrics = self.train_step(self.step)
            self.step += 1
            history.append(metrics)
            if main and ((self.step - 1) % cfg.log_every == 0 or self.step == cfg.max_steps):
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
