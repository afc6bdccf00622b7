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


@pytest.mark.parametrize("name, kwargs", [("remask", {}), ("threshold", {"threshold": 0.3})])
@pytest.mark.parametrize("mode", ["prefix", "dual", "delayed"])
def test_refreshing_at_every_call_is_exact_on_a_bidirectional_model(name, kwargs, mode):
    model = _model()
    prompt = torch.tensor([[1, 2, 3, 4]])
    common = dict(prompt_ids=prompt.repeat(2, 1), length=L - 4, num_steps=12)
    plain = get_sampler(name, block_length=BLOCK, **kwargs).generate(
        model, **common, generator=torch.Generator().manual_seed(0))
    recorded = Recording(model)
    exact = get_sampler(name, block_length=BLOCK, kv_cache=mode, cache_refresh_every=1, **kwargs).generate(
        recorded, **common, generator=torch.Generator().manual_seed(0))
    assert torch.equal(exact.tokens, plain.tokens) and exact.nfe == plain.nfe
    assert set(recorded.lengths) == {L}  # every call was a full one
    if mode != "prefix":  # (the prompt's stale keys/values do not change this tiny model's samples)
        stale = get_sampler(name, block_length=BLOCK, kv_cache=mode, **kwargs).generate(
            model, **common, generator=torch.Generator().manual_seed(0))
        assert not torch.equal(stale.tokens, plain.tokens)  # without refreshes the cache changes the samples


def test_delayed_cache_reads_fresh_keys_values_exactly_and_writes_back_the_recomputed_ones():
    from samplers.kv_cache import BlockCaller

    model = _model()
    mask = model.config.mask_token_id
    x = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(3))
    x[:, 4:8] = mask
    x[0, 5] = 7  # one row has committed a token of the block
    sigma = torch.ones(2)
    where = (x == mask) & (torch.arange(L) >= 4) & (torch.arange(L) < 8)
    caller = BlockCaller(model, "delayed", 4, 8)
    full = caller(x, sigma, where)
    assert caller.full_calls == 1
    # Same canvas again: the cached keys/values are those of this very canvas, so the partial call is exact.
    again = caller(x, sigma, where)
    assert caller.full_calls == 1
    torch.testing.assert_close(again, full, rtol=1e-5, atol=1e-5)
    reference = model(input_ids=x, use_cache=True).key_values
    for cached, fresh in zip(caller.cache.keys + caller.cache.values, reference.keys + reference.values):
        torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-5)
    # Commits (one row): a call recomputes the positions still masked and those committed since the last call.
    recorded = Recording(model)
    caller = BlockCaller(recorded, "delayed", 4, 8)
    y = x[:1].clone()  # block: MASK 7 MASK MASK
    caller(y, sigma[:1], where[:1])
    y = y.clone()
    y[0, 6] = 9
    caller(y, sigma[:1], (y == mask) & where[:1])
    z = y.clone()
    z[0, 4] = 3
    caller(z, sigma[:1], (z == mask) & where[:1])
    assert recorded.lengths == [L, 3, 2]  # {4, 6 just committed, 7}, then {4 just committed, 7}: 6 is cached


def test_refresh_when_enough_of_the_block_changed():
    recorded = Recording(_model())
    canvas = torch.full((1, L), FREE)
    canvas[:, 0] = 5
    out = get_sampler("remask", block_length=8, kv_cache="dual", cache_refresh_changed=0.3).generate(
        recorded, canvas=canvas, num_steps=16, generator=torch.Generator().manual_seed(0))
    assert bool((out.tokens < V).all())
    # Blocks of 8 (7 free in the first), one commit per call: a full call at each block's start and again once
    # 3 of 8 positions (> 0.3) changed since the last full call.
    assert recorded.lengths == [L, 8, 8, L, 8, 8, L] + [L, 8, 8, L, 8, 8, L, 8]


def test_cache_policy_arguments_are_checked():
    with pytest.raises(ValueError, match="cache_refresh_every=0"):
        get_sampler("remask", block_length=4, kv_cache="dual", cache_refresh_every=0)
    with pytest.raises(ValueError, match="cache_refresh_changed=1.5"):
        get_sampler("threshold", block_length=4, kv_cache="dual", cache_refresh_changed=1.5)
    with pytest.raises(ValueError, match="set kv_cache too"):
        get_sampler("remask", block_length=4, cache_refresh_every=2)


@pytest.mark.parametrize("mode", ["prefix", "dual", "delayed"])
def test_a_short_last_block_is_cached_like_the_others(mode):
    """A canvas that is not a whole number of blocks: the last block is shorter, for every cache mode."""
    model = _model()
    common = dict(prompt_ids=torch.tensor([[1, 2, 3]]).repeat(2, 1), length=L - 3, num_steps=13)  # 3 + 13 = 16
    plain = get_sampler("remask", block_length=6, **{}).generate(
        model, **common, generator=torch.Generator().manual_seed(0))
    exact = get_sampler("remask", block_length=6, kv_cache=mode, cache_refresh_every=1).generate(
        model, **common, generator=torch.Generator().manual_seed(0))
    assert torch.equal(exact.tokens, plain.tokens)
    # The cached (unrefreshed) calls on a short last block: exact where the cache is, a block-causal model whose
    # blocks are the sampler's ([0, 6), [6, 12), [12, 16): the last one short); delayed caching inside a block is
    # an approximation even there, so it is held to the call pattern.
    causal = _model(attention_block_size=6)
    short = dict(batch_size=2, length=L, num_steps=16)
    uncached = get_sampler("remask", block_length=6).generate(causal, **short, generator=torch.Generator().manual_seed(0))
    recorded = Recording(causal)
    cached = get_sampler("remask", block_length=6, kv_cache=mode).generate(
        recorded, **short, generator=torch.Generator().manual_seed(0))
    assert cached.nfe == uncached.nfe
    if mode in ("prefix", "dual"):
        assert torch.equal(cached.tokens, uncached.tokens)
    # the short block [12, 16): one full call, then calls on its 4 positions at most (delayed: its uncached ones)
    assert recorded.lengths[-4] == L and all(n <= 4 for n in recorded.lengths[-3:]), recorded.lengths
    if mode in ("prefix", "dual"):
        assert recorded.lengths[-3:] == [4, 4, 4], recorded.lengths


def test_a_cache_policy_checks_itself():
    from samplers.kv_cache import CachePolicy

    with pytest.raises(ValueError, match="kv_cache='triple'"):
        CachePolicy("triple")
    with pytest.raises(ValueError, match="cache_refresh_every=0"):
        CachePolicy("dual", refresh_every=0)
