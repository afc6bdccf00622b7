"""``ddlm-train``: train a discrete diffusion LM, then print a few samples from the final model.

    ddlm-train --output-dir runs/shakespeare --max-steps 1500          # the built-in corpus
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py ...  # several processes (DDP)

Training is :func:`diffusion.cli.train.main`; this module adds the samples, drawn with the model's default
sampler (masked ancestral for masked models, analytic for score models; an AR baseline samples itself).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from diffusion.cli.train import main as train_main

    return train_main(argv, after_training=print_samples, description=__doc__)


def print_samples(result: Any, args: argparse.Namespace, config: Any) -> int:
    """Print ``args.num_samples`` samples of ``args.sample_length`` tokens (default: the run's ``seq_len``)."""
    if args.num_samples <= 0:
        return 0
    from diffusion.adapters import load_denoiser

    final_dir = result.final_dir
    length = args.sample_length or config.seq_len
    generator = torch.Generator().manual_seed(config.seed)
    if config.objective == "autoregressive":
        from transformers import AutoModelForCausalLM

        from diffusion.data import load_tokenizer

        from ..autoregressive import sample_autoregressive

        tokenizer = load_tokenizer(str(final_dir))
        model = AutoModelForCausalLM.from_pretrained(final_dir).eval()
        start = torch.full((args.num_samples, 1), tokenizer.eos_token_id)  # a new document, as in the stream
        tokens, _ = sample_autoregressive(model, start, length - 1, seed=config.seed, eos_id=tokenizer.eos_token_id)
        rows = tokens.tolist()
        print(f"\n{args.num_samples} samples ({length} tokens, autoregressive, {length - 1} network calls each):")
    else:
        from diffusion import DiffusionSpec

        from .. import get_sampler

        model, tokenizer = load_denoiser(str(final_dir))
        spec = DiffusionSpec.of(model)
        name = spec.default_sampler
        steps = spec.chain_steps(length) or args.sampling_steps
        out = get_sampler(name).generate(model, batch_size=args.num_samples, length=length, num_steps=steps,
                                         generator=generator)
        rows = out.tokens.tolist()
        print(f"\n{args.num_samples} samples ({length} tokens, {name}, {steps} steps, "
              f"{out.nfe} network calls):")
    for i, row in enumerate(rows):
        print(f"\n--- sample {i + 1} ---\n{tokenizer.decode(row, skip_special_tokens=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
