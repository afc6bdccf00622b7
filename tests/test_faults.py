"""Faults injected from outside the toolkit (real files, real command lines): every expected one ends in one line
naming the file or value, exit 2 (1 for a run that could not finish), and leaves what was on disk as it was."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion import DDiTModel
from diffusion.cli.push import main as push_main
from diffusion.cli.sft import main as sft_main
from diffusion.cli.convert import main as convert_main
from rl.cli import main as rl_main
from samplers.cli.evaluate import main as eval_main
from samplers.cli.generate import main as generate_main
from samplers.cli.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["--seq-len", "32", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--cond-dim", "16",
              "--batch-size", "4", "--max-steps", "2", "--warmup-steps", "0", "--eval-every", "0", "--eval-blocks", "4",
              "--precision", "no", "--progress", "false", "--num-samples", "0", "--max-position-embeddings", "64"]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), err
    return last


# ----- every command: a missing path is a missing file, in one line, and nothing is created --------------------------

COMMANDS = {
    "generate": (generate_main, "ddlm-generate", ["--model", "runs/nope/final"]),
    "eval": (eval_main, "ddlm-eval", ["ppl", "--model", "runs/nope/final"]),
    "push": (push_main, "ddlm-push", ["runs/nope/final", "--out", "out", "--dry-run"]),
    "sft": (sft_main, "ddlm-sft", ["--model", "runs/nope/final", "--output-dir", "out"]),
    "convert": (convert_main, "ddlm-convert", ["--model", "runs/nope/final", "--output-dir", "out"]),
    "rl": (rl_main, "ddlm-rl", ["--model", "runs/nope/final", "--output-dir", "out"]),
    "train --dataset": (train_main, "ddlm-train", ["--dataset", "mine.txt", "--output-dir", "out", *TINY_TRAIN]),
    "train --data dir": (train_main, "ddlm-train", ["--dataset", "data/rows.jsonl", "--output-dir", "out", *TINY_TRAIN]),
    "train --tokenizer": (train_main, "ddlm-train", ["--tokenizer", "tok/", "--output-dir", "out", *TINY_TRAIN]),
    "train --init-from": (train_main, "ddlm-train", ["--init-from", "runs/nope/final", "--output-dir", "out",
                                                     *TINY_TRAIN]),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_missing_relative_path_is_a_missing_file_in_one_line_for_every_command(name, tmp_path, monkeypatch, capsys):
    main, prog, argv = COMMANDS[name]
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    line = one_line_error(capsys, prog)
    missing = next(a for a in argv if "nope" in a or a in ("mine.txt", "data/rows.jsonl", "tok/"))
    assert missing in line and ("does not exist" in line or "no such" in line.lower()), line
    assert "huggingface.co" not in line and "Hub" not in line  # never sent to the Hub
    assert not (tmp_path / "out").exists()  # nothing created


def test_debug_shows_the_traceback_that_one_line_replaces(tmp_path, capsys):
    assert generate_main(["--model", str(tmp_path / "nope")]) == 2  # without --debug: the one line
    assert one_line_error(capsys, "ddlm-generate").endswith(f"--model folder does not exist: '{tmp_path / 'nope'}'")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    debug = subprocess.run([sys.executable, "-m", "samplers.cli.generate", "--model", str(tmp_path / "nope"),
                            "--debug"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("FileNotFoundError: --model folder does not exist")


# ----- a user's rows ---------------------------------------------------------------------------------------------------

GOOD = {"text": "Now is the winter of our discontent made glorious summer by this sun of York. " * 3}
ROW_FAULTS = {  # name: (lines of the file, what the one line must say)
    "missing field": ([GOOD, GOOD, {"body": "x"}, GOOD], ["rows.jsonl: row 3 has no 'text' field", "['body']"]),
    "null text": ([GOOD, {"text": None}, GOOD], ["rows.jsonl: row 2: field 'text' is null"]),
    "number text": ([GOOD, GOOD, GOOD, {"text": 7}], ["rows.jsonl: row 4: field 'text' is int"]),
    "not an object": ([GOOD, ["a", "b"]], ["rows.jsonl: row 2 is a JSON list"]),
    "malformed line": ([GOOD, GOOD, '{"text": "unterminated', GOOD], ["rows.jsonl: line 3 is not valid JSON"]),
    "empty file": ([], ["rows.jsonl holds no rows"]),
    "shorter than a block": ([{"text": "hi"}, {"text": "there"}, {"text": "you"}],
                             ["training split of dataset=", "fewer than one block of seq_len=32"]),
    "held-out shorter than a block": ([{"text": "a short line"}] * 60, ["held-out split of dataset=",
                                                                      "valid_fraction=0.02", "fewer than one block"]),
}


@pytest.mark.parametrize("fault", sorted(ROW_FAULTS))
def test_bad_rows_are_refused_naming_file_row_and_field(fault, tmp_path, monkeypatch, capsys):
    lines, expected = ROW_FAULTS[fault]
    monkeypatch.chdir(tmp_path)
    Path("rows.jsonl").write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                                          for line in lines))
    assert train_main(["--dataset", "rows.jsonl", "--output-dir", "out", *TINY_TRAIN]) == 2
    line = one_line_error(capsys, "ddlm-train")
    assert all(text in line for text in expected), line
    assert not Path("out").exists()  # the run folder it would have made is gone again


def test_a_good_jsonl_file_with_a_json_array_twin_trains(tmp_path, monkeypatch, capsys):
    """The same rows as .jsonl and as a .json array: one set of documents, and a run trains on them."""
    from diffusion.data.loading import load_documents

    monkeypatch.chdir(tmp_path)
    rows = [{"text": f"{GOOD['text']} {i}", "id": i} for i in range(40)]
    Path("rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Path("rows.json").write_text(json.dumps(rows))
    assert load_documents("rows.jsonl") == load_documents("rows.json") == [r["text"] for r in rows]
    assert train_main(["--dataset", "rows.jsonl", "--output-dir", "out", "--valid-fraction", "0.2", *TINY_TRAIN]) == 0
    assert "data: rows.jsonl: 40 documents, held out 8" in capsys.readouterr().out


# ----- model folders whose files do not belong together ----------------------------------------------------------------

def _broken(model_dir: Path, tmp_path: Path, fault: str) -> Path:
    folder = tmp_path / f"model-{fault}"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    weights = folder / "model.safetensors"
    if fault == "bert config":
        config.update(model_type="bert", architectures=["BertForMaskedLM"])
    elif fault == "wider config":
        config.update(hidden_size=2 * config["hidden_size"])
    elif fault == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif fault == "nan weights":
        from safetensors.torch import load_file, save_file

        state = load_file(str(weights))
        state["blocks.0.qkv.weight"][0, 0] = float("nan")
        save_file(state, str(weights), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


MODEL_FAULTS = {"bert config": "does not describe its weights", "wider config": "do not match config.json",
                "truncated weights": "corrupt or truncated", "nan weights": "hold NaN or infinite values"}


@pytest.mark.parametrize("fault", sorted(MODEL_FAULTS))
def test_a_model_folder_whose_config_and_weights_disagree_is_refused_by_generate_eval_and_init_from(
        fault, model_dir, tmp_path, monkeypatch, capsys):
    folder = _broken(model_dir, tmp_path, fault)
    before = digest(folder)
    monkeypatch.chdir(tmp_path)
    for main, prog, argv in (
        (generate_main, "ddlm-generate", ["--model", str(folder), "--length", "4"]),
        (eval_main, "ddlm-eval", ["ppl", "--model", str(folder), "--dataset", "builtin:shakespeare", "--max-blocks", "2"]),
        (train_main, "ddlm-train", ["--init-from", str(folder), "--output-dir", "out", *TINY_TRAIN]),
    ):
        assert main(argv) == 2, prog
        line = one_line_error(capsys, prog)
        # --init-from refuses a BERT config earlier: it is no model a run can start from
        expected = "it needs a causal LM" if (prog, fault) == ("ddlm-train", "bert config") else MODEL_FAULTS[fault]
        assert folder.name in line and expected in line, line
    assert digest(folder) == before and not (tmp_path / "out").exists()


def test_push_refuses_a_folder_that_is_not_a_ddit_export(model_dir, tmp_path, capsys):
    folder = _broken(model_dir, tmp_path, "bert config")
    assert push_main([str(folder), "--out", str(tmp_path / "hub"), "--dry-run"]) == 2
    line = one_line_error(capsys, "ddlm-push")
    assert "is a 'bert' model, not a ddit model or a ddlm-convert folder" in line
    assert not (tmp_path / "hub").exists()
    assert push_main([str(model_dir), "--out", str(tmp_path / "hub"), "--dry-run"]) == 0  # a ddit folder still goes


# ----- many samples in bounded memory ----------------------------------------------------------------------------------

def test_generation_in_batches_repeats_under_one_seed_and_one_batch_is_one_sampler_call(model_dir, capsys):
    from samplers import get_sampler

    def samples(*argv: str) -> tuple[list[list[int]], int]:
        assert generate_main(["--model", str(model_dir), "--length", "6", "--sampling-steps", "6", "--json", *argv]) == 0
        out = json.loads(capsys.readouterr().out)
        return [s["tokens"] for s in out["samples"]], out["nfe"]

    model = DDiTModel.from_pretrained(model_dir).eval()
    sampler, generator = get_sampler("ancestral"), torch.Generator().manual_seed(0)
    calls = [sampler.generate(model, batch_size=size, length=6, num_steps=6, generator=generator) for size in (2, 2, 1)]
    batched, nfe = samples("--num-samples", "5", "--batch-size", "2")
    assert batched == [row for out in calls for row in out.tokens.tolist()]  # three calls on one seeded stream
    assert nfe == sum(out.nfe for out in calls)
    assert samples("--num-samples", "5", "--batch-size", "2") == (batched, nfe)  # the same seed, the same samples
    whole, _ = samples("--num-samples", "5", "--batch-size", "64")
    direct = sampler.generate(model, batch_size=5, length=6, num_steps=6, generator=torch.Generator().manual_seed(0))
    assert whole == direct.tokens.tolist()  # one batch: exactly the sampler's own call


def test_a_bad_batch_size_is_refused_before_loading(capsys):
    assert generate_main(["--model", "runs/nope", "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1, got 0" in one_line_error(capsys, "ddlm-generate")


# ----- rewards ---------------------------------------------------------------------------------------------------------

def test_rewards_whose_statistics_would_overflow_are_refused_naming_the_function():
    from rl.objective import group_advantages
    from rl.rewards import MAX_REWARD, RewardError, compute_rewards

    def huge(prompts, completions, **kwargs):
        return [1e308, -1e308, 0.0, 1.0][: len(completions)]

    # What the refusal prevents: the group's spread overflows float64 to infinity, so four different rewards get
    # advantage 0 each: no learning signal, and no error.
    assert (group_advantages(torch.tensor([1e308, -1e308, 0.0, 1.0], dtype=torch.float64), 4) == 0).all()
    with pytest.raises(RewardError, match=r"reward function 'huge' returned 1e\+308 for completion 0 .*at most 1e\+100"):
        compute_rewards([huge], [1.0], ["p"] * 4, ["c"] * 4)

    def fine(prompts, completions, **kwargs):
        return [MAX_REWARD / 10] * len(completions)

    with pytest.raises(RewardError, match="'fine' returned .* \\(weight 100.0\\)"):  # too big once weighted
        compute_rewards([fine], [100.0], ["p"] * 2, ["c"] * 2)
    total, _ = compute_rewards([fine], [1.0], ["p"] * 2, ["c"] * 2)
    assert torch.isfinite(group_advantages(total, 2)).all()
    for weight in (math.inf, math.nan, 1e300):
        with pytest.raises(ValueError, match="the weight of reward function 'fine' must be finite"):
            compute_rewards([fine], [weight], ["p"], ["c"])


def test_an_infinite_reward_weight_is_refused_by_ddlm_rl_before_any_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text("def one(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rl_main(["--reward", "my_rewards:one", "--reward-weight", "inf", "--output-dir", "out"]) == 2
    assert "the weight of reward function 'one' must be finite" in one_line_error(capsys, "ddlm-rl")


# ----- run folders: probe-written up front, run ids in every checkpoint, weights checked before they are written -------

def _make_immutable(path: Path) -> bool:
    """Make ``path`` unwritable even for root (``chattr +i``); plain permissions for anyone else."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return False
    subprocess.run(["chattr", "+i", str(path)], check=True)
    return True


