"""Training from a model the user already has: a causal LM converted on the fly, a converted folder, a ddit model
made a block-diffusion one."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion import DDiTConfig
from diffusion.adapters import CONVERTED_FILE, DiffusionLMAdapter, load_denoiser, read_converted
from diffusion.evaluation import evaluate_likelihood
from diffusion.training import train
from diffusion.training.config import TrainConfig
from samplers import get_sampler


def tiny(output: Path, **overrides) -> TrainConfig:
    base = dict(output_dir=str(output), seq_len=32, hidden_size=32, num_layers=1, num_heads=2, cond_dim=16,
                batch_size=4, max_steps=4, warmup_steps=1, lr=3e-3, eval_every=0, eval_blocks=8, eval_batch_size=8,
                log_every=1, save_every=2, keep_last=5, precision="no", progress=False, max_position_embeddings=64)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def autoregressive(tmp_path_factory) -> Path:
    """The project's autoregressive baseline, trained for a few steps."""
    root = tmp_path_factory.mktemp("ar")
    return train(tiny(root / "run", objective="autoregressive", max_steps=6)).final_dir


def test_init_from_a_causal_lm_converts_it_trains_and_resumes_bit_exactly(tmp_path, autoregressive):
    straight = train(tiny(tmp_path / "a", init_from=str(autoregressive)))
    train(tiny(tmp_path / "b", init_from=str(autoregressive), stop_after_steps=2))
    resumed = train(tiny(tmp_path / "b", init_from=str(autoregressive), resume="auto"))
    a, b = (load_file(str(r.final_dir / "model.safetensors")) for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = read_converted(str(straight.final_dir))
    assert (record["mask_token_id"], record["shift_logits"], record["attention"]) == (4096, True, "bidirectional")
    model, tokenizer = load_denoiser(str(straight.final_dir))
    assert isinstance(model, DiffusionLMAdapter) and tokenizer.mask_token_id == 4096
    original = load_file(str(autoregressive / "model.safetensors"))
    changed = [k for k in original if not torch.equal(original[k], a[k])]
    assert changed, "training changed nothing"
    out = get_sampler("ancestral").generate(model, batch_size=2, length=8, num_steps=8,
                                            generator=torch.Generator().manual_seed(0))
    assert not bool((out.tokens == 4096).any())
    blocks = torch.randint(0, 4096, (4, 16), generator=torch.Generator().manual_seed(1))
    result = evaluate_likelihood(model, blocks, num_points=2, progress=False)
    assert result.network_calls == 2 * 1 and 0 < result.nats_per_token < 50


def test_a_converted_folder_trains_as_block_diffusion_and_a_ddit_model_becomes_one(tmp_path, autoregressive):
    from diffusion.cli.convert import main as convert_main

    converted = tmp_path / "converted"
    assert convert_main(["--model", str(autoregressive), "--output-dir", str(converted), "--shift-logits",
                         "false"]) == 0
    assert (converted / CONVERTED_FILE).is_file()
    blocked = train(tiny(tmp_path / "bd3", init_from=str(converted), block_size=8, max_steps=2))
    assert read_converted(str(blocked.final_dir))["attention"] == "block"
    model, _ = load_denoiser(str(blocked.final_dir))
    assert model.config.attention_block_size == 8
    masked = train(tiny(tmp_path / "mdlm", max_steps=2))
    bd3 = train(tiny(tmp_path / "mdlm-bd3", init_from=str(masked.final_dir), block_size=4, max_steps=2,
                     t_min=0.3, t_max=0.8))
    assert DDiTConfig.from_pretrained(bd3.final_dir).attention_block_size == 4


def test_bad_starting_points_are_refused_in_one_line(tmp_path, autoregressive):
    with pytest.raises(ValueError, match="init_from brings its own tokenizer"):
        tiny(tmp_path, init_from=str(autoregressive), tokenizer="builtin")
    with pytest.raises(ValueError, match="--block-size with --init-from a causal LM needs --shift-logits false"):
        train(tiny(tmp_path / "x", init_from=str(autoregressive), block_size=8))
    with pytest.raises(FileNotFoundError, match="--init-from folder does not exist"):
        train(tiny(tmp_path / "y", init_from=str(tmp_path / "nothing-here")))
    with pytest.raises(ValueError, match="t_max below 1 .* is for block diffusion"):
        tiny(tmp_path, t_max=0.5)
