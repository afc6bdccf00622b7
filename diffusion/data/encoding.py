"""Reading a local data file as text, with a wrong encoding reported by file, byte offset and the option to use."""

from __future__ import annotations

from pathlib import Path

__all__ = ["read_text_file"]


def read_text_file(path: Path, encoding: str = "utf-8") -> str:
    """The text of ``path`` decoded with ``encoding``.

    Raises:
        ValueError: ``encoding`` is unknown, or the file is not text in it (the message names the file, the offset
            of the first bad byte and its value, and ``--encoding``).
    """
    raw = path.read_bytes()
    try:
        return raw.decode(encoding)
    except LookupError as err:
        raise ValueError(f"unknown encoding={encoding!r}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not {encoding} text (byte {err.start} is {raw[err.start:err.start + 1]!r}); "
                         "pass the file's encoding with --encoding (latin-1, cp1252, ...)") from err
