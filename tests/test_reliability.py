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
from diffusion.training.checkpoint import CheckpointError
from tests.test_training import tiny

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def poison(monkeypatch):
    """``poison({2, 3})`` makes the training loss NaN at those step indices (eval calls are left alone)."""
    original = DiffusionObjective.loss

    def install(steps, value=float("nan")):
        calls = {"n": 0}

        def poisoned(self, model, *args, **kwargs):
            out = original(self, model, *args, **kwargs)
            if not torch.is_grad_enabled():
                return out  # held-out evaluation
            index = calls["n"]
            calls["n"] += 1
            return dataclasses.replace(out, loss=out.loss * value) if index in steps else out

        monkeypatch.setattr(DiffusionObjective, "loss", poisoned)

    return install


def test_a_non_finite_step_is_skipped_without_touching_optimizer_scheduler_or_ema(tmp_path, poison):
    poison({2}, float("nan"))
    result = train(tiny(tmp_path, max_steps=6, save_every=6, ema_decay=0.9))
    checkpoint = tmp_path / "run/checkpoints/step-00000006"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1 and state["ema_updates"] == 5
    assert state["scheduler"]["last_epoch"] == 5  # 6 steps, one skipped
    adam = {k: v for shard in (checkpoint / "state").glob("*.safetensors") for k, v in load_file(str(shard)).items()
            if k.startswith("optim.")}
    assert adam and {float(v) for k, v in adam.items() if k.endswith(".step")} == {5.0}  # Adam took 5 steps, not 6
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
from diffusion.training.config import TrainConfig
from diffusion.training import train
from diffusion.training.checkpoint import CheckpointError
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
    for path in (checkpoint / "state").glob("*.safetensors"):
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


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_killed_or_preempted_runs_resume_to_the_uninterrupted_result_bit_for_bit(tmp_path, how):
    straight = _run(tmp_path / "straight", 40, 40)
    interrupted = _run(tmp_path / "interrupted", 40, 5)
    _wait_for(tmp_path / "interrupted/checkpoints/step-00000010/COMPLETE", interrupted)
    interrupted.send_signal(getattr(signal, how))
    _, stderr = interrupted.communicate(timeout=240)
    if how != "SIGKILL":
        # Pre-emption or Ctrl-C: a checkpoint at the step it stopped (not only at a multiple of 5), a clean exit.
        assert interrupted.returncode == 0, stderr[-2000:]
        state = json.loads(max((tmp_path / "interrupted/checkpoints").glob("step-*/trainer_state.json")).read_text())
        assert state["step"] < 40
        assert f"received {how}: checkpoint saved at step {state['step']}" in stderr
    else:
        assert interrupted.returncode == -signal.SIGKILL
    resumed = _run(tmp_path / "interrupted", 40, 5, resume="auto")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1][-2000:]
    assert straight.wait(timeout=300) == 0, straight.communicate()[1][-2000:]
    a, b = _final_state(tmp_path / "straight", 40), _final_state(tmp_path / "interrupted", 40)
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_a_second_ctrl_c_stops_at_once_in_one_line_and_leaves_only_complete_checkpoints(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # A model big enough that finishing the step and writing its checkpoint outlasts the gap between the signals.
    command = [sys.executable, "-m", "samplers.cli.train", "--output-dir", str(tmp_path / "run"), "--seq-len", "128",
               "--hidden-size", "256", "--num-layers", "2", "--num-heads", "4", "--batch-size", "16",
               "--max-steps", "100000", "--save-every", "5", "--eval-every", "0", "--eval-blocks", "8",
               "--precision", "no", "--progress", "false", "--num-samples", "0"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "run/checkpoints/step-00000005/COMPLETE", process)
    process.send_signal(signal.SIGINT)
    # Two SIGINTs that arrive before Python runs the handler are one signal: send the second once the first is
    # acknowledged (its line on stderr), while the step is being finished and saved.
    first = []
    while not (first and "Ctrl-C: finishing this step" in first[-1]):
        first.append(process.stderr.readline())
        assert first[-1], "".join(first)[-2000:]
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    stderr = "".join(first) + stderr
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith(
        "ddlm-train: stopped by Ctrl-C; the last complete checkpoint is ")
    checkpoints = list((tmp_path / "run/checkpoints").iterdir())
    assert checkpoints and all((c / "COMPLETE").is_file() for c in checkpoints if c.name.startswith("step-"))


def test_a_checkpoint_that_cannot_be_written_is_a_clear_error_and_the_previous_one_is_intact(tmp_path, monkeypatch):
    import errno

    import diffusion.training.run_output as training

    real = training.save_weights

    def disk_full_on_the_second_checkpoint(state, path, **kwargs):
        if "step-00000006" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(state, path, **kwargs)

    monkeypatch.setattr(training, "save_weights", disk_full_on_the_second_checkpoint)
    with pytest.raises(OSError, match=r"could not write checkpoint step-00000006 .*No space left on device.*"
                                      r"previous checkpoint .*step-00000003 is intact"):
        train(tiny(tmp_path, max_steps=6, save_every=3))
    checkpoints = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000003"]  # no half-written folder left
    monkeypatch.undo()  # space again
    resumed = train(tiny(tmp_path, max_steps=6, save_every=3, resume="auto"))  # and it resumes from it
    assert resumed.step == 6


def test_an_unusable_output_dir_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="a-file/run cannot be written .*choose another --output-dir"):
        train(tiny(tmp_path, output_dir=str(blocker / "run")))


