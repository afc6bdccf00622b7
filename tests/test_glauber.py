"""The Glauber Generative Model (diffusion/glauber.py) on an enumerated joint (L = 3 positions, N = 3 tokens,
2 sweeps): the forward bookkeeping, the Bayes identity between the classifier's odds and the conditionals, and
the heat-bath reverse chain with exact conditionals sampling the data distribution."""

import itertools

import pytest
import torch
from scipy.stats import chisquare

from diffusion.glauber import GlauberProcess
from tests.reference import enumerate_joint

N, L, R = 3, 3, 2
STATES = list(itertools.product(range(N), repeat=L))


@pytest.fixture(scope="module")
def setup():
    joint = enumerate_joint(N, L, seed=2)
    process = GlauberProcess(N, L, R)
    return joint, process


def _law(joint, process, t):
    """P(x_t = state) for every state, by summing the data through the per-position kernels."""
    law = torch.zeros(len(STATES), dtype=torch.float64)
    for x0, p in joint.items():
        marginal = process.marginal(torch.tensor([x0]), torch.tensor([t]))[0]  # [L, N]
        law += p * torch.stack([marginal[range(L), list(x)].prod() for x in STATES])
    return law


def _conditionals(law, s):
    """p(x^s = . | x^{-s}) for every state's x^{-s}: [len(STATES), N]."""
    out = torch.zeros(len(STATES), N, dtype=torch.float64)
    for i, x in enumerate(STATES):
        for a in range(N):
            out[i, a] = law[STATES.index(x[:s] + (a,) + x[s + 1:])]
    return out / out.sum(-1, keepdim=True)


def test_the_forward_law_after_a_step_is_what_corrupt_draws(setup):
    joint, process = setup
    t = 4
    data = torch.tensor(list(joint.keys()))[torch.multinomial(torch.tensor(list(joint.values())), 40000, True,
                                                              generator=torch.Generator().manual_seed(0))]
    y, s, kept = process.corrupt(data, torch.full((40000,), t), torch.Generator().manual_seed(1))
    assert bool((s == t % L).all()) and abs(kept.double().mean() - float(process.keep(torch.tensor(t)))) < 0.01
    counts = torch.zeros(len(STATES))
    for row in y.tolist():
        counts[STATES.index(tuple(row))] += 1
    assert chisquare(counts.numpy(), (_law(joint, process, t + 1) * 40000).numpy()).pvalue > 1e-3
    assert torch.allclose(process.clean_probability(torch.tensor(process.steps)),
                          torch.full((L,), (1 - 1 / 3) * (1 - 2 / 3), dtype=torch.float64))


def test_the_classifier_odds_give_back_the_conditionals(setup):
    joint, process = setup
    for t in range(process.steps):
        s, keep = t % L, float(process.keep(torch.tensor(t)))
        law = _law(joint, process, t)
        exact = _conditionals(law, s)
        for i, y in enumerate(STATES):
            # P(Z = phi | y^{-s}, y^s = a) by summing over x_t with x_t^{-s} = y^{-s}
            kept = torch.tensor([law[STATES.index(y[:s] + (a,) + y[s + 1:])] * keep for a in range(N)])
            seen = kept + sum(law[STATES.index(y[:s] + (b,) + y[s + 1:])] for b in range(N)) * (1 - keep) / N
            p_phi = kept / seen
            from_odds = (1 - keep) / N / keep * p_phi / (1 - p_phi)  # (Pi(a) / Pi(phi)) * odds
            assert torch.allclose(from_odds, exact[i], atol=1e-12) and float(from_odds.sum()) == pytest.approx(1.0)
            logits = process.exact_logits(exact[i], torch.tensor(t))
            assert torch.allclose(torch.sigmoid(logits), p_phi, atol=1e-12)  # the BCE optimum
            assert torch.allclose(process.conditional(logits), exact[i], atol=1e-12)
            # the heat-bath step is the exact posterior of x_t^s given y = x_{t+1} (the step's own kernel)
            joint_xy = torch.tensor([law[STATES.index(y[:s] + (a,) + y[s + 1:])]
                                     * (keep * (a == y[s]) + (1 - keep) / N) for a in range(N)])
            step = process.reverse_probs(torch.tensor([y]), torch.tensor([s]), torch.tensor([t]), logits[None])[0]
            assert torch.allclose(step, joint_xy / joint_xy.sum(), atol=1e-12)


def test_with_exact_conditionals_the_heat_bath_chain_samples_the_data(setup):
    joint, process = setup
    chains = 30000
    generator = torch.Generator().manual_seed(5)
    start = _law(joint, process, process.steps)  # the forward's own x_T law
    index = torch.multinomial(start, chains, True, generator=generator)
    table = torch.tensor(STATES)
    y = table[index]
    for t in reversed(range(process.steps)):
        s = t % L
        exact = _conditionals(_law(joint, process, t), s)
        ids = torch.tensor([STATES.index(tuple(row)) for row in y.tolist()])
        logits = process.exact_logits(exact[ids], torch.full((chains,), t))
        probs = process.reverse_probs(y, torch.full((chains,), s), torch.full((chains,), t), logits)
        y = y.clone()
        y[:, s] = torch.multinomial(probs.float(), 1, generator=generator).squeeze(-1)
    counts = torch.zeros(len(STATES))
    for row in y.tolist():
        counts[STATES.index(tuple(row))] += 1
    expected = torch.tensor([joint[x] for x in STATES], dtype=torch.float64) * chains
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="sweeps must be an int >= 1, got sweeps=0"):
        GlauberProcess(N, L, 0)
    with pytest.raises(ValueError, match=r"step t must be in 0..5, got \[6\]"):
        GlauberProcess(N, L, R).keep(torch.tensor(6))


