"""ddlm-generate as a user runs it: a subprocess on a tiny saved model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion import DDiTConfig, DDiTModel
from diffusion.data import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = load_tokenizer("builtin")
    torch.manual_seed(0)
    DDiTModel(DDiTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         cond_dim=16, max_position_embeddings=32)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _run(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "samplers.cli.generate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_text_and_json_output(model_dir):
    text = _run("--model", str(model_dir), "--prompt", "To be", "--length", "8", "--sampling-steps", "8", "--num-samples", "2")
    assert text.returncode == 0, text.stderr
    assert text.stdout.count("--- sample") == 2 and "8 steps" in text.stdout
    assert "\033[" not in text.stdout  # no live view when stdout is not a terminal
    result = _run("--model", str(model_dir), "--prompt", "To be", "--suffix", "fair.", "--length", "8",
                  "--sampling-steps", "8", "--sampler", "remask", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["sampler"] == "remask" and data["nfe"] == 8
    sample = data["samples"][0]
    assert sample["text"].startswith("To be") and sample["text"].endswith(" fair.")  # the suffix is a word
    tokenizer = load_tokenizer(str(model_dir))
    prefix, suffix = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("To be", " fair."))
    assert sample["tokens"][: len(prefix)] == prefix and sample["tokens"][-len(suffix):] == suffix
    assert len(sample["tokens"]) == len(prefix) + 8 + len(suffix)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "   "], "--prompt is empty"),
        (["--length", "40"], "beyond the model's context of 32"),
        (["--sampling-steps", "0"], "--sampling-steps must be >= 1"),
        (["--sampler", "beam"], "invalid choice: 'beam'"),
        (["--temperature", "-1"], "temperature must be >= 0 and finite, got temperature=-1.0"),
        (["--temperature", "inf"], "temperature must be >= 0 and finite, got temperature=inf"),
        (["--top-p", "1.5"], "top_p must be in (0, 1], got top_p=1.5"),
        (["--top-k", "0"], "top_k must be a positive int"),
        (["--block-length", "0"], "--block-length must be >= 1, got 0"),
        (["--sampler", "remask", "--block-length", "2", "--length", "8", "--sampling-steps", "3"],
         "must be at least the number of blocks to decode (4"),
        (["--sampler", "ancestral", "--threshold", "0.5"], "does not take ['threshold']"),
        (["--sampler", "euler", "--temperature", "0.5"], "does not take ['temperature']"),
    ],
)
def test_bad_input_is_one_line_error(model_dir, args, message, capsys):
    # In-process for speed (each subprocess pays ~8 s of imports); the subprocess path is tested below.
    from samplers.cli.generate import main

    try:
        code = main(["--model", str(model_dir), *args])
    except SystemExit as exit_:  # errors argparse itself finds (an unknown choice)
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_input_exits_non_zero_without_traceback_as_a_subprocess(model_dir):
    result = _run("--model", str(model_dir), "--sampling-steps", "0")
    assert result.returncode == 2 and result.stderr.strip() == "ddlm-generate: error: --sampling-steps must be >= 1, got 0"


def test_missing_model_is_a_clear_error(capsys):
    from samplers.cli.generate import main

    assert main(["--model", "./no/such/model"]) == 2
    assert "--model folder does not exist" in capsys.readouterr().err
    assert main(["--model", "someone/not-a-real-model"]) == 2  # HF_HUB_OFFLINE=1: the Hub is not reachable
    err = capsys.readouterr().err
    assert "could not load --model" in err and "Traceback" not in err


def test_an_exported_models_sampler_config_sets_the_defaults_and_flags_override_it(model_dir, tmp_path, capsys):
    import shutil

    from samplers.cli.generate import main

    folder = tmp_path / "exported"
    shutil.copytree(model_dir, folder)
    (folder / "sampler_config.json").write_text(json.dumps({"sampler": "remask", "num_steps": 4}))
    assert main(["--model", str(folder), "--length", "8", "--json"]) == 0
    shipped = json.loads(capsys.readouterr().out)
    assert (shipped["sampler"], shipped["sampling_steps"], shipped["nfe"]) == ("remask", 4, 4)
    assert main(["--model", str(folder), "--length", "8", "--sampler", "ancestral", "--sampling-steps", "8",
                 "--json"]) == 0
    overridden = json.loads(capsys.readouterr().out)
    assert (overridden["sampler"], overridden["sampling_steps"]) == ("ancestral", 8)
    assert main(["--model", str(model_dir), "--length", "8", "--json"]) == 0  # no file: the model's defaults
    plain = json.loads(capsys.readouterr().out)
    assert (plain["sampler"], plain["sampling_steps"]) == ("ancestral", 64)
    (folder / "sampler_config.json").write_text('{"sampler": "remask"}')
    assert main(["--model", str(folder), "--length", "8"]) == 2
    assert "sampler_config.json must hold" in capsys.readouterr().err


def _fake_run(root: Path, model_dir: Path) -> Path:
    """A ddlm-train run folder as it lies on disk: train_config.json, checkpoints/step-*, final/."""
    import shutil

    run = root / "run"
    (run / "checkpoints" / "step-00000004" / "model").mkdir(parents=True)
    (run / "train_config.json").write_text("{}")
    (run / "checkpoints" / "step-00000004" / "trainer_state.json").write_text("{}")
    shutil.copytree(model_dir, run / "final")
    return run


@pytest.mark.parametrize("case, message", [
    ("typo", "--model folder does not exist: '{root}/run/fnal'"),
    ("file", "--model '{root}/run/train_config.json' is a file, not a model folder"),
    ("run", "--model '{root}/run' is a training run folder: its model is '{root}/run/final'"),
    ("checkpoint", "--model '{root}/run/checkpoints/step-00000004' is a training checkpoint, not a model folder: "
                   "pass the run's final model '{root}/run/final'"),
    ("relative", "--model folder does not exist: 'runs/shakespear/final'"),
])
def test_model_paths_that_are_not_model_folders_are_one_line_errors(model_dir, tmp_path, capsys, case, message):
    from samplers.cli.generate import main

    run = _fake_run(tmp_path, model_dir)
    given = {"typo": run / "fnal", "file": run / "train_config.json", "run": run,
             "checkpoint": run / "checkpoints" / "step-00000004", "relative": "runs/shakespear/final"}[case]
    assert main(["--model", str(given), "--length", "4"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert message.format(root=tmp_path) in err, err


def test_a_causal_lm_given_where_a_denoiser_is_needed_says_what_it_is_and_what_takes_it(tmp_path, capsys):
    from diffusion.evaluation.autoregressive import build_causal_lm
    from rl.cli import main

    tokenizer = load_tokenizer("builtin")
    build_causal_lm(vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, max_positions=32
                    ).save_pretrained(tmp_path / "ar")
    tokenizer.save_pretrained(tmp_path / "ar")
    assert main(["--model", str(tmp_path / "ar"), "--output-dir", str(tmp_path / "rl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after "ddlm-rl: writing to ..."
    assert err.startswith("ddlm-rl: error: ")
    assert "is a LlamaForCausalLM (a causal LM), which cannot denoise" in err
    assert "ddlm-generate samples it and ddlm-eval ppl scores it" in err


def test_a_canvas_longer_than_the_training_blocks_warns(tmp_path, capsys):
    from samplers.cli.generate import main

    tokenizer = load_tokenizer("builtin")
    torch.manual_seed(0)
    DDiTModel(DDiTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         cond_dim=16, max_position_embeddings=64, trained_length=8)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    assert main(["--model", str(tmp_path / "m"), "--prompt", "To be", "--length", "6", "--sampling-steps", "2"]) == 0
    assert "warning" not in capsys.readouterr().err  # 2 + 6 tokens fit the 8-token blocks
    assert main(["--model", str(tmp_path / "m"), "--prompt", "To be", "--length", "12", "--sampling-steps", "2"]) == 0
    err = capsys.readouterr().err.strip()
    assert err == ("ddlm-generate: warning: the canvas (prompt, length and suffix) is 14 tokens, longer than the "
                   "8-token blocks this model was trained on; expect worse text past that length")


@pytest.fixture(scope="module")
def block_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-block-model")
    tokenizer = load_tokenizer("builtin")
    torch.manual_seed(0)
    DDiTModel(DDiTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         cond_dim=16, max_position_embeddings=64, attention_block_size=8,
                         eos_token_id=tokenizer.eos_token_id)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_max_length_stops_each_sample_at_its_own_eos_and_chat_formats_the_prompt(block_model_dir):
    result = _run("--model", str(block_model_dir), "--prompt", "To be", "--max-length", "20", "--num-samples", "3",
                  "--sampling-steps", "9", "--json")  # 9 steps shared by the blocks (the prompt ends inside the first)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["sampler"] == "block" and data["sampling_steps"] == 9
    tokenizer = load_tokenizer(str(block_model_dir))
    prefix = tokenizer("To be", add_special_tokens=False)["input_ids"]
    for sample in data["samples"]:
        tokens = sample["tokens"]
        assert tokens[: len(prefix)] == prefix and len(tokens) <= len(prefix) + 20
        generated = tokens[len(prefix):]
        assert tokenizer.eos_token_id not in generated[:-1]  # cut right after the first EOS, if any
    chat = _run("--model", str(block_model_dir), "--chat", "--prompt", "Who's there?", "--max-length", "16", "--json")
    assert chat.returncode == 0, chat.stderr
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Who's there?"}], tokenize=True,
                                             add_generation_prompt=True)["input_ids"]
    assert json.loads(chat.stdout)["samples"][0]["tokens"][: len(expected)] == list(expected)


@pytest.mark.parametrize("args, message", [
    (["--max-length", "16", "--suffix", "end"], "--max-length stops at EOS, so it cannot end at a --suffix"),
    (["--max-length", "16", "--sampler", "ancestral"], "--max-length needs a sampler that stops at EOS"),
    (["--chat"], "--chat formats --prompt as a user turn: give --prompt"),
])
def test_max_length_and_chat_misuse_is_one_line(block_model_dir, args, message):
    result = _run("--model", str(block_model_dir), *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