def test_missing_rng_state_needs_an_explicit_flag(tmp_path):
    train(tiny(tmp_path, max_steps=6, stop_after_steps=3, save_every=3))
    (tmp_path / "run/checkpoints/step-00000003/rng-0.safetensors").unlink()
    from diffusion.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no RNG state .*--allow-inexact-resume"):
        train(tiny(tmp_path, max_steps=6, save_every=3, resume="auto"))
    assert train(tiny(tmp_path, max_steps=6, save_every=3, resume="auto", allow_inexact_resume=True)).step == 6


def test_text_edge_cases_round_trip_and_train(tmp_path):
    from diffusion.data import build_blocks, load_texts, load_tokenizer

    documents = ["", "plain ascii", "emoji 🙂🚀 and CJK 漢字 and combining e\u0301", "\u0000\ufffd\U0010FFFF private",
                 "x" * 20000, "   ", "tabs\tand\r\nwindows lines"]
    path = tmp_path / "edge.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    tokenizer = load_tokenizer("builtin")
    for text in documents:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level BPE: every string round-trips
    texts = load_texts(str(path), valid_fraction=0.3, seed=0)
    blocks = build_blocks(texts["train"], tokenizer, 32)
    assert blocks.shape[1] == 32 and int(blocks.max()) < len(tokenizer) - 1  # no MASK id from any text
    result = train(tiny(tmp_path, dataset=str(path), max_steps=2, save_every=0, valid_fraction=0.3))
    assert result.step == 2


@pytest.mark.parametrize("objective", ["masked_elbo", "score_entropy"])
def test_all_padding_batches_give_a_finite_zero_loss(objective):
    from diffusion import DDiTConfig, DDiTModel

    parameterization = "subs" if objective == "masked_elbo" else "score"
    config = DDiTConfig(vocab_size=11, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, cond_dim=8,
                        parameterization=parameterization, time_conditioning=objective == "score_entropy")
    model = DDiTModel(config)
    objective_fn = DiffusionObjective.from_config(config, objective=objective)
    x0 = torch.randint(0, 10, (3, 8))
    out = objective_fn(model, x0, attention_mask=torch.zeros_like(x0), generator=torch.Generator().manual_seed(0))
    assert out.num_tokens == 0 and float(out.loss) == 0.0
    out.loss.backward()
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_a_failing_reward_leaves_the_rl_checkpoints_intact_and_resumable(tmp_path):
    from rl.config import GRPOConfig
    from rl.rewards import RewardError
    from rl.tasks import SortTask
    from rl.trainer import GRPOTrainer
    from tests.test_rl import _task_model

    task = SortTask(5)
    records = task.records(50, torch.Generator().manual_seed(0))
    calls = {"n": 0}

    def flaky(prompts, completions, **fields):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ConnectionError("grader offline")
        return [0.0] * len(completions)

    config = GRPOConfig(output_dir=str(tmp_path / "rl"), max_steps=4, prompts_per_step=2, group_size=2,
                        completion_length=6, sampling_steps=6, save_every=1, progress=False, variance_draws=0)
    model, tokenizer = _task_model()
    trainer = GRPOTrainer(model, tokenizer, config, [*task.reward_functions, flaky], records, [1.0, 1.0, 0.2, 1.0])
    with pytest.raises(RewardError, match="'flaky' raised ConnectionError: grader offline"):
        trainer.train()
    latest = sorted((tmp_path / "rl/checkpoints").glob("step-*"))
    assert [p.name for p in latest] == ["step-00000001", "step-00000002"] and (latest[-1] / "COMPLETE").is_file()
    model, tokenizer = _task_model()
    resumed = GRPOTrainer(model, tokenizer, dataclasses.replace(config, resume="auto"),
                          task.reward_functions, records, task.reward_weights)
    resumed.reward_functions.append(lambda prompts, completions, **f: [0.0] * len(completions))
    resumed.reward_weights.append(1.0)
    assert [m["step"] for m in resumed.train()] == [2, 3]