def _classifier(sweeps=2, length=8, vocab=6):
    from diffusion import DDiTConfig, DDiTModel

    torch.manual_seed(0)
    return DDiTModel(DDiTConfig(vocab_size=vocab + 1, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                cond_dim=16, max_position_embeddings=length, process="absorbing",
                                parameterization="score", scale_by_sigma=False, time_conditioning=True,
                                glauber_sweeps=sweeps))


def test_the_objective_is_the_bce_of_the_observed_tokens_logit_and_it_learns():
    from diffusion.glauber import GlauberObjective

    model = _classifier()
    objective = GlauberObjective(GlauberProcess(6, 8, 2), hidden_id=6)
    x0 = torch.randint(0, 6, (32, 1), generator=torch.Generator().manual_seed(1)).expand(32, 8).contiguous()
    t, packed = objective.corrupt(x0, generator=torch.Generator().manual_seed(2))
    y, kept, s = packed[:, :8], packed[:, 8], t.long() % 8
    out = objective.loss(model, x0, packed, t)
    hidden = y.clone()
    hidden[torch.arange(32), s] = 6
    logits = model(input_ids=hidden, total_noise=(t + 1) / 16).logits[torch.arange(32), s, :6]
    observed = logits.gather(-1, y[torch.arange(32), s].unsqueeze(-1)).squeeze(-1)
    by_hand = torch.nn.functional.binary_cross_entropy_with_logits(observed, kept.float(), reduction="none")
    assert torch.allclose(out.per_sequence, by_hand, atol=1e-6) and out.num_tokens == 32
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(120):  # sequences of one repeated token: the visible tokens tell the hidden one
        x0 = torch.randint(0, 6, (32, 1), generator=generator).expand(32, 8).contiguous()
        out = objective(model, x0, generator=generator)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert sum(losses[-20:]) / 20 < 0.8 * sum(losses[:20]) / 20, (losses[:3], losses[-3:])


def test_the_sampler_visits_only_free_positions_and_refuses_what_does_not_fit():
    from samplers import FREE, get_sampler

    model = _classifier()
    canvas = torch.full((3, 8), FREE)
    canvas[:, :2] = torch.tensor([4, 5])  # a two-token prompt: never visited
    out = get_sampler("glauber").generate(model, canvas=canvas, num_steps=16, generator=torch.Generator().manual_seed(0))
    assert out.nfe == 2 * 6 and torch.equal(out.tokens[:, :2], canvas[:, :2])
    assert bool(((out.tokens >= 0) & (out.tokens < 6)).all())
    again = get_sampler("glauber").generate(model, canvas=canvas, num_steps=16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.tokens, again.tokens)
    with pytest.raises(ValueError, match=r"has 16 steps \(2 sweeps x 8\); got num_steps=8"):
        get_sampler("glauber").generate(model, canvas=canvas, num_steps=8)
    with pytest.raises(ValueError, match="only the glauber sampler reads, not the analytic sampler"):
        get_sampler("analytic").generate(model, canvas=canvas, num_steps=8)
    from diffusion import DiffusionSpec
    from diffusion.estimators import check_policy
    from diffusion.evaluation.likelihood import sequence_nelbo

    with pytest.raises(ValueError, match="is a classifier, not a denoiser"):
        sequence_nelbo(model, torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="classifier with no likelihood estimate"):
        check_policy(DiffusionSpec.from_config(model.config), "quadrature")


def test_ddlm_train_with_glauber_trains_saves_and_samples(tmp_path, capsys):
    from diffusion.adapters import load_denoiser
    from diffusion.training.config import TrainConfig
    from samplers.cli.train import main as train_main

    code = train_main(["--output-dir", str(tmp_path / "run"), "--objective", "glauber", "--glauber-sweeps", "2",
                       "--seq-len", "16", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2",
                       "--cond-dim", "16", "--batch-size", "4", "--max-steps", "4", "--warmup-steps", "1",
                       "--eval-every", "2", "--eval-blocks", "8", "--eval-batch-size", "8", "--precision", "no",
                       "--progress", "false", "--num-samples", "1", "--no-plot", "--max-position-embeddings", "16"])
    assert code == 0
    out = capsys.readouterr().out
    assert "1 samples (16 tokens, glauber, 32 steps, 32 network calls)" in out
    model, _ = load_denoiser(str(tmp_path / "run" / "final"))
    assert model.config.glauber_sweeps == 2 and not model.config.scale_by_sigma
    with pytest.raises(ValueError, match="objective='glauber' trains a classifier over the absorbing vocabulary"):
        TrainConfig(objective="glauber", process="uniform")
    with pytest.raises(ValueError, match="glauber_sweeps must be an int >= 1"):
        TrainConfig(objective="glauber", glauber_sweeps=0)
