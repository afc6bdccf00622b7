"""Samplers: shared invariants for every sampler, exact caching, the SEDD steps, the remasking schedule."""


import math

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput

from diffusion import DDiTConfig, DDiTModel
from diffusion.processes import AbsorbingProcess, UniformProcess
from diffusion.schedules import GeometricSchedule
from diffusion import MaskedLMAdapter
from samplers import FREE, SAMPLERS, get_sampler, register_sampler
from diffusion.adapters import DenoiserConfig
from samplers.base import token_probs
from samplers.remasking import transfer_schedule
from samplers.sedd import AnalyticSampler, EulerSampler

V = 20  # real tokens; MASK = 20 for absorbing models


def _ddit(**overrides):
    torch.manual_seed(0)
    base = dict(vocab_size=V + 1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, cond_dim=16,
                max_position_embeddings=64)
    model = DDiTModel(DDiTConfig(**{**base, **overrides})).eval()
    with torch.no_grad():  # open the adaLN gates so time conditioning matters
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model


class Counting(nn.Module):
    """Counts forward calls of the wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, 0

    def forward(self, **kwargs):
        self.calls += 1
        return self.model(**kwargs)


MASKED = _ddit()
SCORE_ABSORBING = _ddit(parameterization="score")
SCORE_UNIFORM = _ddit(parameterization="score", process="uniform", vocab_size=V, schedule="geometric",
                      schedule_kwargs={"sigma_min": 1e-4, "sigma_max": 20.0})
X0_UNIFORM = _ddit(parameterization="x0", process="uniform", vocab_size=V, schedule="geometric",
                   schedule_kwargs={"sigma_min": 1e-4, "sigma_max": 20.0})
CASES = [
    ("ancestral", {}, MASKED),
    ("ancestral", {"cache": False, "temperature": 0.8, "top_k": 5}, MASKED),
    ("remask", {"strategy": "low_confidence"}, MASKED),
    ("remask", {"strategy": "margin", "temperature": 1.0}, MASKED),
    ("remask", {"strategy": "entropy", "top_p": 0.9, "temperature": 1.0}, MASKED),
    ("remask", {"strategy": "random", "block_length": 6}, MASKED),
    ("threshold", {"threshold": 0.2, "block_length": 6}, MASKED),
    ("remask", {"entropy_bound": 0.5}, MASKED),
    ("ardm", {"curve": [3.0 - 0.1 * t for t in range(18)]}, MASKED),
    ("remdm", {"schedule": "cap", "eta": 0.3}, MASKED),
    ("remdm", {"schedule": "rescale", "eta": 0.5, "top_k": 5}, MASKED),
    ("remdm", {"schedule": "conf"}, MASKED),
    ("remdm", {"schedule": "loop", "eta": 0.2}, MASKED),
    ("euler", {}, SCORE_ABSORBING),
    ("analytic", {}, SCORE_ABSORBING),
    ("analytic", {}, MASKED),  # a subs model through RADD's identity
    ("euler", {}, SCORE_UNIFORM),
    ("analytic", {}, SCORE_UNIFORM),
    ("analytic", {}, X0_UNIFORM),  # an x0 model through the uniform mixture identity
    ("euler", {}, X0_UNIFORM),
    ("d3pm", {}, X0_UNIFORM),
    ("d3pm", {}, MASKED),
    ("psi", {}, X0_UNIFORM),
    ("psi", {"mode": "constant", "eta": 0.5}, SCORE_UNIFORM),
]


def _canvas():
    canvas = torch.full((3, 18), FREE)
    canvas[:, :3] = torch.tensor([1, 2, 3])  # prefix
    canvas[:, 8] = 7  # middle
    canvas[:, -2:] = torch.tensor([4, 5])  # suffix
    return canvas


@pytest.mark.parametrize("name, kwargs, model", CASES, ids=[f"{n}-{k}-{m.config.process}-{m.config.parameterization}" for n, k, m in CASES])
def test_every_sampler_keeps_prompt_leaves_no_mask_is_seeded_and_counts_calls(name, kwargs, model):
    sampler = get_sampler(name, **kwargs)
    counted = Counting(model)
    canvas = _canvas()
    out = sampler.generate(counted, canvas=canvas, num_steps=12, generator=torch.Generator().manual_seed(3),
                           return_trajectory=True)
    fixed = canvas != FREE
    assert torch.equal(out.tokens[fixed], canvas[fixed])
    assert bool((out.tokens < V).all()) and bool((out.tokens >= 0).all())  # no MASK, only real tokens
    assert out.nfe == counted.calls and out.nfe >= 1
    for state in out.trajectory:
        assert torch.equal(state[fixed], canvas[fixed])
    again = sampler.generate(model, canvas=canvas, num_steps=12, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.tokens, out.tokens)
    other = sampler.generate(model, canvas=canvas, num_steps=12, generator=torch.Generator().manual_seed(4))
    if getattr(sampler, "temperature", 1.0) > 0:  # stochastic samplers: another seed, other tokens
        assert not torch.equal(other.tokens, out.tokens)


@pytest.mark.parametrize("name", ["remask", "threshold"])
def test_remasking_commits_scheduled_counts_and_never_changes_committed_tokens(name):
    kwargs = {"block_length": 4} if name == "remask" else {"block_length": 4, "threshold": 0.3}
    out = get_sampler(name, **kwargs).generate(MASKED, batch_size=2, length=16, num_steps=8,
                                               generator=torch.Generator().manual_seed(0), return_trajectory=True)
    committed = [int((s != V).sum()) for s in out.trajectory]
    assert committed[-1] == 2 * 16  # the commits add up to the length
    for before, after in zip(out.trajectory, out.trajectory[1:]):
        done = before != V
        assert torch.equal(after[done], before[done])
    if name == "remask":
        # 4 blocks of 4 positions, 2 steps each: 2 tokens per row per step, never beyond the current block
        assert committed == [4 * k for k in range(9)]
        for k, state in enumerate(out.trajectory[1:], start=1):
            block = (k - 1) // 2
            assert bool((state[:, 4 * (block + 1):] == V).all())


def test_one_token_per_step_when_steps_equal_length():
    out = get_sampler("remask").generate(MASKED, batch_size=1, length=10, num_steps=10,
                                         generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert [int((s != V).sum()) for s in out.trajectory] == list(range(11))


def test_transfer_schedule_invariants():
    masked = torch.tensor([0, 1, 7, 16, 33])
    counts = transfer_schedule(masked, 5)
    assert torch.equal(counts.sum(-1), masked)
    assert int((counts.max(-1).values - counts.min(-1).values).max()) <= 1
    assert bool((counts[:, 1:] <= counts[:, :-1]).all())


class FixedMasked(nn.Module):
    """A time-free subs model with fixed per-position distributions (cheap, deterministic)."""

    def __init__(self, length):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.config = DenoiserConfig(vocab_size=V + 1, mask_token_id=V, max_position_embeddings=64)
        self.table = torch.log_softmax(torch.randn(length, V + 1, generator=torch.Generator().manual_seed(0)), -1)

    def forward(self, input_ids, total_noise=None, attention_mask=None):
        from diffusion.modeling_ddit import subs_log_probs

        return MaskedLMOutput(logits=subs_log_probs(self.table.expand(input_ids.shape[0], -1, -1), input_ids, V))


def test_exact_cache_same_tokens_and_expected_calls():
    n, length = 64, 16
    model = FixedMasked(length)
    calls = []
    for seed in range(300):
        cached = get_sampler("ancestral").generate(model, batch_size=1, length=length, num_steps=n,
                                                  generator=torch.Generator().manual_seed(seed))
        if seed < 20:
            plain = get_sampler("ancestral", cache=False).generate(model, batch_size=1, length=length, num_steps=n,
                                                                  generator=torch.Generator().manual_seed(seed))
            assert torch.equal(cached.tokens, plain.tokens) and plain.nfe == n and cached.nfe < n
        calls.append(cached.nfe)
    expected = n * (1 - (1 - 1 / n) ** length)
    assert abs(sum(calls) / len(calls) - expected) < 1.0, (sum(calls) / len(calls), expected)


def test_exact_cache_recomputes_only_changed_sequences_of_a_real_model():
    plain = get_sampler("ancestral", cache=False).generate(MASKED, batch_size=4, length=12, num_steps=100,
                                                          generator=torch.Generator().manual_seed(0))
    cached = get_sampler("ancestral").generate(MASKED, batch_size=4, length=12, num_steps=100,
                                              generator=torch.Generator().manual_seed(0))
    assert torch.equal(cached.tokens, plain.tokens)
    assert cached.nfe < 50 < plain.nfe


@pytest.mark.parametrize("process_name", ["absorbing", "uniform"])
def test_sedd_steps_against_exact_posterior_for_one_token(process_name):
    # Engineered exact score of a one-token data distribution p0: the analytic step is the exact reverse
    # posterior; Euler approaches it with error O(dt).
    n = 5
    process = AbsorbingProcess(n) if process_name == "absorbing" else UniformProcess(n)
    schedule = GeometricSchedule(sigma_min=1e-3, sigma_max=5.0)  # (Euler is exact for absorbing + log-linear)
    p0 = torch.zeros(process.num_states, dtype=torch.float64)
    p0[:n] = torch.tensor([0.4, 0.1, 0.2, 0.25, 0.05], dtype=torch.float64)

    def marginal(sigma_bar):
        return process.transition_probs(torch.arange(n), sigma_bar).T @ p0[:n]  # (S,)

    t = torch.tensor(0.6, dtype=torch.float64)
    x = torch.tensor([[n if process_name == "absorbing" else 2]])
    p_t = marginal(schedule.total_noise(t))
    score = (p_t / p_t[x[0, 0]])[None, None]
    errors = []
    for dt in (1e-2, 1e-3, 1e-4):
        s = t - dt
        dsigma = schedule.total_noise(t) - schedule.total_noise(s)
        posterior = process.reverse_transition(x, dsigma)[0, 0] * marginal(schedule.total_noise(s)) / p_t[x[0, 0]]
        analytic = AnalyticSampler()._step_probs(process, x, score, schedule, t, s)[0, 0]
        torch.testing.assert_close(analytic, posterior, rtol=1e-9, atol=1e-12)
        euler = EulerSampler()._step_probs(process, x, score, schedule, t, s)[0, 0]
        errors.append((euler - posterior).abs().max().item())
    assert errors[0] > 5 * errors[1] > 25 * errors[2] and errors[2] < 1e-6, errors


def test_masked_lm_adapter_drives_the_samplers():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=32)).eval()
    model = MaskedLMAdapter(bert, mask_token_id=4)
    prompt = torch.tensor([[10, 11, 12]])
    for name in ("ancestral", "remask"):
        out = get_sampler(name).generate(model, prompt_ids=prompt, length=8, num_steps=8,
                                         generator=torch.Generator().manual_seed(0))
        assert torch.equal(out.tokens[:, :3], prompt)
        assert not bool((out.tokens == 4).any())
    with pytest.raises(ValueError, match="mask_token_id=30"):
        MaskedLMAdapter(bert, mask_token_id=30)


def test_token_filters():
    log_probs = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    top_k = token_probs(log_probs, exclude=None, top_k=2)
    torch.testing.assert_close(top_k, torch.tensor([[0.625, 0.375, 0, 0]], dtype=torch.float64))
    top_p = token_probs(log_probs, exclude=None, top_p=0.7)  # 0.5 + 0.3 reaches 0.7
    torch.testing.assert_close(top_p, torch.tensor([[0.625, 0.375, 0, 0]], dtype=torch.float64))
    greedy = token_probs(log_probs, exclude=0, temperature=0)
    assert greedy.tolist() == [[0, 1, 0, 0]]
    hot = token_probs(log_probs, exclude=None, temperature=2.0)
    torch.testing.assert_close(hot, torch.softmax(log_probs / 2, -1))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: get_sampler("beam"), "unknown sampler name='beam'"),
        (lambda: get_sampler("ancestral", temperature=-1), "temperature=-1"),
        (lambda: get_sampler("ancestral", top_p=1.5), "top_p=1.5"),
        (lambda: get_sampler("remask", strategy="loudest"), "strategy='loudest'"),
        (lambda: get_sampler("threshold", threshold=0), "threshold=0"),
        (lambda: get_sampler("remask", entropy_bound=-1.0), "entropy_bound=-1.0"),
        (lambda: get_sampler("remask", entropy_bound=float("nan")), "entropy_bound=nan"),
        (lambda: get_sampler("ancestral").generate(MASKED, batch_size=1, length=8, num_steps=0), "num_steps=0"),
        (lambda: get_sampler("ancestral").generate(MASKED, batch_size=1, length=65, num_steps=4), "65 tokens, beyond the model's context of 64"),
        (lambda: get_sampler("ancestral").generate(MASKED, prompt_ids=torch.tensor([[1, V]]), length=4, num_steps=4), "not the mask id"),
        (lambda: get_sampler("ancestral").generate(MASKED, prompt_ids=torch.tensor([[1, 999]]), length=4, num_steps=4), r"got \[999\]"),
        (lambda: get_sampler("ancestral").generate(MASKED, prompt_ids=torch.zeros(1, 0, dtype=torch.long), length=4, num_steps=4), "non-empty"),
        (lambda: get_sampler("remask", block_length=4).generate(MASKED, batch_size=1, length=12, num_steps=2), r"at least the number of blocks to decode \(3"),
        (lambda: get_sampler("ancestral").generate(SCORE_ABSORBING, batch_size=1, length=4, num_steps=4), "parameterization='subs'"),
    ],
)
def test_bad_input_fails_before_any_model_call(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_registry_refuses_duplicate_names():
    with pytest.raises(ValueError, match="already registered"):
        register_sampler(SAMPLERS["ancestral"])


@pytest.mark.parametrize("name", ["remask", "threshold"])
def test_remask_and_threshold_sample_by_default_and_are_greedy_only_when_asked(name):
    canvas = torch.full((4, 12), FREE)
    kwargs = {"block_length": 6} if name == "threshold" else {}
    draws = [get_sampler(name, **kwargs).generate(MASKED, canvas=canvas, num_steps=12,
                                                  generator=torch.Generator().manual_seed(seed)).tokens
             for seed in (0, 1)]
    assert get_sampler(name).temperature == 1.0 and not torch.equal(draws[0], draws[1])  # the seed matters
    greedy = [get_sampler(name, temperature=0.0, **kwargs).generate(
        MASKED, canvas=canvas, num_steps=12, generator=torch.Generator().manual_seed(seed)).tokens for seed in (0, 1)]
    assert torch.equal(greedy[0], greedy[1])


def test_entropy_bounded_acceptance_commits_the_surest_positions_within_the_bound():
    from diffusion.losses import categorical_entropy as _entropy
    from samplers.remasking import _count_within_bound

    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.99, 0.01]], dtype=torch.float64)
    reference = [-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)), math.log(2), -(0.99 * math.log(0.99) + 0.01 * math.log(0.01))]
    torch.testing.assert_close(_entropy(probs), torch.tensor(reference, dtype=torch.float64))
    neg = torch.tensor([[-reference[0], -math.inf, -reference[1], -reference[2]]], dtype=torch.float64)
    # ascending: 0.056, 0.325, 0.693 -> cumulative 0.056, 0.381, 1.074
    assert [int(_count_within_bound(neg, b)) for b in (0.0, 0.06, 0.4, 1.1, 1e9)] == [1, 1, 2, 3, 3]

    canvas = torch.full((2, 10), FREE)
    one = get_sampler("remask", entropy_bound=0.0).generate(MASKED, canvas=canvas, num_steps=10,
                                                            generator=torch.Generator().manual_seed(0),
                                                            return_trajectory=True)
    counts = [int(((a != b)).sum(-1).max()) for a, b in zip(one.trajectory, one.trajectory[1:])]
    assert counts == [1] * 10 and one.nfe == 10  # bound 0: one token per step
    wide = get_sampler("remask", entropy_bound=1e9).generate(MASKED, canvas=canvas, num_steps=10,
                                                             generator=torch.Generator().manual_seed(0))
    assert wide.nfe == 1 and bool((wide.tokens < V).all())  # every position fits under the bound at once
