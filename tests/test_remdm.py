"""ReMDM (samplers/remdm.py): strength 0 is the ancestral sampler token for token, remasking keeps the forward
process's marginal (the fraction of masked positions after each step is 1 - alpha_s), and bad settings are refused."""

import math

import pytest
import torch

from samplers import FREE, get_sampler
from samplers.remdm import loop_alpha
from tests.test_samplers import MASKED, V, _canvas


@pytest.mark.parametrize("schedule", ["cap", "rescale"])
@pytest.mark.parametrize("options", [{}, {"temperature": 0.7, "top_k": 6}])
def test_strength_zero_is_the_ancestral_sampler_token_for_token(schedule, options):
    canvas = _canvas()
    remdm = get_sampler("remdm", schedule=schedule, eta=0.0, **options).generate(
        MASKED, canvas=canvas, num_steps=10, generator=torch.Generator().manual_seed(5))
    for cache in (False, True):
        ancestral = get_sampler("ancestral", cache=cache, **options).generate(
            MASKED, canvas=canvas, num_steps=10, generator=torch.Generator().manual_seed(5))
        assert torch.equal(remdm.tokens, ancestral.tokens)


def _mask_fractions(sampler, steps: int, rows: int = 3000, length: int = 8) -> tuple[list[float], list[list[bool]]]:
    canvas = torch.full((rows, length), FREE)
    out = sampler.generate(MASKED, canvas=canvas, num_steps=steps, generator=torch.Generator().manual_seed(0),
                           return_trajectory=True)
    fractions = [float((state == V).double().mean()) for state in out.trajectory[1 : steps + 1]]
    remasked = [bool(((before != V) & (after == V)).any()) for before, after in
                zip(out.trajectory[1:steps], out.trajectory[2 : steps + 1])]
    return fractions, remasked


@pytest.mark.parametrize("schedule, eta", [("cap", 0.3), ("rescale", 0.8), ("loop", 0.5)])
def test_remasking_keeps_the_forward_marginal_after_every_step(schedule, eta):
    """q_sigma(z_s | z_t) keeps P(z_s = m) = 1 - alpha_s for any sigma in [0, sigma_max] (ReMDM, Prop. 3.1)."""
    steps, rows, length = 10, 3000, 8
    sampler = get_sampler("remdm", schedule=schedule, eta=eta)
    fractions, remasked = _mask_fractions(sampler, steps, rows, length)
    times = torch.linspace(1.0, sampler.t_final, steps + 1, dtype=torch.float64)
    for i, fraction in enumerate(fractions):
        alpha_s = float(sampler._alphas(_spec(), times[i], times[i + 1])[1])  # the schedule's, or the loop's path
        expected = 1.0 - alpha_s
        spread = math.sqrt(max(expected * (1 - expected), 1e-12) / (rows * length))
        assert abs(fraction - expected) <= 5 * spread + 1e-9, (i, fraction, expected)
    assert any(remasked)  # tokens were taken back, and the marginal still held


def _spec():
    from diffusion.spec import DiffusionSpec

    return DiffusionSpec.from_config(MASKED.config)


def test_the_loop_revises_a_canvas_at_fixed_noise_and_conf_remasks_the_least_confident():
    sampler = get_sampler("remdm", schedule="loop", eta=0.5, t_on=0.6, t_off=0.2, alpha_on=0.7)
    assert [loop_alpha(t, 0.6, 0.2, 0.7) for t in (1.0, 0.6, 0.4, 0.2, 0.0)] == pytest.approx([0.0, 0.7, 0.7, 0.7, 1.0])
    fractions, remasked = _mask_fractions(sampler, 20, rows=500)
    assert any(remasked[8:14])  # inside the window tokens go back under the mask ...
    window = fractions[8:15]  # ... while the masked fraction stays near 1 - alpha_on
    assert all(abs(f - 0.3) < 0.05 for f in window), window

    conf = get_sampler("remdm", schedule="conf")
    committed = torch.tensor([[True, True, False, True]])
    confidence = torch.tensor([[0.9, 0.1, 0.0, 0.5]], dtype=torch.float64)
    alpha_t, alpha_s = torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    sigma_masked, sigma = conf._sigma(alpha_t, alpha_s, 0.5, confidence, committed)
    weights = torch.softmax(-torch.tensor([0.9, 0.1, 0.5], dtype=torch.float64), 0)
    sigma_max = min(1.0, (1 - 0.6) / 0.5)
    assert sigma_masked == 0.0 and float(sigma[0, 2]) == 0.0
    torch.testing.assert_close(sigma[0, [0, 1, 3]], sigma_max * weights)
    assert int(sigma[0].argmax()) == 1  # the token drawn with probability 0.1 is the likeliest to go


@pytest.mark.parametrize("kwargs, match", [
    ({"schedule": "sometimes"}, "schedule='sometimes'"),
    ({"eta": float("nan")}, "eta=nan"),
    ({"eta": 1.5}, "eta=1.5"),
    ({"schedule": "loop", "t_on": 0.1, "t_off": 0.3}, "0 < t_off < t_on < 1"),
    ({"schedule": "loop", "alpha_on": 1.0}, "alpha_on=1.0"),
])
def test_bad_remdm_settings_are_refused_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_sampler("remdm", **kwargs)


def test_generate_reaches_every_sampler_option_through_option_flags(model_dir, capsys):
    import json

    from samplers.cli.generate import main, sampler_options

    assert sampler_options(["schedule=loop", "eta=0.02", "cap=null", "flag=true", "name=\"3\""], set()) == {
        "schedule": "loop", "eta": 0.02, "cap": None, "flag": True, "name": "3"}
    args = ["--model", str(model_dir), "--length", "8", "--sampling-steps", "8", "--num-samples", "2", "--json"]
    assert main([*args, "--sampler", "ancestral", "--option", "cache=false"]) == 0
    ancestral = json.loads(capsys.readouterr().out)["samples"]
    assert main([*args, "--sampler", "remdm", "--option", "schedule=\"cap\"", "--option", "eta=0"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == ancestral  # strength 0: ancestral, token for token
    for bad, message in [(["--option", "eta"], "--option takes KEY=VALUE"),
                         (["--temperature", "1", "--option", "temperature=0.5"], "'temperature', which is already set"),
                         (["--option", "loudness=3"], "does not take"),
                         (["--option", "eta=2"], "eta must be in [0, 1], got eta=2")]:
        assert main([*args, "--sampler", "remdm", *bad]) == 2
        assert message in capsys.readouterr().err
