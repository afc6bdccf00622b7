"""Train a discrete diffusion LM (``ddlm-train``), then print a few samples from the final model.

    ddlm-train --output-dir runs/shakespeare --max-steps 1500          # the built-in corpus
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py ...  # several processes (DDP)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    from diffusion.cli import add_dataclass_arguments, dataclass_from_namespace
    from diffusion.train_config import TrainConfig

    parser = argparse.ArgumentParser(prog="ddlm-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, TrainConfig)
    parser.add_argument("--num-samples", type=int, default=4, help="samples printed after training (0: none)")
    parser.add_argument("--sample-length", type=int, default=None, help="tokens per sample (default: seq_len)")
    parser.add_argument("--sample-steps", type=int, default=128, help="ancestral sampling steps")
    args = parser.parse_args(argv)
    try:
        config = dataclass_from_namespace(TrainConfig, args)
    except ValueError as err:
        parser.error(str(err))

    from transformers.utils import logging as hf_logging

    from diffusion.training import train

    hf_logging.disable_progress_bar()  # keep the terminal for our own progress bar

    from diffusion.checkpoint import CheckpointError

    try:
        result = train(config)
    except (FileNotFoundError, CheckpointError) as err:  # a bad --dataset, --tokenizer or --resume: one line, no traceback
        print(f"ddlm-train: error: {err}", file=sys.stderr)
        return 2
    except (OSError, FloatingPointError) as err:  # a checkpoint that cannot be written, a run that diverged
        print(f"ddlm-train: error: {err}", file=sys.stderr)
        return 1
    if result.final_dir is None or args.num_samples <= 0:
        return 0
    if int(os.environ.get("RANK", "0")) != 0:  # samples come from the main process only
        return 0
    return _print_samples(result.final_dir, args, config)


def _print_samples(final_dir, args: argparse.Namespace, config) -> int:
    from diffusion.data import load_tokenizer

    tokenizer = load_tokenizer(str(final_dir))
    length = args.sample_length or config.seq_len
    generator = torch.Generator().manual_seed(config.seed)
    if config.objective == "autoregressive":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(final_dir).eval()
        torch.manual_seed(config.seed)
        start = torch.full((args.num_samples, 1), tokenizer.eos_token_id)
        rows = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, max_new_tokens=length - 1, min_new_tokens=length - 1,
                              top_k=0, pad_token_id=tokenizer.eos_token_id).tolist()
        print(f"\n{args.num_samples} samples ({length} tokens, autoregressive, {length - 1} network calls each):")
    else:
        from diffusion import DDiTModel
        from samplers import get_sampler

        model = DDiTModel.from_pretrained(final_dir).eval()
        name = "ancestral" if model.config.parameterization == "subs" else "analytic"
        out = get_sampler(name).generate(model, batch_size=args.num_samples, length=length,
                                         num_steps=args.sample_steps, generator=generator)
        rows = out.tokens.tolist()
        print(f"\n{args.num_samples} samples ({length} tokens, {name}, {args.sample_steps} steps, "
              f"{out.nfe} network calls):")
    for i, row in enumerate(rows):
        print(f"\n--- sample {i + 1} ---\n{tokenizer.decode(row, skip_special_tokens=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
