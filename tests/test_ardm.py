"""ARDM's call-budget policy (samplers/ardm.py): the dynamic programme against brute force, the bound's limits,
the sampler's exact call count, and the curve ddlm-eval stores for it."""

import itertools
import json
import math

import pytest
import torch

from samplers import FREE, get_sampler
from samplers.ardm import CURVE_FILE, ardm_policy, policy_bound
from samplers.base import token_probs, uniforms
from tests.test_samplers import MASKED, V, Counting


def _brute_force(curve, length, calls, offset=0):
    best = math.inf
    for inner in itertools.combinations(range(1, length), calls - 1):
        best = min(best, policy_bound(curve, [0, *inner, length], offset))
    return best


@pytest.mark.parametrize("length", [1, 4, 7, 10])
def test_the_policy_is_the_best_of_all_partitions(length):
    generator = torch.Generator().manual_seed(length)
    for trial in range(3):
        curve = (torch.rand(length + 2, generator=generator, dtype=torch.float64) * 5).tolist()
        offset = trial % 3  # a prompt of 0, 1 or 2 known tokens
        for calls in range(1, length + 1):
            boundaries, bound = ardm_policy(curve, length, calls, offset)
            assert boundaries[0] == 0 and boundaries[-1] == length and len(boundaries) == calls + 1
            assert all(a < b for a, b in zip(boundaries, boundaries[1:]))
            assert bound == pytest.approx(policy_bound(curve, boundaries, offset), abs=1e-12)
            assert bound == pytest.approx(_brute_force(curve, length, calls, offset), abs=1e-12)


def test_one_token_per_call_is_the_any_order_sum_and_fewer_calls_cost_more():
    curve = [5.0 * 0.9 ** t + 1.0 for t in range(12)]  # more context, lower loss
    boundaries, bound = ardm_policy(curve, 12, 12)
    assert boundaries == list(range(13)) and bound == pytest.approx(sum(curve))
    bounds = [ardm_policy(curve, 12, k)[1] for k in range(1, 13)]
    assert bounds[0] == pytest.approx(12 * curve[0])  # one call: every token from nothing
    assert all(a >= b - 1e-12 for a, b in zip(bounds, bounds[1:]))  # a larger budget never costs more


def test_the_sampler_spends_exactly_its_budget_and_one_per_call_is_the_sequential_order():
    canvas = torch.full((3, 10), FREE)
    canvas[:, :2] = torch.tensor([1, 2])
    counted = Counting(MASKED)
    curve = [4.0 - 0.2 * t for t in range(10)]
    for k in (1, 3, 8):
        counted.calls = 0
        sampler = get_sampler("ardm", curve=curve)
        out = sampler.generate(counted, canvas=canvas, num_steps=k, generator=torch.Generator().manual_seed(0))
        assert out.nfe == counted.calls == k and len(sampler.last_policy) == k + 1
        assert torch.equal(out.tokens[:, :2], canvas[:, :2]) and bool((out.tokens < V).all())
        assert sampler.last_bound == pytest.approx(ardm_policy(curve, 8, k, offset=2)[1])

    # k = D: one token per call, in a uniformly random order: the sequential any-order sampler, written out.
    generator = torch.Generator().manual_seed(7)
    out = get_sampler("ardm").generate(MASKED, canvas=canvas, num_steps=8, generator=generator)
    generator = torch.Generator().manual_seed(7)
    x = torch.where(canvas == FREE, torch.full_like(canvas, V), canvas)
    keys = uniforms(x.shape, generator, "cpu").masked_fill(canvas != FREE, math.inf)
    order = keys.argsort(-1)
    for step in range(8):
        logits = MASKED(input_ids=x, total_noise=torch.zeros(3)).logits.float()
        u = uniforms(x.shape, generator, "cpu")
        rows = torch.arange(3)
        position = order[:, step]
        probs = token_probs(logits[rows, position], exclude=V)
        cdf = probs.double().cumsum(-1)
        x[rows, position] = torch.searchsorted(cdf, (u[rows, position] * cdf[:, -1]).unsqueeze(-1),
                                               right=True).squeeze(-1).clamp_max(V)
    assert torch.equal(out.tokens, x)


@pytest.mark.parametrize("call, match", [
    (lambda: ardm_policy([1.0] * 5, 5, 0), r"call budget must be an int in \[1, 5\] \(the positions to generate\), got 0"),
    (lambda: ardm_policy([1.0] * 5, 5, 6), r"got 6"),
    (lambda: ardm_policy([1.0] * 3, 5, 2), "3 steps; 5 are needed"),
    (lambda: ardm_policy([1.0, math.nan, 1.0], 3, 2), "non-finite"),
    (lambda: get_sampler("ardm", curve=[1.0, math.inf]), "finite numbers"),
    (lambda: get_sampler("ardm").generate(MASKED, batch_size=1, length=4, num_steps=5), "num_steps=5 is more calls"),
])
def test_bad_budgets_and_curves_are_refused_naming_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_eval_stores_the_curve_and_generate_plans_with_it(model_dir, capsys):
    from samplers.cli.evaluate import main as eval_main
    from samplers.cli.generate import main as generate_main

    assert eval_main(["ppl", "--model", str(model_dir), "--dataset", "builtin:shakespeare", "--seq-len", "16",
                      "--max-blocks", "2", "--num-points", "2", "--store-curve"]) == 2
    assert "--store-curve stores the curve --any-order N measures" in capsys.readouterr().err
    assert eval_main(["ppl", "--model", "someone/model", "--any-order", "1", "--store-curve"]) == 2  # before any work
    assert "--store-curve writes into a local model folder" in capsys.readouterr().err
    assert eval_main(["ppl", "--model", str(model_dir), "--dataset", "builtin:shakespeare", "--seq-len", "16",
                      "--max-blocks", "2", "--num-points", "2", "--any-order", "1", "--store-curve", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    stored = json.loads((model_dir / CURVE_FILE).read_text())
    assert stored["nats_per_step"] == result["any_order"]["nats_per_step"] and len(stored["nats_per_step"]) == 16
    assert sum(stored["nats_per_step"]) / 16 == pytest.approx(result["any_order"]["nats_per_token"], rel=1e-9)
    assert generate_main(["--model", str(model_dir), "--sampler", "ardm", "--length", "12", "--sampling-steps", "4",
                          "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["nfe"] == 4 and out["sampler"] == "ardm"
    (model_dir / CURVE_FILE).unlink()
