"""Scale-out on two gloo ranks: FSDP2 training matches one process, resumes bit for bit after SIGKILL, consolidates to a
loadable model, survives uneven held-out data; GRPO on two ranks equals one process."""

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

from diffusion.training import TrainConfig, train
from diffusion.training.checkpoint import CheckpointError
from tests.test_training import tiny

REPO = Path(__file__).resolve().parents[1]

_TRAIN_SCRIPT = """
import json, sys
from diffusion.training import TrainConfig, train
for overrides in json.loads(sys.argv[1]):
    train(TrainConfig(**overrides))
"""

_CONSOLIDATE_SCRIPT = """
import json, sys, torch
import torch.distributed as dist
from diffusion import DDiTModel
from diffusion.training import TrainConfig
from diffusion.training.distributed import full_state
from diffusion.training.loop import _accelerator, _build, _resume
from diffusion.data import load_tokenizer
from samplers import get_sampler
config = TrainConfig(**json.loads(sys.argv[1]))
acc, mode = _accelerator(config)
state = _build(config, load_tokenizer("builtin"), mode, acc)
_resume(__import__("pathlib").Path(sys.argv[2]), state, config, acc)
gathered = full_state(state.model.state_dict())  # the weights gathered in memory, on every rank
if acc.is_main_process:
    model = DDiTModel(state.model.config)
    model.load_state_dict(gathered, strict=False)
    tokens = get_sampler("ancestral").generate(model.eval(), batch_size=2, length=16, num_steps=8,
                                               generator=torch.Generator().manual_seed(5)).tokens.tolist()
    json.dump(tokens, open(sys.argv[3], "w"))
dist.barrier()
acc.end_training()  # destroys the process group on both ranks: a gloo group left to exit can abort the process
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _torchrun(script: Path, *args: str, port: int, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(script), *args]
    return subprocess.run(command, cwd=script.parent, env=_env(), capture_output=True, text=True, timeout=timeout)


def _fsdp(tmp_path: Path, name: str, **overrides) -> dict:
    base = tiny(tmp_path, max_steps=4, save_every=4, ema_decay=0.9, eval_every=2, eval_blocks=24, eval_batch_size=8,
                log_every=1).to_dict()
    return {**base, "output_dir": str(tmp_path / name), **overrides}


def _weights(checkpoint: Path, sub: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / sub / "model.safetensors"))


@pytest.mark.parametrize("objective", ["masked_elbo", "score_entropy"])
def test_fsdp_on_two_ranks_matches_one_process_with_the_doubled_batch(tmp_path, objective):
    parameterization = {"parameterization": "score"} if objective == "score_entropy" else {}
    two = _fsdp(tmp_path, "fsdp", objective=objective, distributed="fsdp", batch_size=4, **parameterization)
    one = _fsdp(tmp_path, "one", objective=objective, batch_size=8, **parameterization)
    script = tmp_path / "train.py"
    script.write_text(_TRAIN_SCRIPT)
    # 24 held-out blocks in batches of 8: 3 batches for 2 ranks, an uneven share that must not hang the sharded model
    result = _torchrun(script, json.dumps([two]), port=29561, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    train(TrainConfig(**one))
    a, b = Path(two["output_dir"]) / "checkpoints/step-00000004", Path(one["output_dir"]) / "checkpoints/step-00000004"
    state = json.loads((a / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["distributed"] == "fsdp"
    for sub in ("model", "ema"):  # the consolidated weights of the sharded run
        x, y = _weights(a, sub), _weights(b, sub)
        assert x.keys() == y.keys()
        for key in x:  # float32 sums in another order; Adam's m / sqrt(v) magnifies them where gradients are ~0
            torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-5)
    shards = sorted(p.name for p in (a / "state").iterdir())
    assert len([s for s in shards if s.endswith(".safetensors")]) == 2  # each rank wrote its own shard
    evals = [json.loads(line)["eval_loss"] for line in (Path(two["output_dir"]) / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in line]
    evals_one = [json.loads(line)["eval_loss"] for line in (Path(one["output_dir"]) / "metrics.jsonl").read_text()
                 .splitlines() if "eval_loss" in line]
    assert len(evals) == 3 and evals == pytest.approx(evals_one, rel=1e-5)  # the uneven held-out set, all of it


def test_fsdp_of_a_converted_causal_lm_matches_one_process(tmp_path):
    """--init-from an autoregressive baseline (a LLaMA), converted on the fly, sharded by its decoder layers."""
    ar = train(tiny(tmp_path / "ar", objective="autoregressive", max_steps=2, save_every=2)).final_dir
    two = _fsdp(tmp_path, "fsdp", init_from=str(ar), distributed="fsdp", batch_size=4, eval_every=0, eval_blocks=8)
    one = _fsdp(tmp_path, "one", init_from=str(ar), batch_size=8, eval_every=0, eval_blocks=8)
    script = tmp_path / "train.py"
    script.write_text(_TRAIN_SCRIPT)
    result = _torchrun(script, json.dumps([two]), port=29567, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    train(TrainConfig(**one))
    a, b = Path(two["output_dir"]) / "checkpoints/step-00000004", Path(one["output_dir"]) / "checkpoints/step-00000004"
    for sub in ("model", "ema"):  # the causal LM's own folder, consolidated from the shards
        assert (a / sub / "ddlm_denoiser.json").is_file()
        x, y = _weights(a, sub), _weights(b, sub)
        assert x.keys() == y.keys() and "model.embed_tokens.weight" in x
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-5)


def test_fsdp_killed_on_both_ranks_resumes_bit_for_bit_and_consolidates(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_TRAIN_SCRIPT)
    straight = _fsdp(tmp_path, "straight", distributed="fsdp", batch_size=4, dropout=0.1, max_steps=8, save_every=4,
                     eval_every=0)
    killed = {**straight, "output_dir": str(tmp_path / "killed")}
    assert _torchrun(script, json.dumps([straight]), port=29562).returncode == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563",
               str(script), json.dumps([{**killed, "save_every": 4}])]
    process = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    marker, start = Path(killed["output_dir"]) / "checkpoints/step-00000004/COMPLETE", time.time()
    while not marker.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() - start < 240
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # both ranks and the launcher, at once
    process.wait(timeout=60)
    resumed = _torchrun(script, json.dumps([{**killed, "resume": "auto"}]), port=29564)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a = Path(straight["output_dir"]) / "checkpoints/step-00000008"
    b = Path(killed["output_dir"]) / "checkpoints/step-00000008"
    for sub in ("model", "ema"):
        x, y = _weights(a, sub), _weights(b, sub)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), sub
    shards = sorted((a / "state").glob("*.safetensors"))
    assert len(shards) == 2
    for shard in shards:  # the optimizer and EMA shards too
        x, y = load_file(str(shard)), load_file(str(b / "state" / shard.name))
        assert x.keys() == y.keys() and any(k.startswith("optim.") for k in x)
        assert all(torch.equal(x[k], y[k]) for k in x)

    # Another number of processes is refused without the flag, in one line, before any step.
    middle = Path(straight["output_dir"]) / "checkpoints/step-00000004"
    with pytest.raises(CheckpointError, match="written by 2 processes, this run has 1: resume with 2 processes"):
        train(TrainConfig(**{**straight, "distributed": "none", "resume": str(middle),
                             "output_dir": str(tmp_path / "one")}))
    # With it, the sharded checkpoint loads into one process (resharded) and training goes on.
    more = train(TrainConfig(**{**straight, "distributed": "none", "resume": str(middle), "allow_inexact_resume": True,
                                "output_dir": str(tmp_path / "one")}))
    assert more.step == 8

    # The consolidated model of the checkpoint loads with from_pretrained and samples the same tokens as the
    # weights gathered in memory from the shards.
    from diffusion import DDiTModel
    from samplers import get_sampler

    (tmp_path / "consolidate.py").write_text(_CONSOLIDATE_SCRIPT)
    out = tmp_path / "tokens.json"
    result = _torchrun(tmp_path / "consolidate.py", json.dumps({**straight, "resume": ""}), str(a), str(out),
                       port=29565)
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = DDiTModel.from_pretrained(a / "model").eval()
    tokens = get_sampler("ancestral").generate(loaded, batch_size=2, length=16, num_steps=8,
                                               generator=torch.Generator().manual_seed(5)).tokens.tolist()
    assert tokens == json.loads(out.read_text())


def test_fsdp_with_one_process_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "samplers.cli.train", "--output-dir", str(tmp_path / "r"),
                             "--distributed", "fsdp"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "ddlm-train: error: distributed='fsdp' needs at least 2 processes, this run has 1: launch it with torchrun "
        "--nproc_per_node N or accelerate launch --num_processes N (or use --distributed none)")


_GRPO_SCRIPT = """
import json, sys, torch
from rl.config import GRPOConfig
from rl.tasks import SortTask
from rl.trainer import GRPOTrainer
from tests.test_rl import _task_model
torch.set_num_threads(1)
task = SortTask(5)
model, tokenizer = _task_model()
config = GRPOConfig(**json.loads(sys.argv[1]))
trainer = GRPOTrainer(model, tokenizer, config, task.reward_functions, task.records(200, torch.Generator().manual_seed(1)),
                      task.reward_weights)
