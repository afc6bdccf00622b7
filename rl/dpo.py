"""``DPOTrainer``: direct preference optimisation of a masked diffusion LM on chosen/rejected pairs.

One step (DPO, Rafailov et al. 2023, with the ELBO for log pi as in LLaDA 1.5's VRPO, Zhu et al. 2025):

1. take ``pairs_per_step`` pairs (prompt, chosen, rejected), laid out by
   :func:`diffusion.data.preferences.preference_batch`;
2. draw the masks of each answer (from its pair's own stream, so a pair's masks do not depend on the batch or the
   number of processes) and estimate ``l_theta`` of both answers with the configured ELBO estimator;
3. estimate ``l_ref`` under the **same** masks (``antithetic``, VRPO) or under independent ones;
4. minimise :func:`rl.objective.dpo_loss`.

The loop, checkpoints, resume, LoRA (the base model is then the reference) and export are
:class:`rl.policy_run.PolicyRun`'s.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diffusion.data.preferences import PreferenceExample, encode_preferences, preference_batch
from diffusion.spec import DiffusionSpec
from diffusion.training.seeding import derive_generator

from .dpo_config import DPOConfig
from diffusion.estimators import Draw, LikelihoodEstimator, check_policy, concat_draws, get_estimator
from .objective import dpo_loss
from .policy_run import PolicyRun

__all__ = ["DPOTrainer"]


class DPOTrainer(PolicyRun):
    """DPO with ELBO likelihood estimates and VRPO's variance reduction.

    Args:
        model: an absorbing denoiser (a ``DDiTModel``, ``subs`` or ``score``, or an adapter-wrapped model).
        tokenizer: encodes the rows (with its chat template when it has one and ``config.format`` allows).
        config: the run.
        rows: preference rows, each a dict with ``prompt``, ``chosen`` and ``rejected`` strings.
    """

    run_name = "dpo"

    def __init__(self, model: nn.Module, tokenizer: Any, config: DPOConfig, rows: Sequence[dict[str, Any]]) -> None:
        spec = DiffusionSpec.of(model)
        check_policy(spec, config.estimator)  # absorbing: subs, or score read as a denoiser (RADD)
        if tokenizer.eos_token_id is None:
            raise ValueError("DPO pads answers with EOS, and this tokenizer has no eos_token")
        self.examples: list[PreferenceExample] = encode_preferences(
            list(rows), tokenizer, answer_length=config.completion_length, format=config.format)
        self.prompt_width = max(len(e.prompt) for e in self.examples)
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and self.prompt_width + config.completion_length > positions:
            raise ValueError(f"the longest prompt ({self.prompt_width} tokens) and completion_length="
                             f"{config.completion_length} exceed the model's {positions} positions")
        super().__init__(model, tokenizer, config, needs_reference=True)
        if config.pairs_per_step % self.world:
            raise ValueError(f"pairs_per_step ({config.pairs_per_step}) must be divisible by the number of processes "
                             f"({self.world})")
        self.estimator = get_estimator(config.estimator, spec.mask_id, num_points=config.num_points)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def _batch(self, examples: list[PreferenceExample]) -> tuple[Tensor, Tensor]:
        return preference_batch(examples, prompt_width=self.prompt_width, answer_length=self.config.completion_length,
                                pad_id=self.pad_id, eos_id=self.eos_id)

    def _draws(self, estimator: LikelihoodEstimator, sequences: Tensor, completion: Tensor, step: int, purpose: str,
               pair_ids: list[int]) -> Draw:
        """One draw for the rows ``[2k, 2k + 2)`` of each pair k, from the stream of its global index."""
        draws = []
        for k, g in enumerate(pair_ids):
            rows = slice(2 * k, 2 * k + 2)
            generator = derive_generator(self.config.seed, step, purpose, g)
            draws.append(estimator.draw(sequences[rows], completion[rows], generator))
        return concat_draws(draws)

    def log_likelihoods(self, examples: list[PreferenceExample], step: int, pair_ids: list[int],
                        purpose: str = "masks", estimator: LikelihoodEstimator | None = None) -> tuple[Tensor, Tensor]:
        """``(l_theta [b, 2], l_ref [b, 2])``: column 0 the chosen answer's ELBO estimate, column 1 the rejected's;
        ``l_theta`` is differentiable.  The masks come from the streams ``(seed, step, purpose, pair id)``; the
        estimator is the run's unless given."""
        estimator = estimator or self.estimator
        sequences, completion = self._batch(examples)
        draw = self._draws(estimator, sequences, completion, step, purpose, pair_ids)
        ref_draw = draw if self.config.antithetic else \
            self._draws(estimator, sequences, completion, step, "reference", pair_ids)
        policy = estimator.estimate(self.model, draw).sum(-1).view(-1, 2)
        with torch.no_grad(), self.reference_model() as reference:
            ref = estimator.estimate(reference, ref_draw).sum(-1).view(-1, 2)
        return policy, ref

    def _pair_ids(self, step: int) -> list[int]:
        """This rank's share of the step's pairs, as indices into the step's draw of ``pairs_per_step`` pairs."""
        per_rank = self.config.pairs_per_step // self.world
        return list(range(self.rank * per_rank, (self.rank + 1) * per_rank))

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step on ``pairs_per_step`` pairs (each rank its share; the loss is its share of the mean)."""
        cfg = self.config
        start = time.perf_counter()
        picks = torch.randint(0, len(self.examples), (cfg.pairs_per_step,),
                              generator=derive_generator(cfg.seed, step, "pairs")).tolist()
        pair_ids = self._pair_ids(step)
        policy, ref = self.log_likelihoods([self.examples[picks[g]] for g in pair_ids], step, pair_ids)
        loss, margins = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=cfg.beta,
                                 normalizer=cfg.pairs_per_step)
        self.optimizer_step(loss)
        with torch.no_grad():
            rewards = cfg.beta * (policy.detach() - ref)
        count = cfg.pairs_per_step
        return {
            "step": step, "loss": float(self._sum(loss.detach())),
            "margin": float(self._sum(margins.double().sum())) / count,
            "accuracy": float(self._sum((margins > 0).double().sum())) / count,
            "reward_chosen": float(self._sum(rewards[:, 0].double().sum())) / count,
            "reward_rejected": float(self._sum(rewards[:, 1].double().sum())) / count,
            "seconds": time.perf_counter() - start,
        }

    @torch.no_grad()
    def evaluate(self, rows: Sequence[dict[str, Any]], seed: int = 0, num_points: int = 32) -> dict[str, float]:
        """On held-out rows: how often the policy's ELBO prefers the chosen answer (``l_theta(c) > l_theta(r)``),
        and the mean DPO margin against the reference, with a ``num_points``-call stratified ELBO estimate (low
        variance, whatever the training estimator); each rank scores its share."""
        examples = encode_preferences(list(rows), self.tokenizer, answer_length=self.config.completion_length,
                                      format=self.config.format)
        if max(len(e.prompt) for e in examples) > self.prompt_width:
            raise ValueError(f"a held-out prompt is longer than the training prompts ({self.prompt_width} tokens)")
        ids = list(range(len(examples)))[self.rank::self.world]
        estimator = get_estimator("stratified", self.estimator.mask_id, num_points=num_points)
        policy, ref = self.log_likelihoods([examples[i] for i in ids], seed, ids, "eval", estimator)
        prefers = (policy[:, 0] > policy[:, 1]).double().sum()
        margins = self.config.beta * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]))
        count = len(examples)
        return {"prefers_chosen": float(self._sum(prefers)) / count,
                "margin": float(self._sum(margins.double().sum())) / count}

    def _postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['loss']:.3f}", "accuracy": f"{metrics['accuracy']:.2f}"}
