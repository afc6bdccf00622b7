"""Block diffusion (BD3-LM): the three-part mask, the loss at its two limits, the likelihood, the sampler."""

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput

from diffusion import DDiTConfig, DDiTModel, DiffusionObjective, DiffusionSpec
from diffusion.adapters import DenoiserConfig
from diffusion.block_diffusion import BlockDiffusionObjective, block_diffusion_mask
from diffusion.evaluation.likelihood import sequence_nelbo
from diffusion.training import TrainConfig
from samplers import get_sampler

V = 13  # 12 real tokens + MASK (id 12)


def _model(block: int | None = None, seed: int = 0) -> DDiTModel:
    torch.manual_seed(seed)
    config = DDiTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, cond_dim=8,
                        max_position_embeddings=32, mask_token_id=V - 1, attention_block_size=block)
    return DDiTModel(config).double().eval()


@pytest.mark.parametrize("length,block", [(4, 1), (4, 2), (4, 4), (6, 3), (8, 2)])
def test_three_part_mask_equals_a_brute_force_construction(length, block):
    expected = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    for q in range(2 * length):
        for k in range(2 * length):
            q_noisy, k_noisy = q < length, k < length
            qb, kb = (q % length) // block, (k % length) // block
            if q_noisy and k_noisy:
                expected[q, k] = qb == kb  # a noisy block sees itself
            elif q_noisy:
                expected[q, k] = kb < qb  # and the clean blocks before it
            elif not k_noisy:
                expected[q, k] = kb <= qb  # a clean block sees the clean blocks up to itself, never a noisy one
    assert torch.equal(block_diffusion_mask(length, block), expected)