snapshots = []
for step in range(config.max_steps):
    metrics = trainer.train_step(step)
    snapshots.append({"metrics": metrics, "weights": {k: v.tolist() for k, v in trainer.model.state_dict().items()}})
json.dump(snapshots, open(sys.argv[2].replace("RANK", str(trainer.rank)), "w"))
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()
"""


def test_grpo_on_two_ranks_equals_one_process_and_the_ranks_agree(tmp_path):
    config = dict(output_dir=str(tmp_path / "rl"), max_steps=2, prompts_per_step=4, group_size=2, completion_length=6,
                  sampler="remask", sampling_steps=6, lr=1e-3, save_every=0, progress=False, variance_draws=2,
                  inner_steps=2, estimator="quadrature")
    script = tmp_path / "grpo.py"
    script.write_text(_GRPO_SCRIPT)
    result = _torchrun(script, json.dumps(config), str(tmp_path / "rank-RANK.json"), port=29566)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))
    one = subprocess.run([sys.executable, str(script), json.dumps(config), str(tmp_path / "one-RANK.json")],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-4000:]
    single = json.loads((tmp_path / "one-0.json").read_text())
    for step in range(2):
        for key, value in rank0[step]["weights"].items():
            assert value == rank1[step]["weights"][key], (step, key)  # identical weights on both ranks
            torch.testing.assert_close(torch.tensor(value), torch.tensor(single[step]["weights"][key]), rtol=1e-5,
                                       atol=1e-6)
        for name in ("reward_mean", "loss", "completion_length", "estimator_variance"):
            assert rank0[step]["metrics"][name] == pytest.approx(single[step]["metrics"][name], rel=1e-5, abs=1e-6), name
    moved = any(rank0[1]["weights"][k] != single[0]["weights"][k] for k in rank0[1]["weights"])
    assert moved
