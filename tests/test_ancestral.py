"""The masked ancestral sampler: exact caching, no MASK left, network calls counted."""

import pytest
import torch

from diffusion import DDiTConfig, DDiTModel
from samplers import MaskedAncestralSampler


def _model(**overrides):
    torch.manual_seed(0)
    config = DDiTConfig(vocab_size=21, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, cond_dim=16,
                        max_position_embeddings=64, **overrides)
    return DDiTModel(config).eval()


@pytest.mark.parametrize("num_steps", [4, 16, 200])
def test_cache_gives_the_same_tokens_with_fewer_calls(num_steps):
    model = _model()
    cached = MaskedAncestralSampler(cache=True).generate(
        model, batch_size=3, length=12, num_steps=num_steps, generator=torch.Generator().manual_seed(1))
    plain = MaskedAncestralSampler(cache=False).generate(
        model, batch_size=3, length=12, num_steps=num_steps, generator=torch.Generator().manual_seed(1))
    assert torch.equal(cached.tokens, plain.tokens)
    assert plain.nfe >= num_steps
    assert cached.nfe <= min(plain.nfe, 3 * 12 + 1)  # a call only after some sequence changed
    assert bool((cached.tokens < 20).all())  # no MASK (id 20) left


def test_trajectory_only_unmasks_and_never_changes_a_committed_token():
    out = MaskedAncestralSampler().generate(_model(), batch_size=2, length=10, num_steps=8,
                                            generator=torch.Generator().manual_seed(0), return_trajectory=True)
    for before, after in zip(out.trajectory, out.trajectory[1:]):
        committed = before != 20
        assert torch.equal(after[committed], before[committed])
    assert bool((out.trajectory[0] == 20).all())


def test_time_conditioned_model_is_never_cached_and_bad_arguments_fail():
    model = _model(time_conditioning=True)
    out = MaskedAncestralSampler().generate(model, batch_size=1, length=6, num_steps=10,
                                            generator=torch.Generator().manual_seed(0))
    assert out.nfe >= 10
    with pytest.raises(ValueError, match="num_steps=0"):
        MaskedAncestralSampler().generate(model, batch_size=1, length=6, num_steps=0)
    with pytest.raises(ValueError, match="length=65 exceeds"):
        MaskedAncestralSampler().generate(model, batch_size=1, length=65, num_steps=4)
    with pytest.raises(ValueError, match="temperature=0"):
        MaskedAncestralSampler(temperature=0)
