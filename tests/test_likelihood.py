"""Likelihood: ELBO estimators against an exact model, AO-ARM, bounds above a known entropy, AR and gen-ppl."""

import math

import pytest
import torch

from diffusion import DDiTConfig, DDiTModel
from diffusion.evaluation.autoregressive import (
    AutoregressiveObjective,
    build_causal_lm,
    causal_nll,
)
from diffusion.evaluation.likelihood import (
    any_order_nll,
    evaluate_causal_likelihood,
    evaluate_likelihood,
    sequence_nelbo,
)
from diffusion.objectives import DiffusionObjective
from diffusion.evaluation.sample_quality import generative_perplexity, unigram_entropy
from tests.reference import ExactDenoiser, enumerate_joint

V, L = 3, 4


@pytest.fixture(scope="module")
def exact():
    joint = enumerate_joint(V, L, seed=7)
    return ExactDenoiser(joint), joint


def _nll(joint, seq):
    return -math.log(joint[tuple(seq)])


def test_monte_carlo_and_quadrature_estimate_the_exact_nll(exact):
    model, joint = exact
    seqs = sorted(joint, key=joint.get)[-3:]  # three likely sequences
    for seq in seqs:
        x0 = torch.tensor([seq] * 4000)
        truth = _nll(joint, seq)
        for method, points in (("monte_carlo", 4), ("quadrature", 2)):
            values, calls = sequence_nelbo(model, x0, method=method, num_points=points,
                                           generator=torch.Generator().manual_seed(0))
            assert calls == points
            standard_error = float(values.std()) / math.sqrt(len(values))
            assert abs(float(values.mean()) - truth) < 4 * standard_error + 1e-9, (method, seq)
            assert standard_error < 0.03  # 4000 draws pin it down


def test_quadrature_variance_shrinks_with_nodes_at_the_same_mean(exact):
    model, joint = exact
    seq = max(joint, key=joint.get)
    truth = _nll(joint, seq)
    variances = []
    for points in (1, 2, 4):
        values, _ = sequence_nelbo(model, torch.tensor([seq] * 3000), method="quadrature", num_points=points,
                                   generator=torch.Generator().manual_seed(1))
        variances.append(float(values.var()))
        assert abs(float(values.mean()) - truth) < 4 * math.sqrt(variances[-1] / 3000)
    assert variances[0] > variances[1] > variances[2]


def test_confidence_interval_covers_the_exact_value_in_most_repetitions(exact):
    model, joint = exact
    seq = max(joint, key=joint.get)
    truth = _nll(joint, seq) / L
    covered = 0
    for seed in range(40):
        result = evaluate_likelihood(model, torch.tensor([seq] * 64), method="monte_carlo", num_points=2,
                                     batch_size=64, seed=seed, progress=False)
        covered += result.nats_ci95[0] <= truth <= result.nats_ci95[1]
        assert result.network_calls == 2 and result.form == "lambda"
    assert covered >= 34, covered  # nominal 38 of 40


def test_any_order_autoregressive_evaluation_is_exact_for_exact_conditionals(exact):
    model, joint = exact
    seqs = list(joint)[:20]
    values, calls = any_order_nll(model, torch.tensor(seqs), num_orders=3, generator=torch.Generator().manual_seed(0))
    assert calls == 3 * L
    for value, seq in zip(values.tolist(), seqs):
        assert abs(value - _nll(joint, seq)) < 1e-10


def _markov_source(vocab=6, seed=0):
    """An order-1 Markov chain with a known entropy: (initial distribution, transition matrix), float64."""
    g = torch.Generator().manual_seed(seed)
    transition = torch.softmax(2.0 * torch.randn(vocab, vocab, generator=g, dtype=torch.float64), -1)
    stationary = torch.ones(vocab, dtype=torch.float64) / vocab
    for _ in range(500):
        stationary = stationary @ transition
    return stationary, transition


