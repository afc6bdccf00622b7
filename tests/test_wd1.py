"""wd1 (rl/objective.py): its weights and loss by hand, what it leaves out, and one trainer step that lowers it."""

from __future__ import annotations

import math

import pytest
import torch

from rl import GRPOConfig, GRPOTrainer
from rl.objective import wd1_loss, wd1_weights
from rl.tasks import SortTask
from tests.test_rl import _config, _task_model


def test_weights_and_loss_by_hand():
    advantages = torch.tensor([1.0, -1.0, 0.5, 0.5])
    log_likelihood = torch.tensor([-2.0, -5.0, -3.0, -4.0], dtype=torch.float64, requires_grad=True)
    up = math.exp(1) / (math.exp(1) + math.exp(-1))  # softmax([1, -1])[0]
    plus, minus = wd1_weights(advantages, 2)
    torch.testing.assert_close(plus, torch.tensor([up, 1 - up, 0.5, 0.5], dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(minus, torch.tensor([1 - up, up, 0.5, 0.5], dtype=torch.float64), rtol=0, atol=1e-15)
    loss = wd1_loss(log_likelihood, advantages, 2)
    expected = ((1 - up) - up) * -2.0 + (up - (1 - up)) * -5.0  # the second group's equal advantages add nothing
    assert float(loss.detach()) == pytest.approx(expected / 2, rel=1e-14)
    loss.backward()  # descent raises the likelihood of the better completion, lowers the worse one's
    torch.testing.assert_close(log_likelihood.grad, torch.tensor([1 - 2 * up, 2 * up - 1, 0, 0],
                                                                 dtype=torch.float64) / 2)
    hot = wd1_weights(advantages, 2, temperature=2.0)[0]
    assert float(hot[0]) == pytest.approx(math.exp(0.5) / (math.exp(0.5) + math.exp(-0.5)), rel=1e-14)


def test_completions_without_a_reward_are_left_out_of_the_softmax():
    advantages = torch.tensor([1.0, -3.0, 0.0, 0.0])
    valid = torch.tensor([True, False, False, False])
    plus, minus = wd1_weights(advantages, 2, valid=valid)
    assert plus.tolist() == minus.tolist() == [1.0, 0.0, 0.0, 0.0]  # one valid completion: no preference
    assert float(wd1_loss(torch.tensor([-2.0, -5.0, -1.0, -1.0]), advantages, 2, valid=valid)) == 0.0
    with pytest.raises(ValueError, match="temperature=0"):
        wd1_weights(advantages, 2, temperature=0)


def test_a_trainer_step_lowers_the_wd1_loss_under_its_own_masks(tmp_path):
    task = SortTask(5)
    records = task.records(50, torch.Generator().manual_seed(1))
    model, tokenizer = _task_model()
    trainer = GRPOTrainer(model, tokenizer, _config(tmp_path, objective="wd1", max_steps=1, variance_draws=0),
                          task.reward_functions, records, task.reward_weights)
    seen, rollout = {}, trainer.rollout

    def remember(step):
        batch = rollout(step)
        draw = trainer._draw(batch, step, "masks", 0)  # the draw train_step uses for its one inner step
        with torch.no_grad():
            seen.update(batch=batch, draw=draw, before=trainer._score(trainer.model, draw))
        return batch

    trainer.rollout = remember
    metrics = trainer.train_step(0)
    with torch.no_grad():
        after = trainer._score(trainer.model, seen["draw"])
    mask, advantages = seen["batch"]["mask"], seen["batch"]["advantages"]
    assert bool((advantages != 0).any())  # the group rewards differ, so the step has something to do

    def loss(scores):
        return float(wd1_loss(torch.where(mask, scores, 0.0).sum(-1), advantages, 4, valid=mask.any(-1)))

    assert metrics["loss"] == pytest.approx(loss(seen["before"]), rel=1e-5)
    assert loss(after) < loss(seen["before"])
    assert metrics["ratio_mean"] == 1.0 and metrics["kl"] == 0.0


def test_wd1_config_errors_name_the_value():
    with pytest.raises(ValueError, match="objective='ppo'"):
        GRPOConfig(objective="ppo")
    with pytest.raises(ValueError, match="beta must be 0, got beta=0.1"):
        GRPOConfig(objective="wd1", beta=0.1)
    with pytest.raises(ValueError, match="wd1_temperature=0"):
        GRPOConfig(objective="wd1", wd1_temperature=0.0)