def test_block_size_that_does_not_divide_the_length_is_refused():
    with pytest.raises(ValueError, match="block_size=3 must divide the sequence length 8"):
        block_diffusion_mask(8, 3)
    objective = BlockDiffusionObjective.from_spec(DiffusionSpec.from_config(_model().config), 3)
    with pytest.raises(ValueError, match="block_size=3 must divide"):
        objective(_model(), torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size=3 must divide seq_len=8"):
        TrainConfig(seq_len=8, block_size=3)
    with pytest.raises(ValueError, match="block_size .* needs time_conditioning off"):
        TrainConfig(seq_len=8, block_size=4, time_conditioning="on")


def test_block_size_L_is_the_masked_elbo_of_the_existing_objective_on_the_same_draws():
    model, length = _model(), 8
    x0 = torch.randint(0, V - 1, (4, length), generator=torch.Generator().manual_seed(1))
    mdlm = DiffusionObjective.from_config(model.config)
    t, xt = mdlm.corrupt(x0, generator=torch.Generator().manual_seed(2))
    t = t.double()
    blocks = BlockDiffusionObjective.from_spec(DiffusionSpec.from_config(model.config), length)
    with torch.no_grad():
        expected = mdlm.loss(model, x0, xt, t).per_sequence
        got = blocks.loss(model, x0, xt, t[:, None]).per_sequence
    assert bool((xt == V - 1).any())
    # The network runs in float64 and hands out float32 log-probabilities: equal to the last float32 bit.
    torch.testing.assert_close(got.double(), expected.double(), rtol=2e-7, atol=0)


def test_block_size_1_with_every_token_masked_is_the_autoregressive_nll():
    """One token per block, each masked at t = 1 (weight 1): sum_b -log p(x_b | x_<b), the model read as an AR model."""
    model, length = _model(block=1), 6
    x0 = torch.randint(0, V - 1, (3, length), generator=torch.Generator().manual_seed(3))
    objective = BlockDiffusionObjective.from_spec(DiffusionSpec.from_config(model.config), 1)
    t = torch.ones(3, length, dtype=torch.float64)
    with torch.no_grad():
        got = objective.loss(model, x0, torch.full_like(x0, V - 1), t).per_sequence.double()
        expected = torch.zeros(3, dtype=torch.float64)
        for b in range(length):  # brute force: the prefix, then MASK at b, with causal attention
            prefix = torch.cat([x0[:, :b], torch.full((3, 1), V - 1)], dim=1)
            log_probs = model(input_ids=prefix).logits[:, b].double()
            expected -= log_probs.gather(-1, x0[:, b : b + 1]).squeeze(-1)
    assert objective.schedule.elbo_weight(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(1.0)
    torch.testing.assert_close(got, expected, rtol=2e-7, atol=0)


def test_block_likelihood_at_block_size_L_equals_the_lambda_form():
    bidirectional, length = _model(), 8
    whole_block = _model(block=length)  # the same weights (same seed), block-causal with one block
    x0 = torch.randint(0, V - 1, (3, length), generator=torch.Generator().manual_seed(4))
    expected, calls = sequence_nelbo(bidirectional, x0, num_points=4, generator=torch.Generator().manual_seed(5))
    got, block_calls = sequence_nelbo(whole_block, x0, num_points=4, generator=torch.Generator().manual_seed(5))
    assert (calls, block_calls) == (4, 4)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_the_training_objective_draws_one_time_per_block_in_the_clipped_range():
    objective = BlockDiffusionObjective.from_spec(DiffusionSpec.from_config(_model().config), 2, t_low=0.3,
                                                  t_high=0.8)
    x0 = torch.randint(0, V - 1, (64, 8), generator=torch.Generator().manual_seed(6))
    t, xt = objective.corrupt(x0, generator=torch.Generator().manual_seed(7))
    assert t.shape == (64, 4) and bool(((t >= 0.3) & (t <= 0.8)).all())
    masked = (xt == V - 1).double().view(64, 4, 2).mean(-1)  # per block
    expected = objective.schedule.mask_probability(t.double())
    assert abs(float((masked - expected).mean())) < 0.05  # each block masked at its own rate


def test_block_sampler_with_the_exact_cache_draws_the_same_tokens_as_without():
    model = _model(block=4).float()
    outs = [get_sampler("block", kv_cache=cache).generate(model, batch_size=3, length=12, num_steps=12,
                                                          generator=torch.Generator().manual_seed(8))
            for cache in (False, True)]
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert not bool((outs[0].tokens == V - 1).any())
    assert outs[1].nfe <= outs[0].nfe


class _EndsAtFive(nn.Module):
    """A time-free denoiser that puts all mass on EOS (id 0) from position 5 on and is uniform before."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.config = DenoiserConfig(vocab_size=V, mask_token_id=V - 1, max_position_embeddings=64, eos_token_id=0)
        self.calls = 0

    def forward(self, input_ids, total_noise=None, attention_mask=None, **kwargs):
        self.calls += 1
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, V) + self.anchor
        logits[:, :, 0] = -1e4
        logits[:, 5:, :] = -1e4
        logits[:, 5:, 0] = 0.0
        logits[:, :, V - 1] = -1e4
        return MaskedLMOutput(logits=torch.log_softmax(logits, -1))


def test_a_model_that_emits_eos_stops_the_block_sampler_and_reports_its_length():
    model = _EndsAtFive()
    out = get_sampler("block", block_length=4, kv_cache=False, stop_at_eos=True).generate(
        model, batch_size=2, length=16, num_steps=8, generator=torch.Generator().manual_seed(9))
    assert out.lengths.tolist() == [6, 6]  # the first EOS is at position 5
    assert bool((out.tokens[:, 5:] == 0).all()) and bool((out.tokens[:, :5] != 0).all())
    assert model.calls == out.nfe <= 4  # two blocks of two steps: the last two blocks were never decoded


def test_block_sampler_reads_its_block_from_the_model_and_a_block_model_defaults_to_it():
    model = _model(block=4).float()
    spec = DiffusionSpec.from_config(model.config)
    assert (spec.block_size, spec.default_sampler) == (4, "block")
    with pytest.raises(ValueError, match="block_length=None needs a block-diffusion model"):
        get_sampler("block").generate(_model().float(), batch_size=1, length=8, num_steps=2)


def test_steps_are_shared_by_the_blocks_as_evenly_as_possible():
    from samplers.base import split_steps

    assert split_steps(9, 4, 8) == [3, 2, 2, 2] and split_steps(8, 4, 8) == [2, 2, 2, 2]
    with pytest.raises(ValueError, match=r"num_steps \(3\) must be at least the number of blocks to decode \(4"):
        split_steps(3, 4, 8)