def _undo_immutable(path: Path, chattr: bool) -> None:
    if chattr:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o755)


def test_an_unwritable_checkpoint_folder_is_found_before_any_compute(tmp_path, monkeypatch, capsys):
    from diffusion.training import loop

    monkeypatch.chdir(tmp_path)
    assert train_main(["--output-dir", "run", "--save-every", "1", *TINY_TRAIN]) == 0
    capsys.readouterr()
    before = digest(tmp_path / "run")
    monkeypatch.setattr(loop, "load_run_data", lambda *a, **k: pytest.fail("data were read: compute began"))
    checkpoints = tmp_path / "run" / "checkpoints"
    chattr = _make_immutable(checkpoints)
    try:
        assert train_main(["--output-dir", "run", "--resume", "auto", *TINY_TRAIN, "--max-steps", "4"]) == 2
    finally:
        _undo_immutable(checkpoints, chattr)
    assert "run/checkpoints cannot be written" in one_line_error(capsys, "ddlm-train")
    shutil.rmtree(tmp_path / "other", ignore_errors=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "checkpoints").write_text("a file where the checkpoints go")
    assert train_main(["--output-dir", "other", *TINY_TRAIN]) == 2
    assert "other/checkpoints is a file, not a folder" in one_line_error(capsys, "ddlm-train")
    assert digest(tmp_path / "run") == before


