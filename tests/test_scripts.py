"""scripts/ holds thin runnable files: none may share a name with a package it imports (it would shadow it)."""

from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_no_script_shadows_a_package():
    names = {p.stem for p in SCRIPTS.glob("*.py")}
    assert not names & {"diffusion", "samplers", "rl", "torch", "transformers", "datasets", "accelerate"}, names


def test_the_gpu_benchmarks_flop_count_is_what_a_training_step_executes():
    """executed_flops (blocks + output head at the masked positions, backward = 2 forwards) against torch's own
    count of the matmul and attention FLOPs of one forward + backward."""
    import sys

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffusion import DDiTConfig, DDiTModel

    sys.path.insert(0, str(SCRIPTS))
    from bench_gpu import executed_flops

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
