"""Tree rollouts with sibling advantages (rl/tree.py): the advantages' invariants, the tree's shared beginnings and
its calls, and the trainer's use of them."""

from __future__ import annotations

import pytest
import torch

from diffusion.training.seeding import derive_generator
from rl import GRPOTrainer
from rl.config import GRPOConfig
from rl.objective import group_advantages
from rl.tasks import SortTask
from rl.tree import sibling_advantages, token_advantages, tree_rollout, tree_segments
from samplers import get_sampler
from tests.test_rl import _config, _task_model


@pytest.mark.parametrize("scale", ["group", "none"])
def test_sibling_advantages_sum_to_zero_in_every_sibling_set(scale):
    branches, depth = 3, 3
    rewards = torch.rand(2 * branches ** depth, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rewards[5] = float("nan")  # an excluded leaf
    nodes = sibling_advantages(rewards, branches, depth, scale=scale)
    for d in range(1, depth + 1):
        per_node = nodes[:, d - 1].view(-1, branches ** (depth - d))  # one row per depth-d node (its leaves agree)
        assert bool((per_node == per_node[:, :1]).all())
        sibling_sets = per_node[:, 0].view(-1, branches)
        torch.testing.assert_close(sibling_sets.sum(-1), torch.zeros(len(sibling_sets), dtype=torch.float64),
                                   rtol=0, atol=1e-12)
    leaves = nodes[:, -1]  # the deepest sibling sets are the flat groups of K leaves
    torch.testing.assert_close(leaves, group_advantages(rewards, branches, scale=scale).nan_to_num(0.0))


def test_one_segment_is_the_flat_group_and_tokens_take_their_segment_advantage():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25])
    torch.testing.assert_close(sibling_advantages(rewards, 4, 1)[:, 0], group_advantages(rewards, 4))
    nodes = torch.tensor([[0.5, -1.0], [0.5, 1.0]])
    committed = torch.tensor([[1, 2, 2], [2, 1, 1]])
    assert token_advantages(nodes, committed).tolist() == [[0.5, -1.0, -1.0], [1.0, 0.5, 0.5]]
    assert tree_segments(7, 3) == [3, 2, 2]
    with pytest.raises(ValueError, match="tree_depth=4 exceeds sampling_steps=3"):
        tree_segments(3, 4)
    with pytest.raises(ValueError, match="tree_depth=4 exceeds sampling_steps=3"):
        GRPOConfig(rollout="tree", group_size=16, tree_depth=4, sampling_steps=3)
    with pytest.raises(ValueError, match="group_size must equal it"):
        GRPOConfig(rollout="tree", group_size=6)


def test_leaves_share_what_their_common_ancestor_committed_and_the_calls_match_flat():
    model, tokenizer = _task_model()
    model.eval()
    prompts = torch.tensor(tokenizer(["31415>", "27182>"])["input_ids"])
    branches, depth, steps = 2, 3, 6
    out = tree_rollout(get_sampler("remask"), model, prompts, 6, steps, branches, depth,
                       lambda p, level, node: derive_generator(0, 0, "rollout", (p * 4 + level) * 8 + node))
    tokens, committed = out["tokens"][:, 6:], out["depth"]
    assert tokens.shape == (16, 6) and bool((committed >= 1).all()) and bool((committed <= depth).all())
    assert (committed == 1).sum(-1).tolist() == [2] * 16  # remask commits 1 token per step: 2 steps per segment
    for a in range(16):
        for b in range(8 * (a // 8), 8 * (a // 8) + 8):  # the leaves of the same prompt
            shared = 0  # the depth of the deepest common ancestor of leaves a and b
            while shared < depth and a // branches ** (depth - shared - 1) == b // branches ** (depth - shared - 1):
                shared += 1
            early = committed[a] <= shared
            assert torch.equal(committed[a][early], committed[b][early]) and torch.equal(tokens[a][early], tokens[b][early])
    assert out["nfe"] == steps  # one batched call per step, as a flat group of 8 spends
    assert out["row_calls"] == 2 * sum(branches ** d * s for d, s in zip(range(1, depth + 1), tree_segments(steps, depth)))


def test_a_tree_step_trains_with_per_token_sibling_advantages(tmp_path):
    task = SortTask(5)
    records = task.records(50, torch.Generator().manual_seed(1))
    model, tokenizer = _task_model()
    config = _config(tmp_path, rollout="tree", group_size=8, variance_draws=0, max_steps=1)
    trainer = GRPOTrainer(model, tokenizer, config, task.reward_functions, records, task.reward_weights)
    batch = trainer.rollout(0)
    assert batch["advantages"].shape == (config.prompts_per_step * 8, config.completion_length)
    flat = GRPOTrainer(_task_model()[0], tokenizer, _config(tmp_path / "f", group_size=8), task.reward_functions,
                       records, task.reward_weights)
    assert batch["nfe"] == flat.rollout(0)["nfe"] == config.sampling_steps
    trainer.rollout = lambda step: batch
    metrics = trainer.train_step(0)
    assert metrics["rollout_row_calls"] < config.prompts_per_step * 8 * config.sampling_steps
    mask = batch["mask"].double()  # one inner step: every ratio is 1, so the loss is -mean over tokens of A
    assert metrics["loss"] == pytest.approx(float(-(batch["advantages"].double() * mask).sum() / mask.sum()), abs=1e-6)
