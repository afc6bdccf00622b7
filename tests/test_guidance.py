"""Classifier-free guidance (samplers/guidance.py): the mix against a float64 reference, w = 0 is the conditional
model and w = -1 the unconditional one (token for token), batched and unbatched agree, calls are counted."""

import json
import math

import pytest
import torch

from samplers import FREE, get_sampler
from samplers.guidance import GuidedDenoiser, guided_log_probs
from tests.test_samplers import MASKED, V, Counting

PROMPT = torch.tensor([1, 2, 3, 4])


def _canvas(rows: int = 3, length: int = 10) -> torch.Tensor:
    canvas = torch.full((rows, len(PROMPT) + length), FREE)
    canvas[:, : len(PROMPT)] = PROMPT
    return canvas


def _prompt_mask(canvas: torch.Tensor) -> torch.Tensor:
    return canvas[0] != FREE


class Unconditional(torch.nn.Module):
    """The model with the prompt hidden: what guidance weight -1 must reduce to."""

    def __init__(self, model, prompt):
        super().__init__()
        self.model, self.config, self.prompt = model, model.config, prompt
        self.supports_score_mask = True

    def forward(self, input_ids, **kwargs):
        hidden = torch.where(self.prompt, torch.full_like(input_ids, self.config.mask_token_id), input_ids)
        return self.model(input_ids=hidden, **kwargs)


def test_the_mix_matches_a_float64_reference():
    generator = torch.Generator().manual_seed(0)
    c = torch.log_softmax(torch.randn(5, V + 1, generator=generator, dtype=torch.float64), -1)
    u = torch.log_softmax(torch.randn(5, V + 1, generator=generator, dtype=torch.float64), -1)
    c[:, V] = u[:, V] = -math.inf  # the mask token, ruled out by both
    for w in (-1.0, 0.0, 0.5, 2.0):
        reference = (1 + w) * c[:, :V] - w * u[:, :V]  # log p_c^(1+w) / p_u^w, then normalised
        reference = reference - torch.logsumexp(reference, -1, keepdim=True)
        got = guided_log_probs(c, u, w)
        torch.testing.assert_close(got[:, :V].double(), reference, atol=2e-5, rtol=0)
        assert bool(torch.isneginf(got[:, V]).all())


@pytest.mark.parametrize("weight", [0.0, -1.0])
def test_weight_zero_is_the_conditional_and_minus_one_the_unconditional_sampler(weight):
    canvas = _canvas()
    prompt = _prompt_mask(canvas)
    plain = MASKED if weight == 0 else Unconditional(MASKED, prompt)
    guided = GuidedDenoiser(MASKED, prompt, weight)
    for sampler in (get_sampler("ancestral", cache=False), get_sampler("remask")):
        expected = sampler.generate(plain, canvas=canvas, num_steps=8, generator=torch.Generator().manual_seed(2))
        got = sampler.generate(guided, canvas=canvas, num_steps=8, generator=torch.Generator().manual_seed(2))
        assert torch.equal(got.tokens, expected.tokens)


def test_batched_and_two_pass_guidance_agree_and_calls_are_counted():
    canvas = _canvas()
    prompt = _prompt_mask(canvas)
    counted = Counting(MASKED)
    outs = {}
    for batched in (True, False):
        counted.calls = 0
        guided = GuidedDenoiser(counted, prompt, 1.5, batched=batched)
        outs[batched] = get_sampler("ancestral", cache=False).generate(
            guided, canvas=canvas, num_steps=6, generator=torch.Generator().manual_seed(1))
        assert guided.calls == counted.calls == outs[batched].nfe * (1 if batched else 2)
    assert torch.equal(outs[True].tokens, outs[False].tokens)
    assert torch.equal(outs[True].tokens[:, : len(PROMPT)], canvas[:, : len(PROMPT)])
    # Guidance changes the predictions (this random model barely reads its prompt, so a strong weight shows it).
    x = canvas.clone()
    x[x == FREE] = MASKED.config.mask_token_id
    conditional = torch.log_softmax(MASKED(input_ids=x).logits.float(), -1)
    strong = GuidedDenoiser(MASKED, prompt, 20.0)(input_ids=x).logits
    assert float((strong - conditional).exp().sub(1).abs()[x == MASKED.config.mask_token_id].max()) > 0.05


@pytest.mark.parametrize("kwargs, match", [
    ({"weight": math.nan}, "weight=nan"),
    ({"weight": math.inf}, "weight=inf"),
    ({"prompt": torch.zeros(14, dtype=torch.bool)}, "marks no position"),
    ({"prompt": torch.ones(2, 14, dtype=torch.bool)}, r"BoolTensor\[L\]"),
])
def test_bad_guidance_settings_are_refused(kwargs, match):
    arguments = {"prompt": _prompt_mask(_canvas()), "weight": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        GuidedDenoiser(MASKED, **arguments)


def test_generate_guidance_needs_a_prompt_and_runs_with_one(model_dir, capsys):
    from samplers.cli.generate import main

    assert main(["--model", str(model_dir), "--guidance", "2"]) == 2
    assert "--guidance leans toward a prompt" in capsys.readouterr().err
    args = ["--model", str(model_dir), "--prompt", "HAMLET:", "--length", "6", "--sampling-steps", "6", "--json"]
    assert main([*args, "--guidance", "0"]) == 0
    guided_zero = json.loads(capsys.readouterr().out)["samples"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == guided_zero  # w = 0: the plain conditional samples
