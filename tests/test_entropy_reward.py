"""RENT's entropy reward (rl/confidence.py, rl/rewards.py): exact on a model with known predictions, what the trainer
feeds it, and GRPO on it alone lowers the policy's entropy."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rl import GRPOTrainer
from rl.confidence import completion_entropy
from rl.rewards import RewardError, entropy_reward, model_fields
from rl.tasks import SortTask
from tests.reference import ExactDenoiser
from tests.test_rl import _config, _task_model


def test_each_token_entropy_is_read_once_from_the_view_that_masks_it():
    marginals = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5], [0.9, 0.05, 0.05]]
    joint = {y: math.prod(marginals[k][y[k]] for k in range(4)) for y in itertools.product(range(3), repeat=4)}
    model = ExactDenoiser(joint, prefix=1)  # independent tokens: p(y_k | anything) is marginal k
    h = [-sum(p * math.log(p) for p in m) for m in marginals]
    sequences = torch.tensor([[0, 0, 1, 2, 0]] * 50)
    layout = torch.tensor([[False] + [True] * 4] * 50)
    counted = torch.tensor([[True, True, True, True], [True, True, False, False]] * 25)
    values = completion_entropy(model, sequences, layout, counted, 3, torch.Generator().manual_seed(0))
    expected = torch.tensor([sum(h) / 4, (h[0] + h[1]) / 2] * 25, dtype=torch.float64)
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-6)  # float32 logits


def test_model_fields_and_the_reward():
    assert model_fields([entropy_reward]) == {"completion_entropy"}
    assert entropy_reward(["a", "b"], ["x", "y"], completion_entropy=[0.5, 1.5]) == [-0.5, -1.5]

    def odd(prompts, completions, **kw):
        return [0.0] * len(completions)

    odd.model_fields = ("hidden_state",)
    with pytest.raises(RewardError, match="hidden_state"):
        model_fields([odd])


def test_grpo_on_the_entropy_reward_alone_lowers_the_policy_entropy(tmp_path):
    task = SortTask(5)
    records = task.records(100, torch.Generator().manual_seed(1))
    model, tokenizer = _task_model()
    config = _config(tmp_path, max_steps=12, lr=1e-2, variance_draws=0, save_every=0)
    trainer = GRPOTrainer(model, tokenizer, config, [entropy_reward], records)
    seen, rollout = {}, trainer.rollout

    def remember(step):
        batch = rollout(step)
        seen.setdefault("first", batch)
        return batch

    trainer.rollout = remember
    before = trainer.evaluate(records[:32])["reward"]
    history = trainer.train()
    after = trainer.evaluate(records[:32])["reward"]
    batch = seen["first"]  # the rewards are -H of the completions, under the first group's confidence stream
    from diffusion.training.seeding import derive_generator

    model_before, _ = _task_model()
    group = slice(0, config.group_size)
    entropy = completion_entropy(model_before.eval(), batch["sequences"][group], batch["layout"][group],
                                 batch["mask"][group], tokenizer.mask_token_id, derive_generator(0, 0, "confidence", 0))
    torch.testing.assert_close(batch["rewards"][group], -entropy)
    assert after > before + 0.1, (before, after, [h["reward_mean"] for h in history])
