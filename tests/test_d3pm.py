"""D3PM in discrete time (diffusion/d3pm.py) against float64 references: the chain's marginals, Bayes'
posterior from scipy's matrix exponential, the bound with the true reverse on an enumerated joint, and the
discrete bound of an x0-parameterised model against the continuous masked ELBO as T grows."""

import itertools
import math

import pytest
import torch
from scipy.stats import chisquare

from diffusion.d3pm import DiscreteTime
from diffusion.processes import AbsorbingProcess, UniformProcess
from diffusion.schedules import LINEAR_MASKING, LogLinearSchedule, get_schedule
from tests.reference import ExactDenoiser, absorbing_rate_matrix, enumerate_joint, kernel, uniform_rate_matrix

N = 3
CASES = {
    "absorbing": (AbsorbingProcess(N), absorbing_rate_matrix(N), LogLinearSchedule()),
    "uniform": (UniformProcess(N), uniform_rate_matrix(N), get_schedule("geometric")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_chains_of_one_step_kernels_have_the_marginals_of_q_bar(name):
    process, _, schedule = CASES[name]
    chain = DiscreteTime(process, schedule, 6)
    generator = torch.Generator().manual_seed(0)
    x = torch.full((20000,), 1)
    for k in range(1, 7):
        x = torch.multinomial(chain.step(x, torch.tensor(k)).float(), 1, generator=generator).squeeze(-1)
        if k in (2, 6):
            expected = chain.marginal(torch.tensor([1]), torch.tensor(k))[0]
            observed = torch.bincount(x, minlength=process.num_states).double()
            keep = expected > 1e-9
            assert observed[~keep].sum() == 0
            assert chisquare(observed[keep].numpy(), (expected[keep] * 20000).numpy()).pvalue > 1e-3, (name, k)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_posterior_is_bayes_with_scipys_kernels(name):
    process, rate, schedule = CASES[name]
    chain = DiscreteTime(process, schedule, 5)
    for k in (1, 3, 5):
        sigma_now, sigma_before = float(chain.sigma(torch.tensor(k))), float(chain.sigma(torch.tensor(k - 1)))
        step, before, now = kernel(rate, sigma_now - sigma_before), kernel(rate, sigma_before), kernel(rate, sigma_now)
        for x0, x_k in itertools.product(range(N), range(process.num_states)):
            if now[x_k, x0] < 1e-12:
                continue
            bayes = step[x_k, :] * before[:, x0] / now[x_k, x0]  # q(x_k | x_{k-1}=j) q(x_{k-1}=j | x0) / q(x_k | x0)
            got = chain.posterior(torch.tensor(x_k), torch.nn.functional.one_hot(torch.tensor(x0),
                                                                                 process.num_states).double(),
                                  torch.tensor(k))
            assert torch.allclose(got, bayes, atol=1e-10) and got.sum() == pytest.approx(1.0, abs=1e-12)
        # the x0-parameterised step: the posteriors of every x0 mixed with a model's distribution as weights
        p_x0 = torch.tensor([0.2, 0.5, 0.3] + [0.0] * (process.num_states - N), dtype=torch.float64)
        for x_k in range(process.num_states):
            mixed = sum(p_x0[x0] * step[x_k, :] * before[:, x0] / now[x_k, x0] for x0 in range(N)
                        if now[x_k, x0] > 1e-12)
            if mixed.sum() < 1e-12:
                continue
            got = chain.posterior(torch.tensor(x_k), p_x0, torch.tensor(k))
            assert torch.allclose(got, mixed / mixed.sum(), atol=1e-10)


def test_with_the_true_reverse_the_absorbing_bound_is_exactly_minus_log_p():
    """L = 2 tokens of N = 2, T = 3 steps, all MASK at T (D3PM's beta_k = 1 / (T - k + 1)): the reverse kernel
    p(x_{k-1} | x_k) = sum_x0 q(x_{k-1} | x_k, x0) p(x0 | x_k) of the data makes every KL term of L_vb exact."""
    n, length, steps = 2, 2, 3
    chain = DiscreteTime(AbsorbingProcess(n), LINEAR_MASKING, steps)
    joint = enumerate_joint(n, length, seed=4)
    states = list(itertools.product(range(n + 1), repeat=length))  # sequences over tokens and MASK

    def seq_probs(per_position):  # [length, S] per-position probabilities -> [len(states)] sequence probabilities
        return torch.stack([per_position[range(length), list(s)].prod() for s in states])

    def q(x0, k):  # q(x_k = s | x0)
        return seq_probs(chain.marginal(torch.tensor(x0), torch.tensor(k)))

    def posterior(x_k, x0, k):  # q(x_{k-1} = s | x_k, x0)
        one_hot = torch.nn.functional.one_hot(torch.tensor(x0), n + 1).double()
        return seq_probs(chain.posterior(torch.tensor(x_k), one_hot, torch.tensor(k)))

    def reverse(x_k, k):  # the data's own p(x_{k-1} | x_k)
        weights = {x0: p * float(q(x0, k)[states.index(x_k)]) for x0, p in joint.items()}
        total = sum(weights.values())
        return sum(w / total * posterior(x_k, x0, k) for x0, w in weights.items() if w > 0)

    for x0, p in joint.items():
        bound = 0.0  # the prior term is 0: q(x_T | x0) and p(x_T) are both all MASK
        for k in range(1, steps + 1):
            for index, x_k in enumerate(states):
                weight = float(q(x0, k)[index])
                if weight < 1e-15:
                    continue
                model = reverse(x_k, k)
                if k == 1:
                    bound -= weight * math.log(float(model[states.index(x0)]))
                else:
                    true = posterior(x_k, x0, k)
                    bound += weight * sum(float(a) * math.log(float(a) / float(b)) for a, b in zip(true, model) if a > 0)
        assert bound == pytest.approx(-math.log(p), abs=1e-9), x0


def test_the_absorbing_reverse_step_is_the_ancestral_samplers_unmasking_rule():
    """At a masked x_k the x0-parameterised step keeps MASK with (1 - a_{k-1}) / (1 - a_k) and otherwise draws
    from p~ (a = alpha_bar): samplers/ancestral.py's rule (alpha_s - alpha_t) / (1 - alpha_t) on the same grid."""
    chain = DiscreteTime(AbsorbingProcess(N), LogLinearSchedule(), 10)
    p_x0 = torch.tensor([0.2, 0.5, 0.3, 0.0], dtype=torch.float64)
    for k in range(1, 11):
        alpha_t, alpha_s = (torch.exp(-chain.sigma(torch.tensor(j))) for j in (k, k - 1))
        step = chain.posterior(torch.tensor(N), p_x0, torch.tensor(k))
        unmask = (alpha_s - alpha_t) / (1 - alpha_t)
        assert torch.allclose(step[:N], unmask * p_x0[:N], atol=1e-12) and step[N] == pytest.approx(1 - unmask)


def _exact_expectations(model, joint, chain, length):
    """E over data and x_k ~ q(x_k | x0) of the per-sequence terms, for every k: the bound without sampling."""
    rows, patterns = [], list(itertools.product([False, True], repeat=length))
    for x0 in joint:
        for pattern in patterns:
            rows.append((x0, pattern))
    x0 = torch.tensor([r[0] for r in rows])
    masked = torch.tensor([r[1] for r in rows])
    x_k = torch.where(masked, torch.full_like(x0, N), x0)
    log_probs = model(input_ids=x_k).logits  # time-free: the same outputs at every k
    weight_data = torch.tensor([joint[r[0]] for r in rows], dtype=torch.float64)
    data = torch.tensor(list(joint))
    probs = torch.tensor(list(joint.values()), dtype=torch.float64)
    total = (probs * chain.prior_kl(data).sum(-1)).sum()  # the prior term (0 when x_T is all MASK)
    for k in range(1, chain.steps + 1):
        mask_probability = 1.0 - torch.exp(-chain.sigma(torch.tensor(k)))
        count = masked.sum(-1).double()
        weight = weight_data * mask_probability ** count * (1 - mask_probability) ** (length - count)
        terms = chain.vb_terms(x0, x_k, torch.full((len(rows),), k), log_probs).sum(-1)
        total = total + (weight * terms).sum()
    return float(total)


def test_the_discrete_bound_sits_above_the_continuous_elbo_and_falls_to_it():
    length = 3
    joint = enumerate_joint(N, length, seed=9)
    model = ExactDenoiser(joint)  # exact conditionals, one token at a time: the continuous ELBO is the entropy
    entropy = -sum(p * math.log(p) for p in joint.values())
    bounds = []
    for steps in (8, 32, 128, 1024):
        chain = DiscreteTime(AbsorbingProcess(N), LINEAR_MASKING, steps)
        bounds.append(_exact_expectations(model, joint, chain, length))
    assert all(b > entropy + 1e-9 for b in bounds)
    assert all(a > b for a, b in zip(bounds, bounds[1:])), bounds
    assert bounds[-1] - entropy < 0.01 * (bounds[0] - entropy)
    assert bounds[0] - entropy > 0.02  # T = 8 pays for unmasking several tokens from independent marginals


def test_lambda_zero_is_the_bound_and_the_hybrid_adds_the_cross_entropy():
    chain = DiscreteTime(AbsorbingProcess(N), LogLinearSchedule(), 10)
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, N, (4, 5), generator=generator)
    k = torch.tensor([1, 4, 7, 10])
    x_k = torch.where(torch.rand(4, 5, generator=generator) < 0.5, torch.full_like(x0, N), x0)
    log_probs = torch.randn(4, 5, N + 1, generator=generator, dtype=torch.float64).log_softmax(-1)
    vb = (chain.prior_kl(x0) + 10 * chain.vb_terms(x0, x_k, k, log_probs)).sum(-1)
    assert torch.equal(chain.loss(x0, x_k, k, log_probs, hybrid=0.0), vb)
    real = log_probs[..., :N].softmax(-1)  # MASK's column dropped, renormalised
    ce = -real.gather(-1, x0.unsqueeze(-1)).squeeze(-1).log().sum(-1)
    assert torch.allclose(chain.loss(x0, x_k, k, log_probs, hybrid=0.5), vb + 0.5 * ce, atol=1e-12)


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="T >= 1 steps, got T=0"):
        DiscreteTime(AbsorbingProcess(N), LogLinearSchedule(), 0)
    chain = DiscreteTime(AbsorbingProcess(N), LogLinearSchedule(), 4)
    with pytest.raises(ValueError, match=r"step k must be in 1..4, got \[5\]"):
        chain.posterior(torch.tensor([0]), torch.ones(1, N + 1) / (N + 1), torch.tensor(5))
    with pytest.raises(ValueError, match="hybrid weight lambda must be >= 0"):
        chain.loss(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), torch.tensor([1]),
                   torch.zeros(1, 2, N + 1), hybrid=-1.0)