def _sample_chain(stationary, transition, rows, length, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(rows, length, dtype=torch.long)
    x[:, 0] = torch.multinomial(stationary.expand(rows, -1), 1, generator=g).squeeze(-1)
    for i in range(1, length):
        x[:, i] = torch.multinomial(transition[x[:, i - 1]], 1, generator=g).squeeze(-1)
    return x


def _entropy_per_token(stationary, transition, length):
    h0 = -(stationary * stationary.log()).sum()
    rate = -(stationary[:, None] * transition * transition.log()).sum()
    return float(h0 + (length - 1) * rate) / length


@pytest.mark.parametrize("setting", ["masked_elbo", "score_entropy_uniform"])
def test_a_trained_models_bound_never_undercuts_the_true_entropy(setting):
    vocab, length = 6, 12
    stationary, transition = _markov_source(vocab)
    truth = _entropy_per_token(stationary, transition, length)
    torch.manual_seed(0)
    if setting == "masked_elbo":
        config = DDiTConfig(vocab_size=vocab + 1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            cond_dim=16, max_position_embeddings=length)
    else:
        config = DDiTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, cond_dim=16,
                            max_position_embeddings=length, process="uniform", parameterization="score",
                            time_conditioning=True, schedule="geometric", schedule_kwargs={"sigma_min": 1e-4,
                                                                                         "sigma_max": 20.0},
                            mask_token_id=None)
    model = DDiTModel(config)
    objective = DiffusionObjective.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(300):
        x0 = _sample_chain(stationary, transition, 64, length, seed=10_000 + step)
        loss = objective(model, x0, generator=g).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_out = _sample_chain(stationary, transition, 512, length, seed=1)
    result = evaluate_likelihood(model.eval(), held_out, method="quadrature", num_points=8, batch_size=256, seed=0,
                                 progress=False)
    # The model learned something (far below log V) and its bound stays above the truth.
    assert result.nats_per_token < math.log(vocab) - 0.2, (result, truth)
    assert result.nats_ci95[0] >= truth, (result.nats_ci95, truth)


def test_ar_baseline_perplexity_is_exp_of_the_mean_token_nll_by_hand():
    torch.manual_seed(0)
    model = build_causal_lm(vocab_size=11, hidden_size=16, num_layers=1, num_heads=2, max_positions=16).eval()
    tokens = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.double()
        out = AutoregressiveObjective(11).loss(model, tokens, tokens, torch.zeros(3))
        nll, count = causal_nll(model, tokens)
    by_hand = 0.0
    for b in range(3):
        for i in range(1, 7):
            by_hand -= torch.log_softmax(logits[b, i - 1], -1)[tokens[b, i]].item()
    assert count.tolist() == [6, 6, 6] and out.num_tokens == 18
    assert abs(float(nll.sum()) - by_hand) < 1e-4
    assert abs(math.exp(float(out.loss)) - math.exp(by_hand / 18)) < 1e-3 * math.exp(by_hand / 18)
    gen = generative_perplexity(tokens, model)
    assert abs(gen["nats_per_token"] - by_hand / 18) < 1e-5 and gen["tokens"] == 18
    result = evaluate_causal_likelihood(model, tokens, batch_size=2)
    assert abs(result.nats_per_token - by_hand / 18) < 1e-5 and result.num_tokens == 18 and result.network_calls == 2
    assert abs(result.perplexity - math.exp(by_hand / 18)) < 1e-4 * result.perplexity
    with pytest.raises(ValueError, match=r"non-empty \[n, L >= 2\] tensor, got shape \(3, 1\)"):
        evaluate_causal_likelihood(model, tokens[:, :1])


def test_unigram_entropy_by_hand():
    assert abs(unigram_entropy([[5, 5, 5, 5]])) < 1e-12
    assert abs(unigram_entropy([[1, 2, 3, 4]]) - math.log(4)) < 1e-12
    with pytest.raises(ValueError, match="non-empty"):
        unigram_entropy([[]])


def test_bad_arguments_are_named():
    model = DDiTModel(DDiTConfig(vocab_size=7, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 cond_dim=8, max_position_embeddings=8))
    blocks = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="method='trapezoid'"):
        evaluate_likelihood(model, blocks, method="trapezoid")
    with pytest.raises(ValueError, match="num_points=0"):
        evaluate_likelihood(model, blocks, num_points=0)
    score = DDiTModel(DDiTConfig(vocab_size=7, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 cond_dim=8, parameterization="score", time_conditioning=True))
    with pytest.raises(ValueError, match="time-free absorbing subs"):
        any_order_nll(score, blocks)
    with pytest.raises(ValueError, match="trains a model that predicts x0"):  # D3PM's bound needs an x0-parameterised model
        evaluate_likelihood(score, blocks, discrete_time=8)
    with pytest.raises(ValueError, match="discrete_time=0"):
        evaluate_likelihood(model, blocks, discrete_time=0)


