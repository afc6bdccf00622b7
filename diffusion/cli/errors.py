"""How every console command ends: a result, one line naming what was wrong, or (only for a bug) a traceback.

- Expected errors (bad data, a bad file or flag, a missing path, a corrupt checkpoint: ``ValueError``,
  ``FileNotFoundError`` and the other "this path" ``OSError`` kinds, ``UnicodeError``) print
  ``prog: error: <message>`` on one line and exit 2.
- A run that cannot go on through no fault of its input (a disk that fills, a diverged run:
  other ``OSError``, ``FloatingPointError``) prints one line and exits 1.
- Ctrl-C outside training (which checkpoints on its own) prints one line and exits 130.
- ``--debug`` (every command has it) shows the full traceback instead.  Anything else is a bug in the toolkit
  and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "console_command", "first_line", "one_line"]

EXIT_USAGE = 2  # the input was wrong: fix it and run again
EXIT_FAILED = 1  # the input was fine; the run could not finish

_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError,
    UnicodeError,
)


def first_line(err: BaseException) -> str:
    """The first non-empty line of ``err``'s message (a library's long report begins with its point), or its type's
    name when it has none."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def one_line(err: BaseException) -> str:
    """``err``'s message as one line (its lines joined), or its type's name when it has none."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def console_command(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a command's ``main(argv, **options) -> exit code`` with the endings above."""

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None, **options: Any) -> int:
            debug = "--debug" in (sys.argv[1:] if argv is None else argv)
            try:
                return main(argv, **options)
            except _INPUT_ERRORS as err:
                if debug:
                    raise
                print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
                return EXIT_USAGE
            except (OSError, FloatingPointError) as err:
                if debug:
                    raise
                print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
                return EXIT_FAILED
            except KeyboardInterrupt:
                if debug:
                    raise
                print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
                return 130

        return run

    return decorate
