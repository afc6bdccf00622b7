"""Time-free models with constant adaLN modulation and the fan-in initialisation (diffusion/modeling_ddit.py):
MDLM's time-free DIT in ddlm's model, the change that closed ddlm's learning-speed gap to MDLM's code."""

import math

import pytest
import torch

from diffusion import DDiTConfig, DDiTModel
from diffusion.training.config import TrainConfig

V = 17  # 16 real tokens + MASK


def _model(**overrides) -> DDiTModel:
    torch.manual_seed(0)
    config = DDiTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, cond_dim=16,
                        max_position_embeddings=16, constant_modulation=True, init_scheme="fan_in", **overrides)
    return DDiTModel(config).eval()


def test_a_fresh_fan_in_model_predicts_uniformly_and_starts_with_identity_blocks():
    model = _model()
    assert not model.config.needs_sigma and not model.config.time_conditioning
    x = torch.full((2, 8), V - 1)  # all masked
    log_probs = model(x).logits
    assert torch.allclose(log_probs[..., : V - 1], torch.full_like(log_probs[..., : V - 1], -math.log(V - 1)),
                          atol=1e-6)  # zero head: every real token 1/N
    for block in model.blocks:  # adaLN-zero: modulations start at zero, so every block is the identity
        assert block.modulation is not None and not block.modulation.weight.any() and not block.modulation.bias.any()
    # fan-in init: PyTorch's default Linear bound 1/sqrt(fan_in) (std 1/sqrt(3 fan_in)), not N(0, 0.02)
    std = model.blocks[0].qkv.weight.std().item()
    assert std == pytest.approx(1 / math.sqrt(3 * 32), rel=0.1)


def test_the_network_reads_no_time_and_the_exact_cache_matches_the_uncached_sampler():
    from samplers import get_sampler

    model = _model()
    with torch.no_grad():  # give the modulations and the head values, so that the checks below bite
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    x = torch.randint(0, V, (3, 8))
    x[:, ::2] = V - 1
    base = model(x).logits
    assert torch.equal(base, model(x, total_noise=torch.tensor([0.1, 1.0, 5.0])).logits)  # the noise is ignored
    runs = [get_sampler("ancestral", cache=cache).generate(model, batch_size=4, length=8, num_steps=16,
                                                          generator=torch.Generator().manual_seed(3))
            for cache in (False, True)]
    uncached, cached = runs
    assert torch.equal(uncached.tokens, cached.tokens)


def test_the_fields_round_trip_and_old_configs_keep_the_old_model(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "m")
    again = DDiTModel.from_pretrained(tmp_path / "m").eval()
    assert again.config.constant_modulation and again.config.init_scheme == "fan_in"
    x = torch.randint(0, V - 1, (2, 8))
    x[:, 1] = V - 1
    assert torch.equal(model(x).logits, again(x).logits)
    old = DDiTConfig.from_dict({k: v for k, v in model.config.to_dict().items()
                                if k not in ("constant_modulation", "init_scheme")})
    assert not old.constant_modulation and old.init_scheme == "normal"
    assert DDiTModel(old).blocks[0].modulation is None


def test_bad_values_are_refused_by_name():
    for build in (TrainConfig, DDiTConfig):
        with pytest.raises(ValueError, match=r"init_scheme must be one of \['normal', 'fan_in'\], got init_scheme='xavier'"):
            build(init_scheme="xavier")
    with pytest.raises(ValueError, match="constant_modulation is for a time-free model"):
        TrainConfig(constant_modulation=True, time_conditioning="on")
    with pytest.raises(ValueError, match="constant_modulation is for a time-free model"):
        DDiTConfig(parameterization="score", constant_modulation=True)
    assert TrainConfig(constant_modulation=True, init_scheme="fan_in").init_scheme == "fan_in"