def test_every_checkpoint_file_names_its_run_and_a_mixed_checkpoint_is_refused(tmp_path, monkeypatch, capsys):
    from safetensors import safe_open

    from diffusion.training.checkpoint import checkpoint_run_id

    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):  # two runs of one configuration, stopped after step 2 of 4
        assert train_main(["--output-dir", name, "--save-every", "1", *TINY_TRAIN, "--max-steps", "4",
                           "--stop-after-steps", "2"]) == 0
    step2 = tmp_path / "a/checkpoints/step-00000002"
    run_a = checkpoint_run_id(step2)
    assert run_a and run_a != checkpoint_run_id(tmp_path / "b/checkpoints/step-00000002")  # two runs, two ids
    with safe_open(str(step2 / "rng-0.safetensors"), framework="pt") as f:
        assert f.metadata()["run_id"] == run_a
    assert (step2 / "COMPLETE").read_text() == f"run {run_a}\n"
    assert train_main(["--output-dir", "a", "--resume", "auto", "--save-every", "1", *TINY_TRAIN,
                       "--max-steps", "4", "--stop-after-steps", "3"]) == 0
    assert checkpoint_run_id(tmp_path / "a/checkpoints/step-00000003") == run_a  # a resumed run keeps its id
    capsys.readouterr()
    # Another run's file in the newest checkpoint: refused, and nothing in the folder changes.
    shutil.copyfile(tmp_path / "b/checkpoints/step-00000002/trainer_state.json",
                    tmp_path / "a/checkpoints/step-00000003/trainer_state.json")
    before = digest(tmp_path / "a")
    assert train_main(["--output-dir", "a", "--resume", "auto", *TINY_TRAIN, "--max-steps", "4"]) == 2
    line = one_line_error(capsys, "ddlm-train")
    assert "step-00000003 mixes the files of different runs" in line and f"COMPLETE: {run_a}" in line
    assert digest(tmp_path / "a") == before


def test_weights_that_become_non_finite_stop_the_run_before_they_are_written(tmp_path, monkeypatch, capsys):
    from diffusion.training import loop

    original = loop._optimizer_step
    steps = {"n": 0}

    def step_then_poison(state, *args, **kwargs):
        out = original(state, *args, **kwargs)
        steps["n"] += 1
        if steps["n"] == 3:  # the third update leaves an infinite weight behind
            with torch.no_grad():
                next(state.model.parameters()).view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(loop, "_optimizer_step", step_then_poison)
    monkeypatch.chdir(tmp_path)
    assert train_main(["--output-dir", "run", "--save-every", "2", *TINY_TRAIN, "--max-steps", "4"]) == 1
    line = one_line_error(capsys, "ddlm-train")
    assert "the weights hold NaN or infinite values at step 4" in line and "step-00000002" in line
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step-00000002"]
    assert not (tmp_path / "run/final").exists()
