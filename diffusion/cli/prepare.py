"""Tokenize and pack a corpus once (``ddlm-prepare``), so that training reads memory-mapped blocks.

    ddlm-prepare --dataset ./my_texts/ --seq-len 128 --output data/my-texts-128 --num-proc 4
    ddlm-train --dataset data/my-texts-128 --seq-len 128 --tokenizer data/my-texts-128/tokenizer ...

The held-out split is made as ``ddlm-train`` makes it (``--valid-fraction``, ``--seed``).
"""

from __future__ import annotations

import sys

from .errors import console_command

__all__ = ["main"]


@console_command("ddlm-prepare")
def main(argv: list[str] | None = None) -> int:
    from .args import ArgumentParser

    parser = ArgumentParser(prog="ddlm-prepare", description=__doc__)
    parser.add_argument("--dataset", required=True, help="as ddlm-train --dataset: builtin:..., a local file or "
                                                         "folder, or a datasets Hub name")
    parser.add_argument("--output", required=True, help="the folder to write")
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per block (the run's --seq-len)")
    parser.add_argument("--tokenizer", default="builtin", help="as ddlm-train --tokenizer (default: %(default)s)")
    parser.add_argument("--dataset-config", default=None, help="configuration of a Hub dataset (default: none)")
    parser.add_argument("--text-column", default="text", help="column holding the text (default: %(default)s)")
    parser.add_argument("--valid-fraction", type=float, default=0.02,
                        help="documents held out when the source has no validation split (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out choice (default: %(default)s)")
    parser.add_argument("--num-proc", type=int, default=1, help="tokenizing processes (default: %(default)s)")
    args = parser.parse_args(argv)
    for name in ("seq_len", "num_proc"):
        if getattr(args, name) < (2 if name == "seq_len" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= {2 if name == 'seq_len' else 1}, got {getattr(args, name)}")
    if not 0 < args.valid_fraction < 1:
        parser.error(f"--valid-fraction must be in (0, 1), got {args.valid_fraction}")

    from ..data import load_tokenizer
    from ..data.prepare import load_prepared, prepare_dataset

    tokenizer = load_tokenizer(args.tokenizer)
    folder = prepare_dataset(args.output, dataset=args.dataset, tokenizer=tokenizer, seq_len=args.seq_len,
                             dataset_config=args.dataset_config, text_column=args.text_column,
                             valid_fraction=args.valid_fraction, seed=args.seed, num_proc=args.num_proc)
    splits = load_prepared(folder, tokenizer=tokenizer, seq_len=args.seq_len)
    print(f"wrote {folder}: {len(splits['train'])} training and {len(splits['validation'])} held-out blocks of "
          f"{args.seq_len} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
