"""Hub folders: load with plain transformers (no toolkit), same logits, a model card whose snippet runs."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))  # fake_hub

from diffusion import DDiTModel
from diffusion.training.checkpoint import CheckpointError
from diffusion.hub import export_for_hub
from diffusion.training.config import TrainConfig
from diffusion.training import train

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter with this toolkit removed from the import system.
_NO_TOOLKIT = """
import importlib.util, json, os, sys
# Drop the repository itself (not a virtualenv that may live inside it) and the editable-install finder.
sys.path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != os.path.realpath({repo!r})]
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
assert importlib.util.find_spec("diffusion") is None and importlib.util.find_spec("samplers") is None
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM
case = load_file({case!r})
model = AutoModelForMaskedLM.from_pretrained({folder!r}, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(input_ids=case["input_ids"], total_noise=case["sigma"]).logits
print(json.dumps({{"max_diff": (logits - case["logits"]).abs().max().item(), "cls": type(model).__module__}}))
exec(open({snippet!r}).read())
"""


def _export(tmp_path_factory, parameterization: str) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp(f"hub-{parameterization}")
    objective = "masked_elbo" if parameterization == "subs" else "score_entropy"
    config = TrainConfig(output_dir=str(tmp / "run"), seq_len=32, hidden_size=32, num_layers=1, num_heads=2,
                         cond_dim=16, batch_size=4, max_steps=4, warmup_steps=1, eval_every=2, eval_blocks=4,
                         eval_batch_size=4, save_every=4, precision="no", progress=False, objective=objective,
                         max_position_embeddings=64)
    train(config)
    checkpoint = tmp / "run/checkpoints/step-00000004"
    return export_for_hub(checkpoint, tmp / "hub"), checkpoint, tmp


@pytest.fixture(scope="module", params=["subs", "score"])
def exported(request, tmp_path_factory):
    return _export(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def exported_subs(tmp_path_factory):
    """The upload path does not depend on the parameterisation: one model is enough (subprocesses are slow)."""
    return _export(tmp_path_factory, "subs")


def test_folder_contents_and_card(exported):
    folder, _, _ = exported
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_ddit.py", "dropout.py", "sampler_config.json", "README.md",
            "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_ddit.DDiTModel"
    assert config["process"] == "absorbing" and config["mask_token_id"] == 4096
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "held-out loss" in card
    assert '"max_steps": 4' in card  # the training config


def test_loads_without_the_toolkit_with_the_same_logits_and_the_card_snippet_runs(exported):
    folder, checkpoint, tmp = exported
    model = DDiTModel.from_pretrained(folder).eval()
    ema = DDiTModel.from_pretrained(checkpoint / "ema").eval()
    x = torch.randint(0, 4097, (2, 16), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 2.0])
    with torch.no_grad():
        logits = model(input_ids=x, total_noise=sigma).logits
        torch.testing.assert_close(logits, ema(input_ids=x, total_noise=sigma).logits, rtol=0, atol=0)  # EMA weights
    save_file({"input_ids": x, "sigma": sigma, "logits": logits}, str(tmp / "case.safetensors"))
    card = (folder / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp / "snippet.py").write_text(snippet)
    code = _NO_TOOLKIT.format(repo=str(REPO), case=str(tmp / "case.safetensors"), folder=str(folder),
                              snippet=str(tmp / "snippet.py"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[0])
    assert report["max_diff"] == 0.0
    assert "modeling_ddit" in report["cls"] and not report["cls"].startswith("diffusion")
    assert len(result.stdout.splitlines()) >= 2  # the snippet printed its decoded tokens


def test_pickles_and_missing_configs_are_refused(tmp_path, exported):
    folder, _, _ = exported
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    marker = tmp_path / "payload-ran"
    payload = type("Payload", (), {"__reduce__": lambda self: (os.system, (f"touch {marker}",))})()
    (bad / "model.safetensors").write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="corrupt safetensors file"):
        export_for_hub(bad, tmp_path / "out")
    assert not marker.exists()  # the pickle was never unpickled
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export_for_hub(empty, tmp_path / "out2")


def test_push_cli_dry_run_writes_the_folder_and_needs_no_network(exported, tmp_path):
    from diffusion.cli.push import main

    _, checkpoint, _ = exported
    assert main([str(checkpoint), "--out", str(tmp_path / "dry"), "--dry-run"]) == 0
    assert (tmp_path / "dry" / "model.safetensors").exists()
    with pytest.raises(SystemExit):
        main([str(checkpoint)])  # neither --repo-id nor --dry-run


def _hub_env(hub, tmp: Path) -> dict[str, str]:
    """A subprocess environment that talks to the fake Hub (HF_ENDPOINT is read when huggingface_hub is imported)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_fake_token", "HF_HOME": str(tmp / "hf-home")}


def test_push_uploads_to_a_hub_and_the_model_loads_back_without_the_toolkit(exported_subs, tmp_path):
    from fake_hub import FakeHub

    folder, checkpoint, _ = exported_subs
    model = DDiTModel.from_pretrained(folder).eval()
    x = torch.randint(0, 4097, (2, 16), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 1.5])
    with torch.no_grad():
        save_file({"input_ids": x, "sigma": sigma, "logits": model(input_ids=x, total_noise=sigma).logits},
                  str(tmp_path / "case.safetensors"))
    expected = export_for_hub(checkpoint, tmp_path / "expected", location="tester/tiny")
    push = [sys.executable, "-m", "diffusion.cli.push", str(checkpoint), "--repo-id", "tester/tiny"]
    with FakeHub() as hub:
        env = _hub_env(hub, tmp_path)
        result = subprocess.run([*push, "--dry-run", "--out", str(tmp_path / "dry")], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert hub.requests == []  # --dry-run makes no request at all

        result = subprocess.run([*push, "--private"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert hub.created == [{"name": "tiny", "organization": "tester", "visibility": "private", "type": "model"}]
        uploaded = hub.repos["tester/tiny"]["main"]
        assert uploaded == {p.name: p.read_bytes() for p in expected.iterdir()}  # every file, byte for byte

        result = subprocess.run([*push, "--revision", "v1"], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert hub.repos["tester/tiny"]["v1"] == uploaded

        # Download through from_pretrained in an interpreter without this toolkit, then run the card's snippet,
        # which names the repository, against the same Hub.
        card = uploaded["README.md"].decode()
        (tmp_path / "snippet.py").write_text(card.split("```python\n", 1)[1].split("```", 1)[0])
        code = _NO_TOOLKIT.format(repo=str(REPO), case=str(tmp_path / "case.safetensors"), folder="tester/tiny",
                                  snippet=str(tmp_path / "snippet.py"))
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout.splitlines()[0])
        assert report["max_diff"] == 0.0 and report["cls"].startswith("transformers_modules.tester.tiny")
        assert "Do you wish to run the custom code" not in result.stdout + result.stderr
        assert any(m == "GET" and p.startswith("/tester/tiny/resolve/") and p.endswith("/model.safetensors")
                   for m, p in hub.requests)  # the weights really came over HTTP


def test_push_reports_an_unreachable_hub_in_one_line(exported_subs, tmp_path):
    _, checkpoint, _ = exported_subs
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HUB_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_fake_token", HF_HOME=str(tmp_path / "hf-home"))
    result = subprocess.run([sys.executable, "-m", "diffusion.cli.push", str(checkpoint), "--repo-id", "tester/tiny"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.startswith("ddlm-push: error: upload to 'tester/tiny' failed") and "Traceback" not in result.stderr
