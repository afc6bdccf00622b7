"""``GRPOTrainer``: reinforcement learning from verifiable rewards for masked diffusion LMs.

One rollout step (GRPO, Shao et al. 2024; with d1's, DiffuCoder's and GDPO's likelihood estimators):

1. take ``prompts_per_step`` prompt records, draw ``group_size`` completions each with a sampler;
2. score them with the reward functions (weighted sum; see :mod:`rl.rewards` for failures) and turn the
   rewards into group advantages;
3. draw one set of masks per inner step and compute ``l_old`` (and ``l_ref``) under them, no gradient;
4. ``inner_steps`` times: recompute ``l_theta`` under the same masks, minimise :func:`rl.objective.grpo_loss`
   (or, with ``objective="wd1"`` or ``"spg"``, :func:`rl.objective.wd1_loss` or :func:`rl.objective.spg_loss`,
   which need neither ``l_old`` nor ``l_ref``).

The loop, checkpoints, resume and export are :class:`rl.policy_run.PolicyRun`'s; the model stays in eval mode
(no dropout) so that l_theta = l_old at the first inner step.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diffusion.spec import DiffusionSpec
from diffusion.training.seeding import derive_generator
from samplers import FREE, SAMPLERS, get_sampler
from samplers.base import RowStreams

from .config import GRPOConfig
from diffusion.estimators import LikelihoodEstimator, check_policy, concat_draws, get_estimator, weighted_sum
from .objective import LossStats, group_advantages, grpo_loss, spg_loss, spg_upper_bound, wd1_loss
from .policy_run import PolicyRun, left_pad
from .confidence import completion_entropy
from .rewards import RewardFunction, check_weights, compute_rewards, model_fields
from .tree import sibling_advantages, token_advantages, tree_rollout

__all__ = ["GRPOTrainer", "completion_mask"]

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


class GRPOTrainer(PolicyRun):
    """GRPO on a masked diffusion LM with pluggable rollout sampler and likelihood estimator.

    Args:
        model: an absorbing denoiser (``DDiTModel`` with ``parameterization="subs"`` or ``"score"``, or an adapter
            from :mod:`diffusion.adapters`), or with ``estimator="sepo"`` a uniform-process score model.
        tokenizer: decodes completions for the reward functions and encodes prompts.
        config: the run.
        reward_functions, reward_weights: ``(prompts, completions, **fields) -> list[float | None]`` and their weights.
        records: prompt records, each a dict with ``"prompt"`` (text) and any fields the rewards read.
    """

    run_name = "grpo"

    def __init__(self, model: nn.Module, tokenizer: Any, config: GRPOConfig, reward_functions: Sequence[RewardFunction],
                 records: Sequence[dict[str, Any]], reward_weights: Sequence[float] | None = None) -> None:
        spec = DiffusionSpec.of(model)
        check_policy(spec, config.estimator)
        if not reward_functions:
            raise ValueError("reward_functions is empty: GRPO needs at least one reward")
        if not records or any("prompt" not in r for r in records):
            raise ValueError("records must be a non-empty list of dicts with a 'prompt' field")
        weights = list(reward_weights) if reward_weights is not None else [1.0] * len(reward_functions)
        check_weights(list(reward_functions), weights)
        super().__init__(model, tokenizer, config, needs_reference=config.beta > 0)
        if config.prompts_per_step % self.world:
            raise ValueError(f"prompts_per_step ({config.prompts_per_step}) must be divisible by the number of "
                             f"processes ({self.world}): every rank rolls out whole groups")
        self.records = list(records)
        self.reward_functions = list(reward_functions)
        self.reward_weights = weights
        self.model_fields = model_fields(self.reward_functions)
        self.mask_id = spec.mask_id
        self.eos_id = tokenizer.eos_token_id
        self.estimator: LikelihoodEstimator = get_estimator(config.estimator, self.mask_id, **config.estimator_options())
        options = dict(config.sampler_options or {})
        if "temperature" in inspect.signature(SAMPLERS[config.sampler].__init__).parameters:
            options["temperature"] = config.temperature
        elif config.temperature != 1.0:
            raise ValueError(f"sampler={config.sampler!r} has no temperature, got temperature={config.temperature}")
        self.sampler = get_sampler(config.sampler, **options)
        self.sampler.check_model(spec)

    # ----- one rollout step -------------------------------------------------------------------------
    def _prompt_ids(self, records: list[dict[str, Any]]) -> Tensor:
        encoded = [self.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in records]
        return left_pad(encoded, self.tokenizer)

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
        size = cfg.group_size
        confidence = [(slice(k * size, (k + 1) * size), derive_generator(cfg.seed, step, "confidence", g))
                      for k, g in enumerate(groups)]
        if cfg.rollout == "tree":  # every node's segment from its own stream: (group, level, node) -> index
            depth = cfg.tree_depth
            prompts = self._prompt_ids([self.records[picks[g]] for g in groups])
            tree = tree_rollout(self.sampler, self.model.eval(), prompts, cfg.completion_length, cfg.sampling_steps,
                                cfg.tree_branches, depth, lambda p, level, node: derive_generator(
                                    cfg.seed, step, "rollout", (groups[p] * (depth + 1) + level) * size + node))
            batch = self._reward(records, tree["tokens"], tree["nfe"], tree["row_calls"], confidence)
        else:
            streams = RowStreams([derive_generator(cfg.seed, step, "rollout", g) for g in groups], size)
            batch = self._complete(records, streams, confidence)
        if cfg.rollout == "tree" and cfg.tree_advantages == "sibling":  # per token: its segment's sibling set
            nodes = sibling_advantages(batch["rewards"], cfg.tree_branches, cfg.tree_depth, scale=cfg.advantage_scale)
            advantages = token_advantages(nodes, tree["depth"]).float()
        else:
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

    @torch.no_grad()
    def _complete(self, records: list[dict[str, Any]], generator: Any,
                  confidence: list[tuple[slice, torch.Generator]]) -> dict[str, Any]:
        """Sample one completion per record and reward it (:meth:`_reward`)."""
        prompt_ids = self._prompt_ids(records)
        canvas = torch.cat([prompt_ids, torch.full((len(records), self.config.completion_length), FREE)], dim=1)
        self.model.eval()
        out = self.sampler.generate(self.model, canvas=canvas, num_steps=self.config.sampling_steps, generator=generator)
        return self._reward(records, out.tokens.cpu(), out.nfe, out.nfe * len(records), confidence)

    @torch.no_grad()
    def _reward(self, records: list[dict[str, Any]], sequences: Tensor, nfe: int, row_calls: int,
                confidence: list[tuple[slice, torch.Generator]]) -> dict[str, Any]:
        """Decode each completion up to its first EOS and reward it.  ``confidence`` splits the rows into chunks,
        each with the generator of the masks its ``completion_entropy`` uses (drawn only when a reward asks for
        that field)."""
        width = sequences.shape[1] - self.config.completion_length
        completions = sequences[:, width:]
        mask = completion_mask(completions, self.eos_id)
        layout = torch.zeros_like(sequences, dtype=torch.bool)
        layout[:, width:] = True
        texts = [self.tokenizer.decode(c[m].tolist(), skip_special_tokens=True) for c, m in zip(completions, mask)]
        fields = {k: [r.get(k) for r in records] for k in records[0] if k != "prompt"}
        if "completion_entropy" in self.model_fields:
            chunks = [completion_entropy(self.model, sequences[rows], layout[rows], mask[rows], self.mask_id, g)
                      for rows, g in confidence]
            fields["completion_entropy"] = torch.cat(chunks).tolist()
        rewards, per_function = compute_rewards(self.reward_functions, self.reward_weights,
                                                [r["prompt"] for r in records], texts,
                                                timeout=self.config.reward_timeout, **fields)
        return {"sequences": sequences, "layout": layout, "mask": mask, "rewards": rewards,
                "per_function": per_function, "texts": texts, "nfe": nfe, "row_calls": row_calls}

    def evaluate(self, records: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, float]:
        """Mean total and per-function reward of one sampled completion per record (a held-out check); with several
        processes each scores its share of the records."""
        share = list(records)[self.rank::self.world]
        batch = self._complete(share, torch.Generator().manual_seed(seed + self.rank),
                               [(slice(0, len(share)), derive_generator(seed, 0, "confidence", self.rank))])
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
        with self.reference_model() as reference:
            return self._score(reference, draw)

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
        for j, draw in enumerate(draws):
            loss, info = self._policy_loss(draw, old[j], ref[j], advantages, mask, float(units), normalizer)
            self.optimizer_step(loss)
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
            "rollout_nfe": int(self._sum(batch["nfe"])), "rollout_row_calls": int(self._sum(batch["row_calls"])),
            "rollout_seconds": rollout_seconds,
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

    def _postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{metrics['reward_mean']:.3f}", "loss": f"{metrics['loss']:.3f}"}
