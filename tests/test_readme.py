"""README.md is a tested document: every ```bash command and ```python snippet in it runs here, in order.

They run in one scratch folder, as a reader would run them one after the other, with the changes in
:data:`SUBSTITUTIONS` (which README states under "What the tests check"): the setup prefix goes (CI has just
installed the environment), and flags that would take minutes are shortened by appending smaller values
(argparse keeps the last).  The Hub is a fake one on 127.0.0.1 (``tests/fake_hub.py``) that holds a tiny
LLaDA stand-in under ``GSAI-ML/LLaDA-8B-Instruct``; ``my_texts/`` is written here, three plays of the built-in
corpus.  ```text blocks are output and are not run; no other fence is allowed.

A plain command (a ``ddlm-*`` console script or ``python FILE``, no shell syntax) runs in a fork of one process
that imported the toolkit once (``tests/command_server.py``): the same entry point, arguments, folder and
environment, without paying 3-5 s of imports per command.  Everything else runs under ``bash -c``.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

TRAIN_SHORT = ("--max-steps 6 --warmup-steps 2 --save-every 3 --eval-every 3 --eval-blocks 8 --eval-batch-size 8 --batch-size 4 "
               "--hidden-size 32 --num-layers 1 --num-heads 2 --num-samples 1 --sampling-steps 4 --progress false")
RL_SHORT = ("--max-steps 2 --sft-steps 2 --eval-prompts 8 --prompts-per-step 2 --group-size 2 --variance-draws 0 "
            "--progress false")

# (pattern, replacement, why); applied in order to every command line and snippet.
SUBSTITUTIONS = [
    (r"^python3 -m venv \.venv && \. \.venv/bin/activate && pip install torch==2\.13\.0 && pip install -e \. && ", "",
     "the environment is already installed (CI ran the setup)"),
    (r"^(ddlm-train .*|(accelerate launch|torchrun) .*scripts/train\.py.*)$", rf"\1 {TRAIN_SHORT}",
     "training runs 6 steps (2 of warm-up) of a 32-wide, 1-block model on 4 blocks a process"),
    (r"step-00001000", "step-00000006", "checkpoint names follow the shortened --max-steps"),
    (r"^(ddlm-rl .*|torchrun .*scripts/grpo\.py.*)$", rf"\1 {RL_SHORT}",
     "RL runs 2 steps of 2 x 2 rollouts after a 2-step warm-up"),
    (r"^(ddlm-dpo .*)$", r"\1 --max-steps 2 --sft-steps 2 --eval-pairs 4 --pairs-per-step 2 --progress false",
     "DPO runs 2 steps of 2 pairs after a 2-step warm-up"),
    (r"^(ddlm-sft .*)$", r"\1 --max-steps 2 --save-every 1 --progress false", "SFT runs 2 steps"),
    (r"^(ddlm-eval ppl .*)$", r"\1 --max-blocks 4 --num-points 2", "4 held-out blocks, 2 time points"),
    (r"^(ddlm-eval genppl .*)$", r"\1 --num-samples 2 --sampling-steps 4", "2 samples of 4 steps"),
    (r"^(ddlm-eval calls .*)$", r"\1 --num-samples 2 --calls 2 4", "ddlm-eval calls: 2 samples at budgets 2 and 4"),
    (r"--any-order 16", "--any-order 1", "one order for the any-order curve"),
    (r"^(python scripts/\S+\.py.*)$", r"\1 --smoke", "benchmarks at toy sizes (--smoke)"),
    (r"max_steps=\d+", "max_steps=2", "Python snippets: 2 RL steps"),
    (r"^(ddlm-lm-eval .*)$", r"\1 --limit 2", "lm-eval: 2 items per task"),
]
NOT_RUN = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e \".[dev]\" && "
    "python -m pytest -q": "the test command itself: CI runs it, and it contains this test",
    "ddlm-demo runs/shakespeare/final    # then open http://127.0.0.1:7860; needs Gradio: pip install -e \".[demo]\"":
        "the demo server, which serves until stopped: tests/test_demo.py drives it in headless Chromium",
}


def _blocks(text: str) -> list[tuple[int, str, str]]:
    """``(line, language, code)`` of every fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = re.match(r"^```(\S*)\s*$", lines[i])
        if match:
            start, language, body = i + 1, match.group(1), []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append((start, language, "\n".join(body) + "\n"))
        i += 1
    return blocks


