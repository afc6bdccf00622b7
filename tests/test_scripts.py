"""scripts/ holds thin runnable files: none may share a name with a package it imports (it would shadow it)."""

from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_no_script_shadows_a_package():
    names = {p.stem for p in SCRIPTS.glob("*.py")}
    assert not names & {"diffusion", "samplers", "rl", "torch", "transformers", "datasets", "accelerate"}, names


def test_the_benchmarks_flop_count_is_what_a_training_step_executes():
    """executed_flops (blocks + output head at the masked positions, backward = 2 forwards) against torch's own
    count of the matmul and attention FLOPs of one forward + backward."""
    import sys

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffusion import DDiTConfig, DDiTModel

    sys.path.insert(0, str(SCRIPTS))
    from bench_common import executed_flops

    size = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1025, seq_len=64)
    torch.manual_seed(0)
    model = DDiTModel(DDiTConfig(vocab_size=size["vocab_size"], hidden_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, cond_dim=16, max_position_embeddings=64,
                                 attn_implementation="sdpa"))
    batch = 4
    x = torch.randint(0, 1024, (batch, 64), generator=torch.Generator().manual_seed(0))
    # 128 masked positions: a multiple of 64, the row count the head pads to, so no padding rows are executed.
    masked = torch.zeros(x.numel(), dtype=torch.bool)
    masked[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(1))[:128]] = True
    masked = masked.view(x.shape)
    x = torch.where(masked, torch.full_like(x, 1024), x)
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=x, score_mask=masked).logits
        logits.logsumexp(-1).sum().backward()
    counted = counter.get_total_flops()
    formula = executed_flops(size, batch, masked.float().mean().item())
    assert abs(formula / counted - 1) < 1e-6, (formula, counted)


