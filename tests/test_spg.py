"""SPG (rl/objective.py) against an enumerated exact model, its loss by hand, and the coupled estimator's scale."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rl import GRPOConfig, GRPOTrainer
from diffusion.estimators import get_estimator, weighted_sum
from rl.objective import spg_loss, spg_upper_bound
from rl.tasks import SortTask
from tests.reference import ExactDenoiser, enumerate_joint
from tests.test_rl import _config, _task_model

V, L = 3, 3


def _all_masks_draw(joint, y):
    """Every mask M of the completion as one view, token k in M weighted int_0^1 (1/t) t^|M| (1-t)^(L-|M|) dt =
    B(|M|, L - |M| + 1): the views' weighted sum is the exact expectation over t ~ U(0, 1) and Bernoulli(t) masks."""
    model = ExactDenoiser(joint, prefix=1)
    masks = [m for r in range(1, L + 1) for m in itertools.combinations(range(L), r)]
    log_probs, weights = [], []
    for m in masks:
        view = torch.tensor([[0] + [model.vocab if k in m else y[k] for k in range(L)]])
        with torch.no_grad():
            lp = model(input_ids=view).logits.double().log_softmax(-1)[0, 1:]
        log_probs.append(lp.gather(-1, torch.tensor(y)[:, None])[:, 0])
        size = len(m)
        beta_fn = math.gamma(size) * math.gamma(L - size + 1) / math.gamma(L + 1)
        weights.append(torch.tensor([beta_fn if k in m else 0.0 for k in range(L)], dtype=torch.float64))
    return torch.stack(log_probs)[:, None], torch.stack(weights)[:, None]  # [V, 1, L]


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_elbo_and_eubo_sandwich_the_exact_log_likelihood(seed):
    joint = enumerate_joint(V, L, seed=seed)
    for y in list(joint)[::5]:
        log_probs, weights = _all_masks_draw(joint, y)
        log_p = math.log(joint[y])
        elbo = float(weighted_sum(log_probs, weights).double().sum())
        assert elbo == pytest.approx(log_p, abs=1e-6)  # exact conditionals: the ELBO is log p (float32 sum)
        bounds = [float(spg_upper_bound(log_probs, weights, beta=b).sum()) for b in (1.0, 2.0, 4.0)]
        assert log_p <= bounds[0] + 1e-12  # Jensen
        assert bounds[0] <= bounds[1] <= bounds[2]  # power means grow with beta
        lp, w = log_probs[:, 0], weights[:, 0]  # by hand for beta = 2: (1/2) sum_k log sum_M w p^2
        by_hand = sum(0.5 * math.log(sum(float(w[v, k]) * math.exp(2 * float(lp[v, k])) for v in range(len(w))
                                         if w[v, k] > 0)) for k in range(L))
        assert bounds[1] == pytest.approx(by_hand, rel=1e-12)


def test_spg_loss_by_hand_and_its_gradient_signs():
    elbo = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=torch.float64, requires_grad=True)
    eubo = torch.tensor([[-0.2, -1.0], [-0.1, -1.5]], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    loss = spg_loss(elbo, eubo, advantages, mask, mixture=0.25)
    expected = -(1.0 * (-1.0 - 2.0) + -2.0 * (0.25 * -0.1 + 0.75 * -0.5)) / 3
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-14)
    loss.backward()
    assert elbo.grad[0].tolist() == [-1 / 3, -1 / 3]  # descent raises the positive completion's lower bound
    assert eubo.grad[0].tolist() == [0.0, 0.0]
    assert float(eubo.grad[1, 0]) == pytest.approx(2 * 0.25 / 3) and float(elbo.grad[1, 0]) == pytest.approx(2 * 0.75 / 3)
    assert float(eubo.grad[1, 1]) == float(elbo.grad[1, 1]) == 0.0  # outside the mask
    with pytest.raises(ValueError, match="mixture=1.5"):
        spg_loss(elbo, eubo, advantages, mask, mixture=1.5)
    with pytest.raises(ValueError, match="beta=0.5"):
        spg_upper_bound(elbo[None], torch.ones(1, 2, 2), beta=0.5)
    with pytest.raises(ValueError, match="masked in no view"):
        spg_upper_bound(elbo[None], torch.tensor([[[1.0, 0.0], [1.0, 1.0]]]))


def test_coupled_estimates_twice_the_log_likelihood_of_an_independent_model():
    marginals = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]]
    joint = {y: math.prod(marginals[k][y[k]] for k in range(L)) for y in itertools.product(range(V), repeat=L)}
    model, y = ExactDenoiser(joint, prefix=1), (0, 1, 2)
    log_p = math.log(joint[y])
    sequences, completion = torch.tensor([[0, *y]] * 4000), torch.tensor([[False] + [True] * L] * 4000)
    for full, scale in ((False, 2.0), (True, 1.5)):  # the d1 view is exact here too: (1 + 2) / 2
        estimator = get_estimator("coupled", V, with_full_mask=full)
        with torch.no_grad():
            values = estimator.estimate(model, estimator.draw(sequences, completion, torch.Generator().manual_seed(0)))
        values = values.double().sum(-1)
        standard_error = float(values.std()) / math.sqrt(len(values))
        assert abs(float(values.mean()) - scale * log_p) < 4 * standard_error + 1e-9, (values.mean(), scale * log_p)


def test_spg_config_errors_and_a_trainer_step_lowers_its_loss(tmp_path):
    for bad, match in (({"estimator": "quadrature"}, "estimator='quadrature'"), ({"beta": 0.1}, "beta=0.1"),
                       ({"spg_beta": 0.5}, "spg_beta=0.5"), ({"spg_mixture": -0.1}, "spg_mixture=-0.1")):
        with pytest.raises(ValueError, match=match):
            GRPOConfig(objective="spg", **bad)
    task = SortTask(5)
    records = task.records(50, torch.Generator().manual_seed(1))
    model, tokenizer = _task_model()
    trainer = GRPOTrainer(model, tokenizer, _config(tmp_path, objective="spg", max_steps=1, variance_draws=0),
                          task.reward_functions, records, task.reward_weights)
    seen, rollout = {}, trainer.rollout

    def loss_now():
        batch = seen["batch"]
        with torch.no_grad():
            return float(trainer._policy_loss(seen["draw"], None, None, batch["advantages"], batch["mask"],
                                              float(batch["mask"].sum()), batch["mask"].sum().float())[0])

    def remember(step):  # the batch and draw train_step uses; the loss before its optimizer step
        batch = rollout(step)
        seen.update(batch=batch, draw=trainer._draw(batch, step, "masks", 0))
        seen["before"] = loss_now()
        return batch

    trainer.rollout = remember
    trainer.train_step(0)
    assert loss_now() < seen["before"], (seen["before"], loss_now())
