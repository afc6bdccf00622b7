"""Reliability: injected faults in training (NaN/inf steps, SIGKILL, SIGTERM) and what the run does about them."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion.objectives import DiffusionObjective
from diffusion.training import train
from tests.test_training import tiny

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def poison(monkeypatch):
    """``poison({2, 3})`` makes the training loss NaN at those step indices (eval calls are left alone)."""
    original = DiffusionObjective.score

    def install(steps, value=float("nan")):
        calls = {"n": 0}

        def score(self, model, *args, **kwargs):
            out = original(self, model, *args, **kwargs)
            if not torch.is_grad_enabled():
                return out  # held-out evaluation
            index = calls["n"]
            calls["n"] += 1
            return dataclasses.replace(out, loss=out.loss * value) if index in steps else out

        monkeypatch.setattr(DiffusionObjective, "score", score)

    return install


def test_a_non_finite_step_is_skipped_without_touching_optimizer_scheduler_or_ema(tmp_path, poison):
    poison({2}, float("nan"))
    result = train(tiny(tmp_path, max_steps=6, save_every=6, ema_decay=0.9))
    checkpoint = tmp_path / "run/checkpoints/step-00000006"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1 and state["ema_updates"] == 5
    assert state["scheduler"]["last_epoch"] == 5  # 6 steps, one skipped
    adam = load_file(str(checkpoint / "optimizer.safetensors"))
    assert {float(v) for k, v in adam.items() if k.endswith(".step")} == {5.0}  # Adam took 5 steps, not 6
    weights = load_file(str(checkpoint / "model/model.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    skipped = [r for r in records if r.get("skipped")]
    assert [r["step"] for r in skipped] == [3] and skipped[0]["skipped_steps"] == 1


def test_inf_gradients_are_caught_too_and_k_in_a_row_stop_the_run(tmp_path, poison):
    poison({1, 2, 3}, float("inf"))
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps .* \(the last at step 4\)") as err:
        train(tiny(tmp_path, max_steps=6, save_every=1, max_consecutive_skips=3))
    # Where to look and what to resume from: the newest checkpoint, whose weights the skipped steps never touched.
    assert "metrics.jsonl" in str(err.value) and "step-00000003" in str(err.value)
    weights = load_file(str(tmp_path / "run/checkpoints/step-00000003/model/model.safetensors"))
    reference = load_file(str(tmp_path / "run/checkpoints/step-00000001/model/model.safetensors"))
    assert all(torch.equal(weights[k], reference[k]) for k in weights)


_RUN = """
import sys
from diffusion.train_config import TrainConfig
from diffusion.training import train
config = TrainConfig(output_dir=sys.argv[1], seq_len=32, hidden_size=32, num_layers=1, num_heads=2, cond_dim=16,
                     batch_size=4, max_steps=int(sys.argv[2]), warmup_steps=2, lr=3e-3, eval_every=0, eval_blocks=8,
                     eval_batch_size=8, log_every=1, save_every=int(sys.argv[3]), keep_last=50, precision="no",
                     progress=False, max_position_embeddings=64, ema_decay=0.9, resume=sys.argv[4] or None)
print("done", train(config).step, flush=True)
"""


def _run(out: Path, max_steps: int, save_every: int, resume: str = "") -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen([sys.executable, "-c", _RUN, str(out), str(max_steps), str(save_every), resume],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _final_state(run: Path, step: int) -> dict[str, torch.Tensor]:
    checkpoint = run / "checkpoints" / f"step-{step:08d}"
    tensors = {f"model.{k}": v for k, v in load_file(str(checkpoint / "model/model.safetensors")).items()}
    tensors.update({f"ema.{k}": v for k, v in load_file(str(checkpoint / "ema/model.safetensors")).items()})
    for path in checkpoint.glob("optimizer*.safetensors"):
        tensors.update({f"{path.name}.{k}": v for k, v in load_file(str(path)).items()})
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    tensors["scheduler"] = torch.tensor(state["scheduler"]["last_epoch"])
    return tensors


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    start = time.time()
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.time() - start < timeout, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_killed_or_preempted_runs_resume_to_the_uninterrupted_result_bit_for_bit(tmp_path, how):
    straight = _run(tmp_path / "straight", 40, 40)
    interrupted = _run(tmp_path / "interrupted", 40, 5)
    _wait_for(tmp_path / "interrupted/checkpoints/step-00000010/COMPLETE", interrupted)
    interrupted.send_signal(signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)
    _, stderr = interrupted.communicate(timeout=240)
    if how == "SIGTERM":
        # Pre-emption: a checkpoint at the step it stopped, then a clean exit.
        assert interrupted.returncode == 0, stderr[-2000:]
        state = json.loads(max((tmp_path / "interrupted/checkpoints").glob("step-*/trainer_state.json")).read_text())
        assert state["step"] < 40
        assert "SIGTERM" in stderr
    else:
        assert interrupted.returncode == -signal.SIGKILL
    resumed = _run(tmp_path / "interrupted", 40, 5, resume="auto")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1][-2000:]
    assert straight.wait(timeout=300) == 0, straight.communicate()[1][-2000:]
    a, b = _final_state(tmp_path / "straight", 40), _final_state(tmp_path / "interrupted", 40)
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
