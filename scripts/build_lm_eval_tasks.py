"""Cut the two lm-evaluation-harness tasks that ddlm ships from the built-in corpus's held-out plays.

    python scripts/build_lm_eval_tasks.py        # rewrites diffusion/data/lm_eval_tasks/*.jsonl

- ``next_line.jsonl`` (multiple choice, ``ddlm_next_line``): a speaker's line of verse or prose, then four
  candidates for the line that follows it in the same speech: the true one and three lines drawn from elsewhere in
  the held-out text with as many words, give or take one (so that length alone does not pick).  Chance is 25%.
- ``next_word.jsonl`` (generation, ``ddlm_next_word``): the first words of a line; the answer is its next word.

Only the held-out plays are used (``diffusion/data/shakespeare/valid.txt``), so no item was seen in training.  The
draw is seeded: running the script again writes the same files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "diffusion" / "data" / "shakespeare" / "valid.txt"
OUT = REPO / "diffusion" / "data" / "lm_eval_tasks"


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, lines) for every speech: a block whose first line ends with ':' and names the speaker."""
    found = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip().splitlines() if line.strip()]
        if len(lines) >= 2 and lines[0].endswith(":"):
            found.append((lines[0][:-1], lines[1:]))
    return found


def next_line_items(all_speeches: list[tuple[str, list[str]]], count: int, rng: random.Random) -> list[dict]:
    pool = [line for _, lines in all_speeches for line in lines if len(line.split()) >= 4]
    pairs = [(speaker, lines[i], lines[i + 1]) for speaker, lines in all_speeches for i in range(len(lines) - 1)
             if len(lines[i].split()) >= 4 and len(lines[i + 1].split()) >= 4]
    items = []
    for speaker, line, answer in rng.sample(pairs, count):
        size = len(answer.split())
        alike = [other for other in pool if abs(len(other.split()) - size) <= 1 and other not in (line, answer)]
        distractors = rng.sample(sorted(set(alike)), 3)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        items.append({"context": f"{speaker}:\n{line}\n", "choices": choices, "label": choices.index(answer)})
    return items


def next_word_items(all_speeches: list[tuple[str, list[str]]], count: int, rng: random.Random) -> list[dict]:
    candidates = []
    for speaker, lines in all_speeches:
        for line in lines:
            words = line.split()
            if len(words) >= 5 and re.fullmatch(r"[A-Za-z]+", words[3]):
                candidates.append((speaker, " ".join(words[:3]), words[3]))
    return [{"context": f"{speaker}:\n{start}", "answer": answer}
            for speaker, start, answer in rng.sample(candidates, count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100, help="items per task (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default: %(default)s)")
    args = parser.parse_args()
    found = speeches(SOURCE.read_text(encoding="utf-8"))
    for name, build in (("next_line", next_line_items), ("next_word", next_word_items)):
        items = build(found, args.items, random.Random(f"{name}-{args.seed}"))
        path = OUT / f"{name}.jsonl"
        path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
        print(f"wrote {len(items)} items to {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
