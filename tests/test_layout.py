"""The package layout: imports flow one way (diffusion <- samplers <- rl <- scripts), one implementation of the
masked ELBO that every caller uses, and an installed wheel that holds no ``scripts`` package."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion import DDiTConfig, DDiTModel, DiffusionObjective
from diffusion.evaluation.likelihood import sequence_nelbo
from diffusion.losses import masked_diffusion_loss, masked_elbo, masked_nll
from diffusion.processes import mask_tokens
from diffusion.schedules import LINEAR_MASKING
from diffusion.time_nodes import time_nodes
from diffusion.estimators import get_estimator, model_log_probs
from rl.sft import sft_loss

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["diffusion", "samplers", "rl", "scripts"]  # each may import only those before it


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_flow_one_way(layer):
    forbidden = set(LAYERS[LAYERS.index(layer) + 1:])
    offenders = {}
    for path in sorted((REPO / layer).rglob("*.py")):
        bad = _imported_top_levels(path) & forbidden
        if bad:
            offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert not offenders, f"{layer} imports from a layer above it: {offenders}"


@pytest.mark.parametrize("layer, packages", [
    ("diffusion", "diffusion, diffusion.training, diffusion.evaluation, diffusion.data, diffusion.hub, diffusion.cli, "
                  "diffusion.cli.train, diffusion.cli.push"),
    ("samplers", "samplers, samplers.cli.train, samplers.cli.generate, samplers.cli.evaluate"),
    ("rl", "rl, rl.cli"),
])
def test_importing_a_layer_loads_nothing_above_it(layer, packages):
    above = set(LAYERS[LAYERS.index(layer) + 1:])
    code = (f"import sys, {packages}; loaded = sorted(m for m in sys.modules if m.split('.')[0] in {above!r}); "
            "assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-1500:]


@pytest.fixture(scope="module")
def masked_model():
    torch.manual_seed(0)
    config = DDiTConfig(vocab_size=13, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, cond_dim=16,
                        max_position_embeddings=32)
    return DDiTModel(config).eval()


def test_every_masked_elbo_caller_uses_the_single_implementation(masked_model):
    """Training objective, likelihood bound, RL estimators and SFT agree bit for bit with masked_elbo/masked_nll."""
    model, mask_id = masked_model, 12
    x0 = torch.randint(0, 12, (4, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # 1. the training objective (dense and masked-positions paths) at fixed draws
        objective = DiffusionObjective.from_config(model.config)
        t, xt = objective.corrupt(x0, generator=torch.Generator().manual_seed(2))
        weight, masked = objective.schedule.elbo_weight(t), xt == mask_id
        log_probs = model(input_ids=xt).logits
        dense = masked_elbo(log_probs, x0, masked, weight)
        assert torch.equal(masked_diffusion_loss(log_probs, x0, xt, t, objective.schedule, mask_id=mask_id,
                                                 normalized=True), dense)
        # DDiT computes its head at the masked positions only: the packed form of the same sum
        packed = masked_elbo(model(input_ids=xt, score_mask=masked).logits, x0[masked], None, weight,
                             rows=masked.nonzero(as_tuple=True)[0])
        assert torch.equal(objective.loss(model, x0, xt, t).per_sequence, packed)
        torch.testing.assert_close(packed, dense, rtol=1e-6, atol=0)  # only the summation order differs
        # 2. the likelihood bound (lambda form) with quadrature nodes
        generator = torch.Generator().manual_seed(3)
        bound, calls = sequence_nelbo(model, x0, method="quadrature", num_points=3, generator=generator)
        replay = torch.Generator().manual_seed(3)
        lam, w = time_nodes("quadrature", 3, 4, generator=replay)
        by_hand = torch.zeros(4, dtype=torch.float64)
        for n in range(3):
            xt_n, masked = mask_tokens(x0, lam[n], mask_id, generator=replay)
            by_hand += w[n] * masked_elbo(model(input_ids=xt_n).logits.double(), x0, masked,
                                          LINEAR_MASKING.elbo_weight(lam[n]))
        assert calls == 3 and torch.equal(bound, by_hand)
        # 3. an RL estimator: every contribution is -weight * masked_nll under the same view
        completion = torch.zeros_like(x0, dtype=torch.bool)
        completion[:, 4:] = True
        estimator = get_estimator("quadrature", mask_id, num_points=2)
        draw = estimator.draw(x0, completion, torch.Generator().manual_seed(4))
        total = torch.zeros(x0.shape)
        for v in range(draw.views.shape[0]):
            nll = masked_nll(model_log_probs(model, draw.views[v], draw.t[v]), x0, draw.weights[v] != 0)
            total = total - draw.weights[v].float() * nll
        assert torch.equal(estimator.estimate(model, draw), total[completion].view(4, -1))
        # 4. SFT: masked_elbo of the completion at the masking-probability time
        replay = torch.Generator().manual_seed(5)
        t_sft = 1e-3 + (1 - 1e-3) * torch.rand(4, generator=replay)
        xt_sft, masked = mask_tokens(x0, t_sft, mask_id, generator=replay, where=completion)
        per_row = masked_elbo(model(input_ids=xt_sft).logits, x0, masked, LINEAR_MASKING.elbo_weight(t_sft))
        loss = sft_loss(model, x0, completion, mask_id, torch.Generator().manual_seed(5))
        assert torch.equal(loss, per_row.sum() / completion.sum())


def test_the_single_elbo_equals_the_formula_written_out(masked_model):
    """masked_elbo against w(t) * sum over masked positions of -log p(x0), in float64 by hand."""
    log_probs = torch.log_softmax(torch.randn(3, 7, 9, dtype=torch.float64), -1)
    x0 = torch.randint(0, 9, (3, 7))
    masked = torch.rand(3, 7) < 0.5
    weight = torch.tensor([2.0, 1.5, 4.0], dtype=torch.float64)
    by_hand = torch.tensor([weight[b] * sum(-float(log_probs[b, i, x0[b, i]]) for i in range(7) if masked[b, i])
                            for b in range(3)], dtype=torch.float64)
    torch.testing.assert_close(masked_elbo(log_probs, x0, masked, weight), by_hand, rtol=1e-12, atol=0)
    rows = masked.nonzero(as_tuple=True)[0]
    packed = masked_elbo(log_probs[masked], x0[masked], None, weight, rows=rows)
    torch.testing.assert_close(packed, by_hand, rtol=1e-12, atol=0)


def test_an_installed_wheel_has_no_scripts_package_and_its_commands_run(tmp_path):
    """``pip install .`` (not editable) into a folder, run from another directory: no ``scripts``, working commands."""
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                              "--target", str(target), str(REPO)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    assert not (target / "scripts").exists() and (target / "diffusion" / "data" / "shakespeare" / "train.txt").is_file()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = subprocess.run([sys.executable, "-c", "import scripts"], cwd=elsewhere, env=env, capture_output=True,
                           text=True, timeout=60)
    assert probe.returncode != 0 and "No module named 'scripts'" in probe.stderr
    where = subprocess.run([sys.executable, "-c", "import diffusion, samplers, rl; print(diffusion.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0 and where.stdout.startswith(str(target)), where.stdout + where.stderr
    commands = ("ddlm-train", "ddlm-generate", "ddlm-eval", "ddlm-push", "ddlm-rl", "ddlm-dpo", "ddlm-prepare",
                "ddlm-convert", "ddlm-sft", "ddlm-plot", "ddlm-lm-eval", "ddlm-demo")
    assert all((target / "bin" / command).is_file() for command in commands)
    result = subprocess.run([str(target / "bin" / "ddlm-rl"), "--help"], cwd=elsewhere, env=env,  # a real launcher
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: ddlm-rl" in result.stdout, result.stderr[-1500:]
    # Every other command's entry point, as the wheel declares it, in one process (each launcher costs an import).
    check = ("import contextlib, io, sys\n"
             "from importlib.metadata import distributions\n"
             "(dist,) = [d for d in distributions(path=[sys.argv[1]]) if d.metadata['Name'] == 'ddlm']\n"
             "points = {e.name: e for e in dist.entry_points if e.group == 'console_scripts'}\n"
             "for name in sys.argv[2:]:\n"
             "    out = io.StringIO()\n"
             "    with contextlib.redirect_stdout(out):\n"
             "        try:\n"
             "            points[name].load()(['--help'])\n"
             "        except SystemExit as end:\n"
             "            assert end.code in (0, None), (name, end.code)\n"
             "    assert f'usage: {name}' in out.getvalue(), (name, out.getvalue()[-500:])\n"
             "    assert points[name].load().__module__.split('.')[0] in ('diffusion', 'samplers', 'rl')\n"
             "print(sorted(points) == sorted(sys.argv[2:]))\n")
    result = subprocess.run([sys.executable, "-c", check, str(target), *commands], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stdout[-1500:] + result.stderr[-1500:]