def test_the_sampling_floor_counts_the_fused_cpu_attention():
    """torch's FLOP counter gives SDPA's fused CPU kernel 0 FLOPs; the mapping bench_compare's sampling floor counts
    with gives it Q K^T and P V, 4 B H Lq Lk d (here with fewer queries than keys, as a cached call has)."""
    import sys

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(SCRIPTS))
    from bench_compare import _cpu_attention_flops

    q, k, v = (torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    kv = torch.randn(2, 3, 24, 8), torch.randn(2, 3, 24, 8)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
    with torch.no_grad():
        with FlopCounterMode(display=False) as plain:
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
        with FlopCounterMode(display=False, custom_mapping=mapping) as mapped:
            torch.nn.functional.scaled_dot_product_attention(q, *kv)  # 16 queries against 24 keys
    assert plain.get_total_flops() == 0
    assert mapped.get_total_flops() == 4 * 2 * 3 * 16 * 24 * 8


def test_the_peer_benchmarks_flash_attn_stand_in_is_exact_attention_and_rotary():
    """scripts/bench_peers.py runs SEDD's and MDLM's code on a CPU through a flash-attn stand-in: its packed
    attention must be softmax(q k^T / sqrt(d)) v per sequence, and its in-place rotary the half-split rotation."""
    import sys


    sys.path.insert(0, str(SCRIPTS))
    import bench_peers

    before = set(sys.modules)
    bench_peers._flash_attn_stand_in(rotary=True)
    try:
        _check_stand_in(sys.modules["flash_attn.flash_attn_interface"], sys.modules["flash_attn.layers.rotary"])
    finally:  # the stand-in must not outlive this test: transformers would take flash-attn for installed
        for name in set(sys.modules) - before:
            del sys.modules[name]


def _check_stand_in(interface, rotary):
    import torch

    g = torch.Generator().manual_seed(0)
    batch, length, heads, dim = 2, 5, 3, 8
    qkv = torch.randn(batch, length, 3, heads, dim, generator=g, dtype=torch.float64)
    cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32)
    out = interface.flash_attn_varlen_qkvpacked_func(qkv.reshape(batch * length, 3, heads, dim), cu, length, 0.0)
    q, k, v = qkv.unbind(2)  # [B, S, H, D]
    weights = torch.einsum("bshd,bthd->bhst", q, k).div(dim**0.5).softmax(-1)
    expected = torch.einsum("bhst,bthd->bshd", weights, v).reshape(batch * length, heads, dim)
    torch.testing.assert_close(out, expected)
    packed = qkv.reshape(batch * length, 3, heads, dim).clone().requires_grad_()  # training: the two-matmul form
    torch.testing.assert_close(interface.flash_attn_varlen_qkvpacked_func(packed, cu, length, 0.0), expected)

    angles = torch.rand(length, dim // 2, generator=g, dtype=torch.float64) * 6
    rotated = rotary.apply_rotary_emb_qkv_(qkv.clone(), angles.cos(), angles.sin())
    for i in (0, 1):  # q and k: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)
        x1, x2 = qkv[:, :, i, :, : dim // 2], qkv[:, :, i, :, dim // 2 :]
        c, s = angles.cos()[:, None], angles.sin()[:, None]
        torch.testing.assert_close(rotated[:, :, i], torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1))
    torch.testing.assert_close(rotated[:, :, 2], qkv[:, :, 2])  # v untouched


def test_the_peer_benchmark_refuses_missing_or_wrong_checkouts(tmp_path, monkeypatch, capsys):
    import sys

    import pytest

    sys.path.insert(0, str(SCRIPTS))
    import bench_peers

    for argv, message in [([], "give --sedd, --mdlm or both"),
                          (["--sedd", str(tmp_path)], f"--sedd {str(tmp_path)!r} is not a checkout of the SEDD code"),
                          (["--mdlm", str(tmp_path), "--items", "sedd train fp32"], "needs --sedd"),
                          (["--mdlm", str(tmp_path), "--train-steps", "0"], "--train-steps must be >= 1, got 0"),
                          (["--mdlm", str(tmp_path), "--min-ratio", "0"], "--min-ratio must be > 0, got 0.0")]:
        (tmp_path / "models").mkdir(exist_ok=True)
        (tmp_path / "models" / "dit.py").write_text("")
        monkeypatch.setattr(sys, "argv", ["bench_peers.py", *argv])
        with pytest.raises(SystemExit) as stop:
            bench_peers.main()
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_the_gpu_benchmark_falls_back_without_a_gpu_and_measures_on_the_cpu(tmp_path):
    """Without CUDA it says so and exits 0; ``--device cpu --smoke`` runs its measuring code and writes rows."""
    import json
    import subprocess
    import sys

    import torch

    script = str(SCRIPTS / "bench_gpu.py")
    if not torch.cuda.is_available():
        plain = subprocess.run([sys.executable, script, "--json", str(tmp_path / "none.json")], capture_output=True,
                               text=True, timeout=120)
        assert plain.returncode == 0 and "no CUDA GPU" in plain.stdout + plain.stderr, plain
    run = subprocess.run([sys.executable, script, "--device", "cpu", "--smoke", "--json", str(tmp_path / "g.json")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "g.json").read_text())
    train = [r for r in result["rows"] if r["part"] == "train"]
    assert train and all(r["tokens_per_s"] > 0 and 0 < r["mfu_executed"] < r["mfu_6n"] for r in train), result


def test_the_results_table_trains_every_diffusion_row_with_the_recipe_and_keeps_its_scorer(monkeypatch):
    """results.py's recipe: fan-in init and 200 warm-up steps for every diffusion row, constant modulation exactly
    for the time-free rows; the AR baseline (the scorer of every gen-ppl in README) keeps 50 warm-up steps and
    its own init. Every row's config passes TrainConfig's validation."""
    import argparse
    import sys

    monkeypatch.syspath_prepend(str(SCRIPTS))
    sys.modules.pop("results", None)
    import results
    from diffusion.training.config import TrainConfig

    args = argparse.Namespace(max_steps=1000, warmup_steps=200, init_scheme="fan_in", constant_modulation=True)
    modulated = set()
    for label, (_, overrides) in results.MODELS.items():
        row = results.recipe(overrides, args)
        config = TrainConfig(output_dir="-", **row)
        if label == "autoregressive baseline":
            assert (config.warmup_steps, config.init_scheme, config.constant_modulation) == (50, "normal", False)
            continue
        assert (config.warmup_steps, config.init_scheme) == (200, "fan_in")
        assert config.constant_modulation == (not config.resolved_time_conditioning)
        if config.constant_modulation:
            modulated.add(label)
    assert modulated == {"masked ELBO (time-free)", "ARDM", "D3PM absorbing, T=1000, lambda 0.01"}
    before = argparse.Namespace(max_steps=1000, warmup_steps=50, init_scheme="normal", constant_modulation=False)
    masked = TrainConfig(output_dir="-", **results.recipe(results.MODELS["masked ELBO (time-free)"][1], before))
    assert (masked.warmup_steps, masked.init_scheme, masked.constant_modulation) == (50, "normal", False)
