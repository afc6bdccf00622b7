"""README's main job: one line of the form README promises, and deterministic for a seed on one machine.

The command is read from README.md itself.  Two runs of its ``ddlm-train`` arguments (shortened the way
tests/test_readme.py shortens every training command, argparse keeping the last value of a flag), each in a fresh
process, must print the same held-out losses and samples and write byte-identical weights.
"""

import os
import re
import shlex
import subprocess
import sys

from tests.test_readme import README, TRAIN_SHORT

SETUP = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e . && "


def _main_job() -> str:
    section = README.split("## The two commands", 1)[1]
    first_block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = first_block.strip().splitlines()
    assert len(lines) == 1, f"the main job must be one line, got {len(lines)}"
    return lines[0]


def test_the_main_job_is_one_line_that_sets_up_then_trains_and_samples():
    line = _main_job()
    assert line.startswith(SETUP) and line[len(SETUP):].startswith("ddlm-train ")
    argv = shlex.split(line[len(SETUP):])
    assert "--num-samples" in argv and "--output-dir" in argv  # it samples after training, into its own folder


def test_the_main_job_is_deterministic_for_a_seed(tmp_path):
    argv = shlex.split(_main_job()[len(SETUP):])[1:] + shlex.split(TRAIN_SHORT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    outputs = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        proc = subprocess.run([sys.executable, "-m", "samplers.cli.train", *argv], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        run = folder / argv[argv.index("--output-dir") + 1]
        outputs.append((proc.stdout, (run / "final" / "model.safetensors").read_bytes()))
    (out_a, weights_a), (out_b, weights_b) = outputs
    assert weights_a == weights_b
    losses = re.findall(r"held-out loss [0-9.]+ nats/token", out_a)
    assert len(losses) >= 2 and losses == re.findall(r"held-out loss [0-9.]+ nats/token", out_b)
    assert "--- sample 1 ---" in out_a
    assert out_a.split("--- sample 1 ---", 1)[1] == out_b.split("--- sample 1 ---", 1)[1]  # the printed samples
