"""The pieces both trainers share: seeded streams, the EMA swap, the resume rule and atomic folders."""

from pathlib import Path

import pytest
import torch

from diffusion.training.checkpoint import COMPLETE, CheckpointError, atomic_directory, check_resumable
from diffusion.training.ema import EMA
from diffusion.training.seeding import PURPOSES, derive_generator


def test_streams_are_pure_functions_of_seed_step_purpose_and_index():
    draw = lambda *key: torch.rand(4, generator=derive_generator(*key)).tolist()  # noqa: E731
    assert draw(0, 3, "batch") == draw(0, 3, "batch")
    keys = [(seed, step, purpose, index) for seed in (0, 1) for step in (0, 1, 7) for purpose in PURPOSES
            for index in (0, 1)]
    values = {tuple(draw(*key)) for key in keys}
    assert len(values) == len(keys)  # no two streams coincide
    with pytest.raises(ValueError, match="purpose must be one of"):
        derive_generator(0, 0, "dropout")
    with pytest.raises(ValueError, match="step must be an int >= 0, got step=-1"):
        derive_generator(0, -1, "batch")


def test_ema_applied_swaps_the_average_in_and_restores_the_weights_bit_for_bit():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # decay min(0.5, 1/10) = 0.1: shadow = 0.1 old + 0.9 new
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied(model) as swapped:
        assert swapped is model
        torch.testing.assert_close(model.weight, ema.shadow["weight"], rtol=0, atol=0)
        assert not torch.equal(model.weight, raw["weight"])
    assert all(torch.equal(model.state_dict()[k], raw[k]) for k in raw)
    with pytest.raises(RuntimeError, match="inside"), ema.applied(model):
        raise RuntimeError("inside")
    assert all(torch.equal(model.state_dict()[k], raw[k]) for k in raw)  # restored after an error too


def test_resume_rule_names_every_differing_field():
    saved = {"seq_len": 32, "lr": 1e-3, "output_dir": "a", "seed": 0}
    check_resumable(saved, {**saved, "output_dir": "b"}, {"output_dir"}, Path("ckpt"))
    with pytest.raises(CheckpointError, match=r"seq_len: checkpoint 32 vs run 48; lr: checkpoint 0.001 vs run 0.002"):
        check_resumable(saved, {**saved, "seq_len": 48, "lr": 2e-3}, {"output_dir"}, Path("ckpt"))


def test_atomic_directory_renames_on_success_and_leaves_the_old_folder_on_failure(tmp_path):
    target = tmp_path / "step-1"
    with atomic_directory(target, complete=True) as tmp:
        (tmp / "a.txt").write_text("first")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "first" and (target / COMPLETE).is_file()
    with pytest.raises(OSError), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("second")
        raise OSError("disk full")
    assert (target / "a.txt").read_text() == "first"  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]  # no temporary folder left


def test_written_files_get_the_umask_modes_not_safetensors_private_ones(tmp_path):
    import os

    from diffusion import DDiTConfig, DDiTModel
    from diffusion.training.checkpoint import save_weights

    previous = os.umask(0o022)
    try:
        save_weights({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
        with atomic_directory(tmp_path / "final", complete=True) as tmp:
            DDiTModel(DDiTConfig(vocab_size=9, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 cond_dim=8)).save_pretrained(tmp)
    finally:
        os.umask(previous)
    assert oct((tmp_path / "w.safetensors").stat().st_mode & 0o777) == oct(0o644)
    for path in (tmp_path / "final").iterdir():
        assert oct(path.stat().st_mode & 0o777) == oct(0o644), path.name
    assert oct((tmp_path / "final").stat().st_mode & 0o777) == oct(0o755)