BLOCKS = _blocks(README)
RUNNABLE = [b for b in BLOCKS if b[1] in ("bash", "python")]


def _substitute(code: str) -> str:
    code = re.sub(r"\s{2,}#.*$", "", code, flags=re.MULTILINE)  # end-of-line comments, so flags append to the command
    for pattern, replacement, _ in SUBSTITUTIONS:
        code = re.sub(pattern, replacement, code, flags=re.MULTILINE)
    return code


def test_every_block_is_bash_python_or_text_and_the_substitutions_are_stated():
    assert {language for _, language, _ in BLOCKS} <= {"bash", "python", "text"}, \
        [(line, language) for line, language, _ in BLOCKS if language not in ("bash", "python", "text")]
    assert len(RUNNABLE) >= 15
    stated = README.split("## What the tests check", 1)[1]
    for _, _, why in SUBSTITUTIONS:
        assert why in stated, f"README does not state the substitution: {why}"
    for command, why in NOT_RUN.items():
        assert command in README and why in stated


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """The reader's folder, a fake Hub with the LLaDA stand-in, and the environment the commands run in."""
    sys.path.insert(0, str(REPO / "tests"))
    from fake_hub import FakeHub

    from tests.test_adapters import _save_remote

    folder = tmp_path_factory.mktemp("readme")
    (folder / "scripts").symlink_to(REPO / "scripts")
    plays = (REPO / "diffusion/data/shakespeare/train.txt").read_text().split("\f")[:3]
    (folder / "my_texts").mkdir()
    for i, play in enumerate(plays):
        (folder / "my_texts" / f"play{i}.txt").write_text(play[:20000])
    stand_in = _save_remote(tmp_path_factory.mktemp("llada"), "llada")
    from command_server import CommandServer

    with FakeHub() as hub:
        hub.put("GSAI-ML/LLaDA-8B-Instruct", {p.name: p.read_bytes() for p in stand_in.iterdir() if p.is_file()})
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
        env.update(HF_ENDPOINT=hub.endpoint, HF_TOKEN="hf_fake_token", HF_HOME=str(folder / ".hf-home"),
                   HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
        server = CommandServer(env, tmp_path_factory.mktemp("commands"))
        try:
            yield folder, env, server
        finally:
            server.close()


def _command(line: str, server) -> list[str]:
    """argv for the command server when ``line`` is one plain command it runs, else ``bash -c line``."""
    if not re.search(r"[|&;<>$`*?(){}\\]", line):
        argv = shlex.split(line)
        if argv and server.runs(argv):
            return argv
    return ["bash", "-c", line]


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"line{line}-{language}" for line, language, _ in RUNNABLE])
def test_readme_block_runs_as_written(scratch, block):
    folder, env, server = scratch
    line, language, code = block
    if language == "python":
        script = folder / f"readme_line{line}.py"
        script.write_text(_substitute(code))
        commands = [["python", str(script)]]
    else:
        commands = [_command(_substitute(command), server) for command in code.splitlines()
                    if command.strip() and not command.lstrip().startswith("#") and command not in NOT_RUN]
    for command in commands:
        if server.runs(command):
            result = server.run(command, folder, timeout=300)
        else:
            result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (f"README line {line}: {command[-1][:300]}\n--- stdout\n{result.stdout[-2000:]}"
                                        f"\n--- stderr\n{result.stderr[-3000:]}")
