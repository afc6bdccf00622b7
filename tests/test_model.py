"""The DDiT denoiser: parameterisation invariants, time conditioning, persistence, gradients, bf16."""

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForMaskedLM

import diffusion  # noqa: F401  (registers the Auto classes)
from diffusion.modeling_ddit import NEG_INF, DDiTConfig, DDiTModel

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, cond_dim=16, max_position_embeddings=64)
VOCAB = 13  # 12 real tokens + MASK for the absorbing models
MASK = VOCAB - 1


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return DDiTModel(DDiTConfig(**{"vocab_size": VOCAB, **TINY, **overrides})).eval()


def _noisy_batch(seed=0, batch=3, length=10, mask_rate=0.5):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, MASK, (batch, length), generator=gen)
    masked = torch.rand(batch, length, generator=gen) < mask_rate
    return torch.where(masked, torch.full_like(x0, MASK), x0)


def _randomize_modulation(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def test_subs_outputs_are_carry_over_log_probs():
    model = _model()
    xt = _noisy_batch()
    logp = model(xt).logits
    assert logp.shape == (3, 10, VOCAB) and logp.dtype == torch.float32
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(3, 10))
    assert bool((logp[..., MASK] <= NEG_INF / 2).all())  # MASK is never predicted
    unmasked = xt != MASK
    own = logp.gather(-1, xt[..., None])[..., 0]
    assert bool((own[unmasked] == 0).all())  # carried-over tokens are certain
    others = logp.scatter(-1, xt[..., None], NEG_INF)
    assert bool((others[unmasked] == NEG_INF).all())
    assert bool((logp[~unmasked].exp()[..., :MASK] > 0).all())  # masked positions: a real distribution


def test_score_outputs_scale_by_sigma_and_zero_at_current_state():
    scaled = _model(parameterization="score")
    raw = _model(parameterization="score", scale_by_sigma=False)
    raw.load_state_dict(scaled.state_dict())
    _randomize_modulation(scaled)
    _randomize_modulation(raw)
    xt = _noisy_batch()
    sigma = torch.tensor([0.01, 1.0, 5.0])
    out_scaled, out_raw = scaled(xt, total_noise=sigma).logits, raw(xt, total_noise=sigma).logits
    current = torch.zeros_like(out_scaled, dtype=torch.bool).scatter(-1, xt[..., None], True)
    assert bool((out_scaled[current] == 0).all()) and bool((out_raw[current] == 0).all())
    offset = (torch.log(torch.expm1(sigma)) + math.log(VOCAB - 1))[:, None, None].expand_as(out_raw)
    torch.testing.assert_close(out_scaled[~current], (out_raw - offset)[~current], rtol=1e-5, atol=1e-5)


def test_time_conditioning_switch():
    free = _model()
    xt = _noisy_batch()
    torch.testing.assert_close(free(xt, total_noise=torch.full((3,), 0.1)).logits, free(xt, total_noise=torch.full((3,), 3.0)).logits, rtol=0, atol=0)
    conditioned = _model(time_conditioning=True)
    _randomize_modulation(conditioned)
    a = conditioned(xt, total_noise=torch.full((3,), 0.1)).logits
    b = conditioned(xt, total_noise=torch.full((3,), 3.0)).logits
    assert (a - b).abs().max() > 1e-5  # small at init (std-0.02 noise MLP) but present
    with pytest.raises(ValueError, match="pass total_noise"):
        conditioned(xt)
    with pytest.warns(FutureWarning, match="sigma=...\\) is deprecated"):  # the old keyword still works, loudly
        torch.testing.assert_close(conditioned(xt, sigma=torch.full((3,), 0.1)).logits, a, rtol=0, atol=0)


def test_attention_is_bidirectional_and_respects_padding():
    model = _model()
    xt = _noisy_batch(batch=1, mask_rate=1.0)
    changed = xt.clone()
    changed[0, -1] = 3
    assert (model(xt).logits[0, 0] - model(changed).logits[0, 0]).abs().max() > 1e-6  # the last token informs the first
    mask = torch.ones_like(xt)
    mask[0, -3:] = 0
    padded_a = model(xt, attention_mask=mask).logits[0, :-3]
    padded_b = model(changed, attention_mask=mask).logits[0, :-3]
    torch.testing.assert_close(padded_a, padded_b, rtol=0, atol=1e-6)  # padding keys are invisible


@pytest.mark.parametrize("overrides", [{}, {"parameterization": "score"}, {"tie_word_embeddings": True},
                                       {"process": "uniform", "parameterization": "score", "vocab_size": 12}])