def test_eval_cli_on_saved_models(tmp_path, capsys):
    import json

    from diffusion.data import load_tokenizer
    from samplers.cli.evaluate import main

    tokenizer = load_tokenizer("builtin")
    torch.manual_seed(0)
    DDiTModel(DDiTConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         cond_dim=8, max_position_embeddings=32, mask_token_id=tokenizer.mask_token_id)
              ).save_pretrained(tmp_path / "dm")
    build_causal_lm(vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2,
                    max_positions=32).save_pretrained(tmp_path / "ar")
    for folder in ("dm", "ar"):
        tokenizer.save_pretrained(tmp_path / folder)
    capsys.readouterr()
    held_out = ["--dataset", "builtin:shakespeare", "--split", "validation"]  # these models have no data record
    assert main(["ppl", "--model", str(tmp_path / "dm"), "--seq-len", "16", "--max-blocks", "6", "--num-points", "2",
                 "--any-order", "1", "--json", *held_out]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_sequences"] == 6 and result["network_calls"] == 2 and result["form"] == "lambda"
    assert result["nats_ci95"][0] <= result["nats_per_token"] <= result["nats_ci95"][1]
    assert result["any_order"]["network_calls"] == 16
    assert main(["ppl", "--model", str(tmp_path / "ar"), "--seq-len", "16", "--max-blocks", "6", "--json",
                 *held_out]) == 0
    ar = json.loads(capsys.readouterr().out)
    assert ar["form"] == "autoregressive" and abs(ar["perplexity"] - math.exp(ar["nats_per_token"])) < 1e-6
    assert main(["genppl", "--model", str(tmp_path / "dm"), "--reference", str(tmp_path / "ar"), "--length", "12",
                 "--sampling-steps", "2", "4", "--num-samples", "3", "--json"]) == 0
    gen = json.loads(capsys.readouterr().out)
    assert [r["steps"] for r in gen["rows"]] == [2, 4] and all(r["gen_ppl"] > 1 for r in gen["rows"])
    assert main(["ppl", "--model", str(tmp_path / "dm"), "--seq-len", "16", "--max-blocks", "6",
                 "--discrete-time", "4", "--json", *held_out]) == 0
    vb = json.loads(capsys.readouterr().out)
    assert vb["form"] == "discrete time (D3PM L_vb)" and vb["num_points"] == 4 and vb["network_calls"] == 4
    assert main(["ppl", "--model", str(tmp_path / "dm"), "--num-points", "0"]) == 2
    assert "--num-points must be >= 1, got 0" in capsys.readouterr().err
    assert main(["ppl", "--model", str(tmp_path / "dm"), "--discrete-time", "0"]) == 2
    assert "--discrete-time must be >= 1, got 0" in capsys.readouterr().err
    assert main(["ppl", "--model", str(tmp_path / "ar"), "--discrete-time", "4", *held_out]) == 2
    assert "--discrete-time is a bound of diffusion models" in capsys.readouterr().err
    assert main(["genppl", "--model", str(tmp_path / "dm"), "--reference", str(tmp_path / "dm")]) == 2
    assert "is not a causal LM" in capsys.readouterr().err
    assert main(["ppl", "--model", str(tmp_path / "missing")]) == 2
    assert "--model folder does not exist" in capsys.readouterr().err


def test_any_order_reads_the_head_at_the_scored_positions_only_and_gets_the_full_heads_numbers(monkeypatch):
    import diffusion.evaluation.likelihood as likelihood

    torch.manual_seed(0)
    model = DDiTModel(DDiTConfig(vocab_size=21, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=16)).eval()
    x0 = torch.randint(0, 20, (3, 8))
    narrow, calls = likelihood.any_order_steps(model, x0, num_orders=2, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(likelihood, "accepts_score_mask", lambda m: False)  # every position's head, then indexed
    full, _ = likelihood.any_order_steps(model, x0, num_orders=2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(narrow, full, rtol=1e-6, atol=1e-6)
    assert calls == 2 * 8 and bool((narrow > 0).all())
