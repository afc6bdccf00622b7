"""DiffusionSpec: the objects a model config describes, built once."""

import pytest
import torch

from diffusion import DDiTConfig, DiffusionSpec, LogLinearSchedule
from diffusion.adapters import DenoiserConfig
from diffusion.processes import AbsorbingProcess, UniformProcess, mask_tokens


def test_spec_of_ddit_configs():
    masked = DiffusionSpec.from_config(DDiTConfig(vocab_size=11))
    assert masked.masked and masked.time_free_masked and masked.num_tokens == 10 and masked.mask_id == 10
    assert isinstance(masked.process, AbsorbingProcess) and masked.process.num_states == 11
    assert masked.process is masked.process  # built once
    assert masked.schedule == LogLinearSchedule(eps=1e-3) and masked.default_sampler == "ancestral"
    uniform = DiffusionSpec.from_config(DDiTConfig(vocab_size=10, process="uniform", parameterization="score",
                                                   schedule="geometric", schedule_kwargs={}))
    assert not uniform.masked and uniform.num_tokens == 10 and isinstance(uniform.process, UniformProcess)
    assert uniform.default_sampler == "analytic" and uniform.time_conditioning


def test_an_outside_model_with_the_mask_elsewhere_has_no_score_process():
    spec = DiffusionSpec.from_config(DenoiserConfig(vocab_size=50, mask_token_id=7, max_position_embeddings=16))
    assert spec.masked and spec.num_tokens == 49 and spec.mask_id == 7
    with pytest.raises(ValueError, match="needs MASK as the last state .* mask id is 7"):
        spec.process
    with pytest.raises(ValueError, match="mask id in \\[0, 50\\), got mask_id=50"):
        DiffusionSpec("absorbing", LogLinearSchedule(), "subs", False, 50, 50)


def test_mask_tokens_masks_at_the_given_probability_and_only_where_allowed():
    x0 = torch.zeros((4000, 6), dtype=torch.long)
    probability = torch.tensor([0.1, 0.5, 0.9, 0.0]).repeat_interleave(1000)
    where = torch.tensor([True] * 5 + [False])
    xt, masked = mask_tokens(x0, probability, 99, generator=torch.Generator().manual_seed(0), where=where)
    assert torch.equal(xt == 99, masked) and not bool(masked[:, 5].any())
    rates = masked[:, :5].float().view(4, 1000 * 5).mean(-1)
    torch.testing.assert_close(rates, torch.tensor([0.1, 0.5, 0.9, 0.0]), atol=0.02, rtol=0)