def test_save_and_load_round_trip(tmp_path, overrides):
    model = _model(**overrides)
    _randomize_modulation(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    xt = _noisy_batch() % model.config.vocab_size
    sigma = torch.tensor([0.2, 1.0, 3.0])
    for loader in (DDiTModel, AutoModelForMaskedLM):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is DDiTModel
        strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
        assert strip(loaded.config.to_dict()) == strip(model.config.to_dict())
        torch.testing.assert_close(loaded(xt, total_noise=sigma).logits, model(xt, total_noise=sigma).logits, rtol=0, atol=0)
        if model.config.tie_word_embeddings:
            assert loaded.lm_head.weight.data_ptr() == loaded.embed_tokens.weight.data_ptr()
    assert AutoConfig.from_pretrained(tmp_path).process == model.config.process


@pytest.mark.parametrize("overrides", [{}, {"parameterization": "score"}])
def test_gradients_reach_every_parameter(overrides):
    model = _model(**overrides).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    xt = _noisy_batch(batch=4)
    sigma = torch.tensor([0.3, 0.7, 1.5, 4.0])
    for _ in range(2):  # adaLN-zero: the first step opens the gates, the second reaches everything behind them
        optimizer.zero_grad()
        out = model(xt, total_noise=sigma).logits
        loss = (out[..., :MASK].clamp_min(-30) * torch.linspace(-1, 1, MASK)).sum()
        loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_bfloat16_autocast_and_bf16_weights_close_to_float32():
    model = _model(parameterization="score")
    _randomize_modulation(model)
    xt = _noisy_batch()
    sigma = torch.tensor([0.2, 1.0, 3.0])
    ref = model(xt, total_noise=sigma).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model(xt, total_noise=sigma).logits
    assert auto.dtype == torch.float32
    bf16 = model.to(torch.bfloat16)(xt, total_noise=sigma).logits
    for out in (auto, bf16):
        assert torch.isfinite(out).all()
        assert (out - ref).abs().max() < 0.1


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"process": "uniform"}, "parameterization='subs' needs process='absorbing'"),
        ({"num_attention_heads": 5}, r"hidden_size \(32\) must be divisible"),
        ({"mask_token_id": 0}, "mask_token_id=0"),
        ({"parameterization": "energy"}, "parameterization='energy'"),
        ({"dropout": 1.5}, "dropout=1.5"),
        ({"process": "uniform", "parameterization": "score", "scale_by_sigma": True}, "scale_by_sigma=True"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        DDiTConfig(**{"vocab_size": VOCAB, **TINY, **overrides})


def test_forward_rejects_too_long_input():
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=64"):
        _model()(torch.zeros(1, 65, dtype=torch.long))


def test_eager_attention_matches_sdpa_with_padding():
    sdpa = _model(parameterization="score")
    _randomize_modulation(sdpa)
    eager = _model(parameterization="score", attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    assert eager.config._attn_implementation == "eager"
    xt = _noisy_batch()
    mask = torch.ones_like(xt)
    mask[1, -4:] = 0
    sigma = torch.tensor([0.2, 1.0, 3.0])
    torch.testing.assert_close(eager(xt, total_noise=sigma, attention_mask=mask).logits,
                               sdpa(xt, total_noise=sigma, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_from_pretrained_is_strict_about_config_and_weights(tied, tmp_path):
    config = DDiTConfig(vocab_size=101, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, cond_dim=16,
                        max_position_embeddings=64, tie_word_embeddings=tied, time_conditioning=True)
    model = DDiTModel(config).eval()
    model.save_pretrained(tmp_path)
    loaded = DDiTModel.from_pretrained(tmp_path).eval()  # a matching folder loads, tied or not
    x = torch.randint(0, 101, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x, total_noise=torch.tensor([1.0])).logits,
                                   model(input_ids=x, total_noise=torch.tensor([1.0])).logits, rtol=0, atol=0)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match=r"do not match config.json \(missing_keys: blocks.1"):
        DDiTModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**raw, "time_conditioning": False}))
    with pytest.raises(ValueError, match="unexpected_keys"):
        AutoModelForMaskedLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("parameterization", ["subs", "score"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(parameterization):
    from diffusion import DiffusionObjective

    config = DDiTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, cond_dim=16,
                        parameterization=parameterization, dropout=0.1)
    objective = DiffusionObjective.from_config(config)
    x0 = torch.randint(0, VOCAB - 1, (4, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = DDiTModel(config).train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
            assert all(block.gradient_checkpointing for block in model.blocks)
        torch.manual_seed(1)  # the same dropout masks in both runs (the recompute replays them)
        out = objective(model, x0, generator=torch.Generator().manual_seed(2))
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-6, atol=1e-8, msg=name)
