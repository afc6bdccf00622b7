"""``ddlm-sft``: instruction fine-tuning of a masked-diffusion LM (LLaDA's recipe: the prompt is never masked).

    ddlm-sft --model runs/shakespeare/final --data builtin:shakespeare-dialogue --output-dir runs/sft
    ddlm-sft --model ./converted --data chats.jsonl --lora-rank 8 --pad-with-eos true

Data rows hold ``messages`` (formatted with the tokenizer's chat template) or ``prompt`` and ``completion``; see
``diffusion/data/instructions.py``.  The fine-tuned model goes to ``OUTPUT_DIR/final``.
"""

from __future__ import annotations

import sys
from typing import Any

from .errors import console_command

__all__ = ["main"]


def _parser() -> Any:
    from ..training.sft import SFTConfig
    from .args import ArgumentParser, add_dataclass_arguments

    parser = ArgumentParser(prog="ddlm-sft", description=__doc__)
    add_dataclass_arguments(parser, SFTConfig)
    return parser


@console_command("ddlm-sft")
def main(argv: list[str] | None = None) -> int:
    from ..training.sft import SFTConfig
    from .args import dataclass_from_namespace

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = dataclass_from_namespace(SFTConfig, args)
    except ValueError as err:
        parser.error(str(err))

    from transformers.utils import logging as hf_logging

    from ..training.sft import train_sft
    from .loading import load_denoiser_for

    hf_logging.disable_progress_bar()
    model, tokenizer = load_denoiser_for(config.model, trust_remote_code=config.trust_remote_code)
    result = train_sft(config, model, tokenizer)  # errors end as console_command says
    print(f"fine-tuned model: {result.final_dir} (last loss {result.last_loss:.4f} nats per completion token)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
