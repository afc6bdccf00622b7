"""Golden values: sampler tokens, losses, likelihood bounds and RL estimates on three saved tiny models.

``tests/golden/`` holds three tiny DDiT models (time-free masked, absorbing score, uniform score) and
what the code computed with them before the package layout changed (one thread, fixed seeds).  Tokens
and network-call counts must be identical; numbers may differ by float rounding only where the single
ELBO implementation multiplies by the weight ``1/t`` where the former code divided by ``t`` (rtol 1e-6).
The likelihood method recorded as ``monte_carlo`` is today's ``stratified`` rule (same nodes, new name).
"""

import json
from pathlib import Path

import pytest
import torch

from diffusion import DDiTModel, DiffusionObjective
from diffusion.evaluation.likelihood import any_order_nll, evaluate_likelihood
from diffusion.estimators import get_estimator
from rl.sft import sft_loss
from samplers import FREE, get_sampler

GOLDEN = Path(__file__).parent / "golden"
RECORD = json.loads((GOLDEN / "golden.json").read_text())
X0 = torch.tensor(RECORD["x0"])
V = 20
NAMES = ("masked", "score_absorbing", "score_uniform")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    return {name: DDiTModel.from_pretrained(GOLDEN / name).eval() for name in NAMES}


def _close(actual, expected):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-9)


def _canvas():
    canvas = torch.full((2, 14), FREE)
    canvas[:, :3] = torch.tensor([1, 2, 3])
    canvas[:, 8] = 7
    canvas[:, -2:] = torch.tensor([4, 5])
    return canvas


@pytest.mark.parametrize("name", NAMES)
def test_losses_and_bounds_match_the_recorded_values(models, name):
    model, record = models[name], RECORD["record"][name]
    for key, expected in record.items():
        if key.startswith("loss/"):
            objective = DiffusionObjective.from_config(model.config, objective=key.split("/", 1)[1])
            with torch.no_grad():
                out = objective(model, X0, generator=torch.Generator().manual_seed(7))
            _close(out.per_sequence, expected)
        elif key.startswith("likelihood/"):
            method = {"monte_carlo": "stratified"}.get(key.split("/", 1)[1], key.split("/", 1)[1])
            result = evaluate_likelihood(model, X0, method=method, num_points=4, batch_size=2, seed=3, progress=False)
            _close(result.nats_per_token, expected)


@pytest.mark.parametrize("name", NAMES)
def test_samplers_give_the_recorded_tokens(models, name):
    model = models[name]
    samples = {k: v for k, v in RECORD["record"][name].items() if k.startswith("sample/")}
    assert samples
    for key, expected in samples.items():
        _, sampler, options = key.split("/", 2)
        out = get_sampler(sampler, **json.loads(options)).generate(
            model, canvas=_canvas(), num_steps=14, generator=torch.Generator().manual_seed(11))
        assert out.tokens.tolist() == expected["tokens"], key
        assert out.nfe == expected["nfe"], key


def test_any_order_rl_estimators_and_sft_match_the_recorded_values(models):
    model, record = models["masked"], RECORD["record"]["masked"]
    nll, _ = any_order_nll(model, X0[:2], num_orders=1, generator=torch.Generator().manual_seed(2))
    _close(nll, record["any_order"])
    sequences = torch.tensor(RECORD["rl_sequences"])
    completion = torch.zeros_like(sequences, dtype=torch.bool)
    completion[:, 5:] = True
    estimators = {k: v for k, v in record.items() if k.startswith("estimator/")}
    assert len(estimators) == 5
    for key, expected in estimators.items():
        _, name, options = key.split("/", 2)
        estimator = get_estimator(name, V, **json.loads(options))
        draw = estimator.draw(sequences, completion, torch.Generator().manual_seed(13))
        with torch.no_grad():
            _close(estimator.estimate(model, draw), expected)
    with torch.no_grad():
        _close(sft_loss(model, sequences, completion, V, torch.Generator().manual_seed(17)), record["sft_loss"])
