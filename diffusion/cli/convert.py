"""``ddlm-convert``: turn a causal LM into a masked-diffusion denoiser folder (see ``diffusion/convert.py``).

    ddlm-convert --model runs/ar/final --output-dir runs/ar-converted
    ddlm-train --init-from runs/ar-converted --output-dir runs/from-ar --max-steps 500

The folder is the causal LM's own (config, safetensors weights, tokenizer with the mask token) plus
``ddlm_denoiser.json`` (mask id, logit shift, attention), which ``ddlm-generate``, ``ddlm-eval``, ``ddlm-sft``,
``ddlm-rl`` and ``ddlm-train --init-from`` read.
"""

from __future__ import annotations

import sys
from typing import Any

from .errors import console_command, one_line

__all__ = ["main"]


def _parser() -> Any:
    from .args import ArgumentParser, parse_bool

    parser = ArgumentParser(prog="ddlm-convert", description=__doc__)
    parser.add_argument("--model", required=True, help="a causal LM folder or Hub id (LLaMA, Qwen, GPT-2, ...)")
    parser.add_argument("--output-dir", required=True, help="the folder to write (must not exist yet)")
    parser.add_argument("--mask-token", default="<|mdm_mask|>",
                        help="the mask token added when the tokenizer has none (default: %(default)s)")
    parser.add_argument("--mask-token-id", type=int, default=None,
                        help="use this reserved id as the mask instead of adding a token (default: the tokenizer's "
                             "mask token, else a new one)")
    parser.add_argument("--shift-logits", type=parse_bool, default=True,
                        help="the output at position i-1 predicts token i (default: %(default)s)")
    parser.add_argument("--attention", choices=["bidirectional", "block"], default="bidirectional",
                        help="attention of the denoiser (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=None, help="block of --attention block (default: none)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    return parser


@console_command("ddlm-convert")
def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.block_size is not None and args.block_size < 1:
        parser.error(f"--block-size must be >= 1, got {args.block_size}")

    from pathlib import Path

    from transformers.utils import logging as hf_logging

    from ..convert import convert_causal_lm, load_causal_lm
    from ..locate import locate_model
    from ..training.checkpoint import atomic_directory

    hf_logging.disable_progress_bar()
    output = Path(args.output_dir)
    if output.exists():
        raise ValueError(f"--output-dir {args.output_dir!r} already exists: choose a new folder")
    try:
        model, tokenizer = load_causal_lm(locate_model(args.model), trust_remote_code=args.trust_remote_code)
    except OSError as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise FileNotFoundError(f"could not load --model {args.model!r}: {one_line(err)}") from err
    adapter, tokenizer = convert_causal_lm(model, tokenizer, mask_token=args.mask_token,
                                           mask_token_id=args.mask_token_id, shift_logits=args.shift_logits,
                                           attention=args.attention, block_size=args.block_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(output, complete=False) as tmp:
        adapter.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    config = adapter.config
    print(f"wrote {output}: {type(model).__name__}, mask id {config.mask_token_id} (vocabulary {config.vocab_size}), "
          f"shift_logits={adapter.shift_logits}, attention={config.attention}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
