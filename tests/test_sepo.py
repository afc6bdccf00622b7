"""SEPO (diffusion/estimators.py: score_log_likelihood, Sepo): the concrete-score identity on an enumerable toy with exact
scores, exact conditionals per position, the ratio at theta = theta_old, a SEDD model that learns, and the errors."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from diffusion import DDiTConfig, DDiTModel
from diffusion.lambda_form import model_log_probs
from rl import GRPOTrainer
from rl.config import GRPOConfig
from diffusion.estimators import get_estimator, score_log_likelihood
from rl.objective import grpo_loss
from rl.sft import supervised_warmup
from rl.tasks import SortTask, char_tokenizer

V, L = 3, 3
STATES = list(itertools.product(range(V), repeat=L))
GEOMETRIC = {"sigma_min": 1e-4, "sigma_max": 20.0}


def test_the_identity_and_its_gradient_over_the_whole_space():
    theta = torch.randn(len(STATES), generator=torch.Generator().manual_seed(0), dtype=torch.float64,
                        requires_grad=True)
    for x in (0, 13, 26):
        log_q = theta.log_softmax(-1)
        log_s = log_q - log_q[x]  # exact concrete scores s(x)_y = q(y) / q(x), s(x)_x = 1
        value = score_log_likelihood(log_s)
        assert abs(float(value.detach()) - float(log_q[x].detach())) < 1e-12
        (grad,) = torch.autograd.grad(value, theta, retain_graph=True)
        (truth,) = torch.autograd.grad(log_q[x], theta, retain_graph=True)
        torch.testing.assert_close(grad, truth, rtol=0, atol=1e-12)
        # the paper's form: -sum_y q(y) grad log s(x)_y, with q(y) held fixed
        (paper,) = torch.autograd.grad(-(log_q.exp().detach() * log_s).sum(), theta)
        torch.testing.assert_close(paper, truth, rtol=0, atol=1e-12)


class ExactScores(torch.nn.Module):
    """A uniform-process "score model" of a joint over ``[prompt, y]``: ``log s(x)_(k, v) = log q(x^{k <- v}) -
    log q(x)`` at every position (the prompt's first token is ignored), whatever the time."""

    def __init__(self, joint):
        super().__init__()
        self.joint = joint
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.config = SimpleNamespace(process="uniform", parameterization="score", schedule="geometric",
                                      schedule_kwargs=GEOMETRIC, time_conditioning=True, vocab_size=V,
                                      mask_token_id=None)

    def forward(self, input_ids, total_noise=None, attention_mask=None):
        out = torch.zeros(*input_ids.shape, V, dtype=torch.float64)
        for b, row in enumerate(input_ids.tolist()):
            y = tuple(row[1:])
            for k in range(L):
                for v in range(V):
                    other = y[:k] + (v,) + y[k + 1:]
                    out[b, k + 1, v] = math.log(self.joint[other]) - math.log(self.joint[y])
        return SimpleNamespace(logits=out + 0 * self.anchor)


def test_sepo_terms_are_the_exact_conditionals_of_each_token():
    weights = torch.rand(len(STATES), generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.05
    joint = dict(zip(STATES, (weights / weights.sum()).tolist()))
    estimator = get_estimator("sepo", None)
    sequences = torch.tensor([[0, *y] for y in STATES[::4]])
    completion = torch.tensor([[False] + [True] * L] * len(sequences))
    values = estimator.estimate(ExactScores(joint), estimator.draw(sequences, completion))
    for row, y in zip(values.tolist(), STATES[::4]):
        for k in range(L):
            total = sum(joint[y[:k] + (v,) + y[k + 1:]] for v in range(V))
            assert row[k] == pytest.approx(math.log(joint[y] / total), abs=1e-6)  # float32 estimate


def _sedd(tokenizer, length=16):
    torch.manual_seed(0)
    return DDiTModel(DDiTConfig(vocab_size=len(tokenizer), process="uniform", parameterization="score", hidden_size=64,
                                num_hidden_layers=2, num_attention_heads=4, cond_dim=16, max_position_embeddings=length,
                                schedule="geometric", schedule_kwargs=GEOMETRIC))


def test_ratio_is_one_at_theta_old_and_bad_pairings_fail_in_one_line():
    tokenizer = char_tokenizer()
    model = _sedd(tokenizer).eval()
    sequences = torch.randint(0, 11, (6, 12), generator=torch.Generator().manual_seed(0))
    completion = torch.zeros_like(sequences, dtype=torch.bool)
    completion[:, 6:] = True
    estimator = get_estimator("sepo", None)
    with torch.no_grad():
        old = estimator.estimate(model, estimator.draw(sequences, completion))
    current = estimator.estimate(model, estimator.draw(sequences, completion))
    _, stats = grpo_loss(current, old, torch.tensor([1.0, -1.0] * 3), completion[:, 6:])
    assert stats.ratio_mean == 1.0 and stats.clip_low == stats.clip_high == 0.0
    task = SortTask(5)
    records = task.records(10, torch.Generator().manual_seed(1))
    subs = DDiTModel(DDiTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                cond_dim=16, max_position_embeddings=16, mask_token_id=tokenizer.mask_token_id))
    cases = ((subs, {"estimator": "sepo", "sampler": "analytic"}, "estimator='sepo' needs a uniform-process score"),
             (model, {"estimator": "coupled", "sampler": "analytic"}, "needs an absorbing model"),
             (model, {"estimator": "sepo", "sampler": "analytic", "temperature": 0.5}, "has no temperature"),
             (model, {"estimator": "sepo", "sampler": "remask"}, "needs an absorbing model with parameterization"))
    for net, options, message in cases:
        with pytest.raises(ValueError, match=message):
            GRPOTrainer(net, tokenizer, GRPOConfig(output_dir="unused", **options), task.reward_functions, records)


def test_an_absorbing_score_model_is_read_as_a_denoiser():
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = DDiTModel(DDiTConfig(vocab_size=len(tokenizer), parameterization="score", hidden_size=32,
                                 num_hidden_layers=1, num_attention_heads=2, cond_dim=16, max_position_embeddings=16,
                                 mask_token_id=tokenizer.mask_token_id)).eval()
    x = torch.randint(0, 11, (2, 8))
    x[:, ::2] = tokenizer.mask_token_id
    with torch.no_grad():
        log_probs = model_log_probs(model, x, torch.full((2,), 0.5))
        raw = model(input_ids=x, total_noise=torch.full((2,), math.log(2.0))).logits
    probs = log_probs.exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 8))
    assert float(probs[..., tokenizer.mask_token_id].max()) == 0.0
    masked = x == tokenizer.mask_token_id  # p(v) proportional to the score s(x_t)_(i, v) there (RADD)
    expected = raw[..., :-1].softmax(-1)
    torch.testing.assert_close(probs[..., :-1][masked], expected[masked], rtol=1e-5, atol=1e-6)


def test_sepo_raises_a_sedd_models_reward_on_the_sorting_task(tmp_path):
    task, tokenizer = SortTask(5), char_tokenizer()
    model = _sedd(tokenizer)
    supervised_warmup(model, lambda g: task.sft_batch(tokenizer, 64, g), steps=150, lr=3e-3, progress=False)
    config = GRPOConfig(output_dir=str(tmp_path / "rl"), max_steps=60, prompts_per_step=8, group_size=8,
                        completion_length=6, sampler="analytic", sampling_steps=12, estimator="sepo", lr=3e-4,
                        save_every=0, progress=False, variance_draws=0)
    trainer = GRPOTrainer(model, tokenizer, config, task.reward_functions,
                          task.records(2000, torch.Generator().manual_seed(1)), task.reward_weights)
    held_out = task.records(256, torch.Generator().manual_seed(2))
    before = trainer.evaluate(held_out)["reward"]
    trainer.train()
    after = trainer.evaluate(held_out)["reward"]
    assert after > before + 0.08, (before, after)  # measured 0.423 -> 0.563
