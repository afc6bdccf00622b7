"""DPO with VRPO (rl/dpo.py): the loss by hand, VRPO's estimate against the plain one on an exact toy, the trainer
(first loss log 2, a step that lowers the loss, resume, LoRA), the preference data and the CLI's one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffusion.data.preferences import encode_preferences, load_preference_rows, preference_batch
from rl import DPOConfig, DPOTrainer, dpo_loss
from diffusion.estimators import get_estimator
from rl.tasks import SortTask, char_tokenizer
from tests.reference import ExactDenoiser, enumerate_joint
from tests.test_rl import _task_model

V, L = 3, 3
LOG2 = float(torch.tensor(math.log(2), dtype=torch.float32))  # the model's log-likelihoods are float32


def test_dpo_loss_by_hand_log_two_at_the_reference_and_gradient_signs():
    chosen = torch.tensor([-3.0, -2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-4.0, -1.0], dtype=torch.float64, requires_grad=True)
    loss, margins = dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), beta=0.3)
    assert float(loss.detach()) == math.log(2) and margins.tolist() == [0.0, 0.0]
    loss.backward()  # descent raises the chosen answer's likelihood and lowers the rejected one's
    assert chosen.grad.tolist() == [-0.075, -0.075] and rejected.grad.tolist() == [0.075, 0.075]
    ref_c, ref_r = torch.tensor([-3.5, -2.0], dtype=torch.float64), torch.tensor([-3.0, -1.5], dtype=torch.float64)
    loss, margins = dpo_loss(chosen.detach(), rejected.detach(), ref_c, ref_r, beta=0.3)
    expected = [0.3 * ((-3 + 3.5) - (-4 + 3)), 0.3 * ((-2 + 2) - (-1 + 1.5))]
    torch.testing.assert_close(margins, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    by_hand = sum(math.log1p(math.exp(-m)) for m in expected) / 2
    assert float(loss) == pytest.approx(by_hand, rel=1e-14)
    with pytest.raises(ValueError, match="beta=0"):
        dpo_loss(chosen, rejected, ref_c, ref_r, beta=0)


def _score_estimates(policy, reference, estimator, pair, antithetic, rows, seed):
    """``rows`` estimates of ``(l_pi(c) - l_ref(c)) - (l_pi(r) - l_ref(r))``, as :class:`DPOTrainer` forms them."""
    sequences = torch.tensor([[0, *pair[0]], [0, *pair[1]]] * rows)
    completion = torch.tensor([[False] + [True] * L] * (2 * rows))
    draw = estimator.draw(sequences, completion, torch.Generator().manual_seed(seed))
    ref_draw = draw if antithetic else estimator.draw(sequences, completion, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        pol = estimator.estimate(policy, draw).double().sum(-1).view(-1, 2)
        ref = estimator.estimate(reference, ref_draw).double().sum(-1).view(-1, 2)
    return (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])


def test_vrpo_is_unbiased_for_the_same_score_as_the_plain_estimate_and_has_lower_variance():
    base = enumerate_joint(V, L, seed=4)
    noise = torch.randn(len(base), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3
    tilted = {y: p * math.exp(float(n)) for (y, p), n in zip(base.items(), noise)}
    total = sum(tilted.values())
    tilted = {y: p / total for y, p in tilted.items()}  # the policy: the reference, tilted a little
    policy, reference = ExactDenoiser(tilted, prefix=1), ExactDenoiser(base, prefix=1)
    chosen, rejected = (0, 1, 2), (2, 2, 0)
    exact = (math.log(tilted[chosen]) - math.log(base[chosen])) - (math.log(tilted[rejected]) - math.log(base[rejected]))
    vrpo = _score_estimates(policy, reference, get_estimator("monte_carlo", V, num_points=4), (chosen, rejected),
                            antithetic=True, rows=3000, seed=0)
    plain = _score_estimates(policy, reference, get_estimator("one_time", V, num_points=4), (chosen, rejected),
                             antithetic=False, rows=3000, seed=10)
    for values in (vrpo, plain):
        standard_error = float(values.std()) / math.sqrt(len(values))
        assert abs(float(values.mean()) - exact) < 4 * standard_error, (float(values.mean()), exact, standard_error)
    assert float(vrpo.var()) < 0.5 * float(plain.var()), (float(vrpo.var()), float(plain.var()))


# ----- the trainer on the sorting task ---------------------------------------------------------------------------
def _dpo_config(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path / "dpo"), max_steps=4, pairs_per_step=4, completion_length=6, lr=1e-3,
                beta=0.5, num_points=2, save_every=2, progress=False)
    return DPOConfig(**{**base, **overrides})


def _rows(n=40, seed=1):
    return SortTask(5).preference_records(n, torch.Generator().manual_seed(seed))


def test_first_step_loss_is_log_two_and_a_step_lowers_the_loss_under_its_masks(tmp_path):
    model, tokenizer = _task_model()
    trainer = DPOTrainer(model, tokenizer, _dpo_config(tmp_path), _rows())
    examples, ids = trainer.examples[:4], [0, 1, 2, 3]

    def loss_now():
        with torch.no_grad():
            policy, ref = trainer.log_likelihoods(examples, 0, ids)
        return float(dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=0.5)[0])

    assert loss_now() == LOG2  # the same masks for policy and reference: every margin is exactly 0
    assert trainer.train_step(0)["loss"] == LOG2
    for _ in range(5):  # further steps on these pairs and masks
        with torch.enable_grad():
            policy, ref = trainer.log_likelihoods(examples, 0, ids)
            trainer.optimizer_step(dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=0.5)[0])
    assert loss_now() < math.log(2) - 0.05
    independent = DPOTrainer(_task_model()[0], tokenizer, _dpo_config(tmp_path / "b", antithetic=False), _rows())
    assert abs(independent.train_step(0)["loss"] - LOG2) > 1e-4  # masks differ: the margins are not 0


def test_dpo_resumes_bit_for_bit_and_lora_trains_only_adapters(tmp_path):
    runs = {}
    for name, stops in (("straight", [4]), ("resumed", [2, 4])):
        for stop in stops:
            model, tokenizer = _task_model()
            trainer = DPOTrainer(model, tokenizer, _dpo_config(tmp_path / name, max_steps=stop, resume="auto"), _rows())
            trainer.train()
        runs[name] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert all(torch.equal(runs["straight"][k], runs["resumed"][k]) for k in runs["straight"])
    assert len((tmp_path / "resumed/dpo/metrics.jsonl").read_text().splitlines()) == 4
    model, tokenizer = _task_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = DPOTrainer(model, tokenizer, _dpo_config(tmp_path / "lora", lora_rank=4, max_steps=2), _rows())
    assert trainer.reference is None  # the base model is the reference
    assert trainer.train()[0]["loss"] == LOG2
    changed = {k for k, v in trainer.model.state_dict().items() if "lora" not in k and not torch.equal(
        v, before[k.replace("base_model.model.", "").replace("base_layer.", "")])}
    assert not changed
    assert any("lora_B" in k and bool(v.abs().sum() > 0) for k, v in trainer.model.state_dict().items())


def test_preference_rows_layout_and_one_line_errors(tmp_path):
    tokenizer = char_tokenizer()
    rows = [{"prompt": "31>", "chosen": "13", "rejected": "31"}, {"prompt": "5>", "chosen": "5", "rejected": "6"}]
    examples = encode_preferences(rows, tokenizer, answer_length=4, format="plain")
    sequences, completion = preference_batch(examples, prompt_width=3, answer_length=4, pad_id=0, eos_id=0)
    text = [tokenizer.decode(s[c].tolist()) for s, c in zip(sequences, completion)]
    assert [tokenizer.decode(s[:3].tolist()) for s in sequences][2:] == ["<|endoftext|>5>"] * 2  # left-padded prompt
    assert [t.replace("<|endoftext|>", "") for t in text] == ["13", "31", "5", "6"]  # chosen, rejected per pair
    assert completion.sum(-1).tolist() == [4] * 4
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_preference_rows(str(path)) == rows
    for bad, match in (({"chosen": " "}, "row 1: 'chosen' is empty"), ({"rejected": ""}, "row 1: 'rejected' is empty"),
                       ({"rejected": None}, "row 1: 'rejected' must be a string")):
        path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], **bad}) + "\n")
        with pytest.raises(ValueError, match=match):
            load_preference_rows(str(path))
    with pytest.raises(ValueError, match="row 0: 'chosen' has 5 tokens, more than completion_length=4"):
        encode_preferences([{"prompt": "1>", "chosen": "1234", "rejected": "1"}], tokenizer, answer_length=4,
                           format="plain")
    from rl.sft import small_model

    uniform = small_model(tokenizer, 12, kind="sedd")  # no MASK to estimate an ELBO with: refused at once
    with pytest.raises(ValueError, match="masks tokens, so it needs an absorbing model"):
        DPOTrainer(uniform, tokenizer, _dpo_config(tmp_path), _rows())
    for bad, match in (({"estimator": "coupled"}, "estimator='coupled'"), ({"beta": 0.0}, "beta=0.0"),
                       ({"num_points": 0}, "num_points=0"), ({"format": "xml"}, "format='xml'")):
        with pytest.raises(ValueError, match=match):
            DPOConfig(**bad)


def test_dpo_cli_errors_are_one_line(tmp_path, capsys):
    from rl.dpo_cli import main

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "1>", "chosen": "", "rejected": "2"}) + "\n")
    cases = ((["--data", str(path)], "needs --model"), (["--data", "builtin:chess"], "unknown built-in"),
             (["--eval-pairs", "0"], "--eval-pairs must be >= 1"), (["--beta", "-1"], "beta must be a finite number > 0"))
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
