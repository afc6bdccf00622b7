"""Memory per rank of a DDiT run, worked out from its shape: weights, gradients, AdamW and EMA states, activations.

    python scripts/memory_table.py [--json memory_table.json]

Training state per parameter: fp32 weights 4 bytes, fp32 gradients 4, AdamW's two moments 8, the EMA shadow 4:
20 bytes.  DDP keeps all of it on every rank; FSDP2 keeps 1/world of it, plus the whole weights and gradients
of one block while that block runs (in bf16 under the bf16 policy: 2 + 2 bytes per block parameter).
Activations per block and sequence under bf16 compute follow Korthikanti et al. (2022), ``L H (34 + 5 a L / H)``
bytes for length L, width H, a heads; gradient checkpointing keeps only each block's input (``2 L H`` bytes)
and recomputes one block at a time during the backward pass.  The output head's fp32 logits, log-probabilities
and their gradient over the vocabulary add ``3 x 4 L V / 2`` bytes per sequence (the loss reads the masked half).
This is arithmetic, not a measurement: ``bench_train.py --distributed none,ddp,fsdp`` measures the small sizes.
"""

from __future__ import annotations

import argparse
import json

GB = 1024**3
# name: (width, blocks, heads, vocabulary, sequence length, sequences per rank)
SHAPES = {
    "small (256 x 4)": (256, 4, 4, 4097, 128, 8),
    "base (384 x 6)": (384, 6, 6, 4097, 128, 8),
    "medium (512 x 8)": (512, 8, 8, 4097, 128, 8),
    "1B (2048 x 18, vocab 32k)": (2048, 18, 16, 32000, 2048, 8),
    "7.5B (4096 x 32, vocab 128k)": (4096, 32, 32, 128256, 2048, 4),
}


def parameters(width: int, blocks: int, vocab: int, mlp_ratio: float = 4.0) -> tuple[int, int]:
    """(all, per block): attention 4 H^2, MLP 2 r H^2 + biases, two norms; embedding and head V H each."""
    block = 4 * width * width + 2 * int(mlp_ratio * width) * width + int(mlp_ratio * width) + width + 2 * width
    return blocks * block + 2 * vocab * width + width, block


def rank_memory(shape: tuple[int, int, int, int, int, int], world: int, fsdp: bool, checkpointing: bool) -> dict:
    """Bytes per rank: training state and activations."""
    width, blocks, heads, vocab, length, batch = shape
    total, block = parameters(width, blocks, vocab)
    state = 20 * total / world if fsdp else 20 * total
    gathered = 4 * block if fsdp else 0  # one block's bf16 weights and gradients, whole, while it runs
    per_block = length * width * (34 + 5 * heads * length / width)
    head = 3 * 4 * length * vocab / 2
    if checkpointing:
        activations = batch * (blocks * 2 * length * width + per_block + head)
    else:
        activations = batch * (blocks * per_block + head)
    return {"params": total, "state_gb": (state + gathered) / GB, "activations_gb": activations / GB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    parser.add_argument("--smoke", action="store_true", help="no effect: the table is arithmetic, instant either way")
    args = parser.parse_args()
    rows = []
    print("| model | parameters | sequences x length per rank | DDP: state per rank | FSDP2, 2 ranks | FSDP2, 8 ranks "
          "| activations | with gradient checkpointing |")
    print("|---|---|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        ddp = rank_memory(shape, 1, fsdp=False, checkpointing=False)
        fsdp2 = rank_memory(shape, 2, fsdp=True, checkpointing=False)
        fsdp8 = rank_memory(shape, 8, fsdp=True, checkpointing=False)
        ckpt = rank_memory(shape, 1, fsdp=False, checkpointing=True)
        rows.append({"model": name, "params": ddp["params"], "ddp_state_gb": ddp["state_gb"],
                     "fsdp2_state_gb": fsdp2["state_gb"], "fsdp8_state_gb": fsdp8["state_gb"],
                     "activations_gb": ddp["activations_gb"], "activations_checkpointed_gb": ckpt["activations_gb"]})
        print(f"| {name} | {ddp['params'] / 1e6:,.1f}M | {shape[5]} x {shape[4]} | {ddp['state_gb']:.3g} GB | "
              f"{fsdp2['state_gb']:.3g} GB | {fsdp8['state_gb']:.3g} GB | {ddp['activations_gb']:.3g} GB | "
              f"{ckpt['activations_gb']:.3g} GB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
