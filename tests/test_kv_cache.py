"""Block KV cache: exact for block-causal models, used (approximately) for bidirectional ones."""

import pytest
import torch
from torch import nn

from diffusion import DDiTConfig, DDiTModel
from samplers import FREE, get_sampler

V, L, BLOCK = 20, 16, 4


def _model(**overrides):
    torch.manual_seed(0)
    return DDiTModel(DDiTConfig(vocab_size=V + 1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                cond_dim=16, max_position_embeddings=32, **overrides)).eval()


class Recording(nn.Module):
    """Records the length of every forward call."""

    supports_kv_cache = True

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.lengths = model, model.config, []

    def forward(self, **kwargs):
        self.lengths.append(kwargs["input_ids"].shape[1])
        return self.model(**kwargs)


def test_partial_forward_with_cache_equals_full_forward():
    model = _model()
    x = torch.randint(0, V + 1, (2, L), generator=torch.Generator().manual_seed(0))
    full = model(input_ids=x, use_cache=True)
    keep = (full.key_values.positions < 4) | (full.key_values.positions >= 8)
    part = model(input_ids=x[:, 4:8], positions=torch.arange(4, 8), past_key_values=full.key_values.select(keep))
    torch.testing.assert_close(part.logits, full.logits[:, 4:8], rtol=1e-5, atol=1e-5)


def test_block_causal_attention_ignores_later_blocks():
    model = _model(attention_block_size=BLOCK)
    x = torch.randint(0, V, (1, L), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[0, BLOCK:] = V  # change everything after the first block
    torch.testing.assert_close(model(input_ids=x).logits[0, :BLOCK], model(input_ids=y).logits[0, :BLOCK])
    assert (model(input_ids=x).logits[0, BLOCK:] - model(input_ids=y).logits[0, BLOCK:]).abs().max() > 1e-4


@pytest.mark.parametrize("name, kwargs", [("remask", {}), ("threshold", {"threshold": 0.3})])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cache_is_exact_for_block_causal_models(name, kwargs, mode):
    model = _model(attention_block_size=BLOCK)
    prompt = torch.tensor([[1, 2, 3, 4]])
    common = dict(prompt_ids=prompt.repeat(2, 1), length=L - 4, num_steps=12, generator=None)
    plain = get_sampler(name, block_length=BLOCK, **kwargs).generate(
        model, **{**common, "generator": torch.Generator().manual_seed(0)})
    recorded = Recording(model)
    cached = get_sampler(name, block_length=BLOCK, kv_cache=mode, **kwargs).generate(
        recorded, **{**common, "generator": torch.Generator().manual_seed(0)})
    assert torch.equal(cached.tokens, plain.tokens)
    assert cached.nfe == plain.nfe
    assert min(recorded.lengths) < L  # later steps of a block ran on part of the canvas
    if mode == "dual":
        assert min(recorded.lengths) == BLOCK


def test_cache_on_a_bidirectional_model_gives_valid_output():
    recorded = Recording(_model())
    canvas = torch.full((2, L), FREE)
    canvas[:, 0] = 5
    out = get_sampler("remask", block_length=BLOCK, kv_cache="dual").generate(
        recorded, canvas=canvas, num_steps=8, generator=torch.Generator().manual_seed(0))
    assert bool((out.tokens < V).all()) and bool((out.tokens[:, 0] == 5).all())
    assert recorded.lengths.count(BLOCK) == 4  # one partial call in each of the 4 blocks' second steps


def test_kv_cache_arguments_are_checked():
    with pytest.raises(ValueError, match="needs semi-autoregressive blocks"):
        get_sampler("remask", kv_cache="prefix")
    with pytest.raises(ValueError, match="kv_cache='triple'"):
        get_sampler("threshold", block_length=4, kv_cache="triple")
