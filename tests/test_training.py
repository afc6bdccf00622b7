"""The training loop: learning happens, resume is bit-exact, checkpoints are safe, config errors are clear."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion.training.checkpoint import CheckpointError, find_latest_checkpoint
from diffusion.training.config import TrainConfig
from diffusion.training import lr_factor, train

REPO = Path(__file__).resolve().parents[1]


def tiny(tmp_path: Path, **overrides) -> TrainConfig:
    base = dict(
        output_dir=str(tmp_path / "run"), seq_len=32, hidden_size=32, num_layers=1, num_heads=2, cond_dim=16,
        batch_size=4, max_steps=6, warmup_steps=2, lr=3e-3, eval_every=0, eval_blocks=8, eval_batch_size=8,
        log_every=1, save_every=3, keep_last=5, precision="no", progress=False, max_position_embeddings=64,
    )
    return TrainConfig(**{**base, **overrides})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_short_run_lowers_held_out_loss_and_changes_every_parameter(tmp_path):
    config = tiny(tmp_path, max_steps=60, eval_every=60, ema_decay=0.0, lr=1e-2, batch_size=8, save_every=0)
    result = train(config)
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0] - 1.0, evals  # step 0 vs step 60
    # each held-out loss also in bits per byte: nats/token x scored tokens / (UTF-8 bytes of those blocks x ln 2)
    from diffusion.data import build_blocks, load_texts, load_tokenizer as _tokenizer

    held_out = build_blocks(load_texts("builtin:shakespeare")["validation"], _tokenizer("builtin"), 32)[:8]
    num_bytes = sum(len(_tokenizer("builtin").decode(row, skip_special_tokens=True,
                                                     clean_up_tokenization_spaces=False).encode()) for row in held_out.tolist())
    for r in (r for r in records if "eval_loss" in r):
        assert r["eval_bits_per_byte"] == pytest.approx(r["eval_loss"] * 8 * 32 / (num_bytes * math.log(2)), rel=1e-12)
    from diffusion import DDiTConfig, DDiTModel
    from diffusion.data import load_tokenizer
    from diffusion.training import build_model_config

    torch.manual_seed(config.seed)
    initial = DDiTModel(build_model_config(config, load_tokenizer("builtin"))).state_dict()
    final = _weights(result.final_dir / "model.safetensors")
    assert set(final) == set(initial)
    for name, value in final.items():
        assert not torch.equal(value, initial[name]), f"{name} did not change"
    assert DDiTConfig.from_pretrained(result.final_dir).vocab_size == 4097


@pytest.mark.parametrize("tied", [False, True])
def test_resume_is_bit_exact(tmp_path, tied):
    """Also with the output head tied to the embedding: the shared tensor is stored once and tied again on load."""
    straight = train(tiny(tmp_path / "a", dropout=0.1, ema_decay=0.9, tie_embeddings=tied))
    first_half = train(tiny(tmp_path / "b", dropout=0.1, ema_decay=0.9, stop_after_steps=3, tie_embeddings=tied))
    assert first_half.final_dir is None
    resumed = train(tiny(tmp_path / "b", dropout=0.1, ema_decay=0.9, resume="auto", tie_embeddings=tied))
    state = next((tmp_path / "a/run/checkpoints/step-00000006/state").glob("*.safetensors")).relative_to(
        tmp_path / "a/run/checkpoints/step-00000006")
    assert any(k.startswith("optim.") for k in _weights(tmp_path / "a/run/checkpoints/step-00000006" / state))
    for sub in ("model/model.safetensors", "ema/model.safetensors", str(state)):  # weights, EMA, optimizer state
        a = _weights(tmp_path / "a/run/checkpoints/step-00000006" / sub)
        b = _weights(tmp_path / "b/run/checkpoints/step-00000006" / sub)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (sub, key)
    assert _weights(straight.final_dir / "model.safetensors").keys() == _weights(resumed.final_dir / "model.safetensors").keys()
    if tied:
        from diffusion import DDiTModel

        model = DDiTModel.from_pretrained(str(resumed.final_dir))
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    records_a = [json.loads(x) for x in (tmp_path / "a/run/metrics.jsonl").read_text().splitlines()]
    records_b = [json.loads(x) for x in (tmp_path / "b/run/metrics.jsonl").read_text().splitlines()]
    train_a = [(r["step"], r["loss"]) for r in records_a if "loss" in r]
    train_b = [(r["step"], r["loss"]) for r in records_b if "loss" in r]
    assert train_a == train_b and [s for s, _ in train_a] == list(range(1, 7))  # same batches, same losses


def test_resume_auto_skips_incomplete_checkpoints_and_bad_paths_fail(tmp_path):
    config = tiny(tmp_path, stop_after_steps=3)
    train(config)
    root = Path(config.output_dir) / "checkpoints"
    complete = root / "step-00000003"
    # a crash mid-write: a newer folder without the COMPLETE marker, and a temporary folder
    broken = root / "step-00000005"
    broken.mkdir()
    (broken / "trainer_state.json").write_text("{")
    (root / ".tmp-step-00000006").mkdir()
    assert find_latest_checkpoint(root) == complete
    with pytest.raises(FileNotFoundError, match="resume checkpoint does not exist"):
        train(replace(config, resume=str(root / "step-00000999")))
    with pytest.raises(CheckpointError, match="incomplete"):
        train(replace(config, resume=str(broken)))
    # a corrupt (truncated) state file in a complete checkpoint
    shard = next((complete / "state").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="the state in .*state cannot be read into this run \\(a corrupt file"):
        train(replace(config, resume=str(complete)))


def test_resume_rejects_a_different_run_configuration(tmp_path):
    config = tiny(tmp_path, stop_after_steps=3)
    train(config)
    with pytest.raises(CheckpointError, match="seq_len: checkpoint 32 vs run 48"):
        train(replace(config, seq_len=48, resume="auto"))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"batch_size": 0}, "batch_size must be a positive int, got batch_size=0"),
        ({"batch_size": -4}, "batch_size=-4"),
        ({"seq_len": 2048}, "seq_len must not exceed max_position_embeddings=1024, got seq_len=2048"),
        ({"process": "gaussian"}, "process must be one of .*got process='gaussian'"),
        ({"schedule": "exponential"}, "schedule must be one of \\['auto', .*got schedule='exponential'"),
        ({"schedule": "geometric", "schedule_kwargs": {"eps": 0.1}}, "schedule_kwargs="),
        ({"process": "uniform"}, "objective='masked_elbo' needs process='absorbing'"),
        ({"lr": 0.0}, r"lr must be in \(0, 1\]"),
        ({"lr": 1e308}, r"lr must be in \(0, 1\].*got lr=1e\+308"),
        ({"lr": float("inf")}, "lr must be a finite number, got lr=inf"),
        ({"weight_decay": float("nan")}, "weight_decay must be a finite number, got weight_decay=nan"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"attention_dropout": 1.5}, r"attention_dropout must be in \[0, 1\) or None.*1.5"),
        ({"attention_dropout": float("nan")}, "attention_dropout"),
    ],
)
def test_bad_config_values_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**overrides)


def test_cli_reports_bad_values_before_any_work():
    result = subprocess.run([sys.executable, "-m", "samplers.cli.train", "--batch-size", "0"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "batch_size must be a positive int, got batch_size=0" in result.stderr


def test_cli_missing_dataset_is_one_line_error(tmp_path):
    from samplers.cli.train import main

    result = subprocess.run([sys.executable, "-m", "samplers.cli.train", "--output-dir", str(tmp_path / "run"),
                             "--dataset", "./no/such/dir"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "ddlm-train: error: dataset path does not exist: dataset='./no/such/dir'"
    assert main(["--output-dir", str(tmp_path / "run2"), "--resume", str(tmp_path / "missing")]) == 2


def test_warm_up_defaults_to_a_tenth_of_the_run_at_most_100_steps():
    assert TrainConfig(max_steps=50).resolved_warmup_steps == 5  # a short run no longer fails on the warm-up
    assert TrainConfig(max_steps=5000).resolved_warmup_steps == 100
    assert TrainConfig(max_steps=50, warmup_steps=20).resolved_warmup_steps == 20
    with pytest.raises(ValueError, match="warmup_steps must not exceed max_steps=50, got warmup_steps=80"):
        TrainConfig(max_steps=50, warmup_steps=80)
    with pytest.raises(ValueError, match="objective must be one of .*got objective='masked'"):  # choices first
        TrainConfig(max_steps=50, warmup_steps=80, objective="masked")


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    config = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, config) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(100, config) == pytest.approx(0.1)


_TWO_RANK_SCRIPT = """
import sys
from diffusion.training.config import TrainConfig
from diffusion.training import train
import json
import math
overrides = json.loads(sys.argv[1])
train(TrainConfig(**overrides))
"""


def test_two_processes_match_one_process_with_the_doubled_batch(tmp_path):
    base = tiny(tmp_path, max_steps=4, save_every=4, ema_decay=0.0).to_dict()
    two = {**base, "output_dir": str(tmp_path / "two"), "batch_size": 4}
    one = {**base, "output_dir": str(tmp_path / "one"), "batch_size": 8}
    script = tmp_path / "run_train.py"
    script.write_text(_TWO_RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(script), json.dumps(two)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(TrainConfig(**one))

    ckpt_two, ckpt_one = tmp_path / "two/checkpoints/step-00000004", tmp_path / "one/checkpoints/step-00000004"
    state = json.loads((ckpt_two / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    assert (ckpt_two / "rng-0.safetensors").exists() and (ckpt_two / "rng-1.safetensors").exists()
    a, b = _weights(ckpt_two / "model/model.safetensors"), _weights(ckpt_one / "model/model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    records = [json.loads(x) for x in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # one writer: no duplicated records
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "two/checkpoints").iterdir())