def test_the_training_objective_draws_k_uniformly_and_scores_the_chains_loss():
    from diffusion import DDiTConfig, DDiTModel, DiffusionSpec
    from diffusion.objectives import DiffusionObjective

    torch.manual_seed(0)
    model = DDiTModel(DDiTConfig(vocab_size=N + 1, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 cond_dim=16, max_position_embeddings=8))
    objective = DiffusionObjective.from_spec(DiffusionSpec.from_config(model.config), "masked_elbo",
                                             discrete_time=8, hybrid=0.01)
    x0 = torch.randint(0, N, (4000, 8), generator=torch.Generator().manual_seed(2))
    t, xt = objective.corrupt(x0, generator=torch.Generator().manual_seed(3))
    k = t.double() * 8
    assert torch.equal(k, k.round()) and int(k.min()) == 1 and int(k.max()) == 8
    assert chisquare(torch.bincount(k.long(), minlength=9)[1:].double().numpy()).pvalue > 1e-3
    rows = slice(0, 16)
    out = objective.loss(model, x0[rows], xt[rows], t[rows])
    chain = DiscreteTime(objective.process, objective.schedule, 8)
    with torch.no_grad():
        logits = model(input_ids=xt[rows], total_noise=objective.schedule.total_noise(t[rows])).logits
    expected = chain.loss(x0[rows], xt[rows], k[rows].long(), logits, hybrid=0.01)
    assert torch.allclose(out.per_sequence.double(), expected, rtol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_ddlm_train_with_discrete_time_runs_resumes_and_refuses_what_does_not_fit(tmp_path):
    import json

    from safetensors.torch import load_file

    from diffusion.training import train
    from diffusion.training.config import TrainConfig

    config = dict(output_dir=str(tmp_path / "run"), discrete_time=16, hybrid_lambda=0.01, seq_len=32, hidden_size=32,
                  num_layers=1, num_heads=2, cond_dim=16, batch_size=4, max_steps=6, warmup_steps=2, eval_every=3,
                  eval_blocks=8, eval_batch_size=8, log_every=1, save_every=3, precision="no", progress=False,
                  max_position_embeddings=64)
    result = train(TrainConfig(**config))
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert all(math.isfinite(r["eval_loss"]) for r in records if "eval_loss" in r)
    straight = load_file(str(result.final_dir / "model.safetensors"))
    config.update(output_dir=str(tmp_path / "resumed"), stop_after_steps=3)
    train(TrainConfig(**config))
    config.update(stop_after_steps=None, resume="auto")
    again = load_file(str(train(TrainConfig(**config)).final_dir / "model.safetensors"))
    assert all(torch.equal(straight[name], again[name]) for name in straight)
    for bad, match in (({"discrete_time": 0}, "discrete_time must be an int T >= 1"),
                       ({"discrete_time": 8, "objective": "score_entropy"}, "discrete_time \\(D3PM\\) trains"),
                       ({"hybrid_lambda": 0.01}, "hybrid_lambda is D3PM's hybrid loss: it needs discrete_time"),
                       ({"discrete_time": 8, "hybrid_lambda": -1.0}, "hybrid_lambda must be a number >= 0")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad)


def test_the_absorbing_shortcut_equals_the_general_bound_for_a_subs_model():
    """What training computes (masked positions only, weight w_k + lambda, the prior per token) equals the general
    L_vb + lambda CE of DiscreteTime.loss for a subs model's outputs, k = 1 included."""
    chain = DiscreteTime(AbsorbingProcess(N), LogLinearSchedule(), 12)
    generator = torch.Generator().manual_seed(8)
    x0 = torch.randint(0, N, (6, 7), generator=generator)
    x_k = torch.where(torch.rand(6, 7, generator=generator) < 0.6, torch.full_like(x0, N), x0)
    k = torch.tensor([1, 2, 5, 9, 12, 1])
    log_probs = torch.randn(6, 7, N + 1, generator=generator, dtype=torch.float64)
    log_probs[..., N] = -math.inf  # subs: never MASK, and an unmasked position carries its token
    log_probs = log_probs.log_softmax(-1)
    log_probs = torch.where((x_k != N)[..., None], torch.full_like(log_probs, -math.inf).scatter(
        -1, x_k.clamp_max(N - 1)[..., None], 0.0), log_probs)
    nll = -log_probs.gather(-1, x0[..., None]).squeeze(-1) * (x_k == N)
    shortcut = (chain.masked_weight(k) + 0.3)[:, None] * nll + chain.prior_kl(x0)
    assert torch.allclose(shortcut.sum(-1), chain.loss(x0, x_k, k, log_probs, hybrid=0.3), rtol=1e-10)


def test_the_evaluations_discrete_time_bound_is_an_unbiased_estimate_of_l_vb():
    """``sequence_nelbo(..., discrete_time=T)`` (what ``ddlm-eval ppl --discrete-time T`` runs) against L_vb
    summed over every k and every mask pattern, on the exact model of an enumerated joint."""
    from diffusion.evaluation.likelihood import sequence_nelbo

    length, steps, repeats = 3, 8, 300
    joint = enumerate_joint(N, length, seed=9)
    model = ExactDenoiser(joint)  # its config: log-linear schedule, eps 1e-3
    exact = _exact_expectations(model, joint, DiscreteTime(AbsorbingProcess(N), get_schedule("loglinear", eps=1e-3),
                                                           steps), length)
    sequences = list(joint)
    probs = torch.tensor([joint[s] for s in sequences], dtype=torch.float64)
    x0 = torch.tensor(sequences).repeat(repeats, 1)  # row r * len(sequences) + j holds sequence j
    values, calls = sequence_nelbo(model, x0, discrete_time=steps, generator=torch.Generator().manual_seed(0))
    assert calls == steps
    per_sequence = values.view(repeats, len(sequences))
    estimate = float((probs * per_sequence.mean(0)).sum())
    stderr = float((probs**2 * per_sequence.var(0) / repeats).sum().sqrt())
    assert abs(estimate - exact) < 5 * stderr, (estimate, exact, stderr)
    entropy = -sum(p * math.log(p) for p in joint.values())
    assert exact > entropy + 0.02  # T = 8 is a loose bound: the check compares more than the entropy