def test_a_pickle_offered_as_a_training_checkpoint_never_runs_and_incomplete_ones_are_reported(tmp_path, caplog):
    import logging
    import pickle

    from diffusion.training.checkpoint import CheckpointError

    train(tiny(tmp_path, max_steps=6, stop_after_steps=3, save_every=3))
    root = tmp_path / "run/checkpoints"
    (root / "step-00000005").mkdir()  # a crash mid-write: no COMPLETE marker
    marker = tmp_path / "payload-ran"
    payload = type("Payload", (), {"__reduce__": lambda self: (os.system, (f"touch {marker}",))})()
    for shard in (root / "step-00000003/state").glob("*.safetensors"):
        shard.write_bytes(pickle.dumps(payload))
    with caplog.at_level(logging.WARNING, logger="diffusion.training.checkpoint"), \
            pytest.raises(CheckpointError, match="cannot be read into this run"):
        train(tiny(tmp_path, max_steps=6, save_every=3, resume="auto"))
    assert not marker.exists()  # never unpickled
    assert "skipping incomplete checkpoint" in caplog.text and "step-00000005" in caplog.text


_TOKENIZER_CODE = """
from pathlib import Path
Path(__file__).with_name("RAN").write_text("the folder's code ran")
from transformers import PreTrainedTokenizerFast
class MarkerTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _tokenizer_with_code(folder: Path) -> Path:
    """The built-in tokenizer plus an ``auto_map`` to a module that leaves a marker file when it is imported."""
    from diffusion.data import load_tokenizer

    load_tokenizer("builtin").save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": [None, "marker_tok.MarkerTokenizer"]}, tokenizer_class="MarkerTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "marker_tok.py").write_text(_TOKENIZER_CODE)
    return folder


def test_tokenizer_code_never_runs_without_the_flag_even_when_stdin_answers_yes(tmp_path):
    from diffusion import DDiTConfig, DDiTModel

    tokenizer_dir = _tokenizer_with_code(tmp_path / "tok")
    model_dir = _tokenizer_with_code(tmp_path / "model")
    DDiTModel(DDiTConfig(vocab_size=4097, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, cond_dim=8,
                         max_position_embeddings=32, mask_token_id=4096)).save_pretrained(model_dir)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    commands = {
        "ddlm-train": ["samplers.cli.train", "--output-dir", str(tmp_path / "run"), "--tokenizer", str(tokenizer_dir),
                       "--max-steps", "1", "--precision", "no"],
        "ddlm-generate": ["samplers.cli.generate", "--model", str(model_dir), "--length", "4"],
        "ddlm-eval": ["samplers.cli.evaluate", "ppl", "--model", str(model_dir), "--dataset", "builtin:shakespeare"],
    }
    for name, args in commands.items():
        result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, input="y\ny\n", text=True,
                                capture_output=True, timeout=120)
        err = result.stderr.strip()
        assert result.returncode == 2, (name, err[-2000:])
        assert "needs its own code" in err.splitlines()[-1] and "Traceback" not in err, (name, err[-2000:])
        for folder in (tokenizer_dir, model_dir):
            assert not (folder / "RAN").exists(), name


def test_a_fresh_run_into_a_used_folder_is_refused_and_a_refused_resume_changes_nothing(tmp_path):
    import hashlib

    def digest(folder: Path) -> dict[str, str]:
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    train(tiny(tmp_path, max_steps=2, save_every=1))
    before = digest(tmp_path / "run")
    with pytest.raises(ValueError, match="already holds a run .*--resume auto.*--overwrite true"):
        train(tiny(tmp_path, max_steps=2, save_every=1))
    with pytest.raises(CheckpointError, match="seq_len: checkpoint 32 vs run 48"):  # another configuration
        train(tiny(tmp_path, max_steps=2, save_every=1, seq_len=48, resume="auto"))
    assert digest(tmp_path / "run") == before  # nothing rewritten, train_config.json included
    result = train(tiny(tmp_path, max_steps=3, save_every=1, overwrite=True))
    assert result.step == 3
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == [
        "step-00000001", "step-00000002", "step-00000003"]
    assert [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)][:1] == [1]  # the old metrics went with the old run


def test_a_second_run_into_a_locked_folder_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    from diffusion.training.run_folder import LOCK_FILE

    folder = tmp_path / "run"
    folder.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": __import__("socket").gethostname(),
                                                    "started": "now"}))
        with pytest.raises(ValueError, match=f"is in use by process {sleeper.pid}"):
            train(tiny(tmp_path, max_steps=1, warmup_steps=0))
        assert not (folder / "checkpoints").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert train(tiny(tmp_path, max_steps=1, warmup_steps=0)).step == 1  # its process is gone: the lock is stale
    assert not (folder / LOCK_FILE).exists()  # released at the end
