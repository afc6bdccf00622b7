"""Synthetic verifiable tasks that run on a CPU in minutes, with their supervised warm-up batches.

- :class:`SortTask`: sort a short list of digits.  Prompt ``"31415>"`` (the digits, then ``>``), completion
  ``"11345"`` then EOS.  Rewards: :func:`sorted_exact` (1 if the completion is the sorted list),
  :func:`sorted_partial` (the fraction of positions right, a dense signal) and the format check
  ``format_reward(r"\\d{n}")``.
- :class:`SudokuTask`: complete a 4x4 Sudoku.  Prompt: the 16 cells row by row, ``0`` for a blank, then ``>``;
  completion: the 16 digits of a solved grid, then EOS.  Every cell depends on its row, column and 2x2 box, so
  unlike sorting no position can be filled on its own.  Rewards: :func:`sudoku_solved` (1 if the grid is a valid
  Sudoku that keeps every clue; any solution counts), :func:`sudoku_partial` (the fraction of the 12 units and the
  clues that hold) and the format check ``format_reward(r"[1-4]{16}")``.

Every prompt and every completion of a task has the same number of tokens under the character tokenizer, so
rollouts batch without padding.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from .rewards import format_reward

__all__ = ["TASKS", "SortTask", "SudokuTask", "char_tokenizer", "sorted_exact", "sorted_partial", "sudoku_partial",
           "sudoku_solved"]

_ALPHABET = list("0123456789>")


def char_tokenizer() -> Any:
    """A character tokenizer for the task: ``<|endoftext|>`` = 0, the digits and ``>``, ``<|mask|>`` last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(_ALPHABET)}, "<|mask|>": len(_ALPHABET) + 1}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   mask_token="<|mask|>", clean_up_tokenization_spaces=False)


def sorted_exact(prompts: list[str], completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the completion is exactly the sorted digits.

    >>> sorted_exact(["312>"], ["123"], answer=["123"])
    [1.0]
    """
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def sorted_partial(prompts: list[str], completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
    """The fraction of positions where the completion has the right digit.

    >>> sorted_partial(["312>"], ["132"], answer=["123"])
    [0.3333333333333333]
    """
    return [sum(x == y for x, y in zip(c.strip(), a)) / len(a) for c, a in zip(completions, answer)]


class SortTask:
    """Sort ``num_digits`` random digits.  ``records(n, generator)`` -> ``[{"prompt", "answer"}]``."""

    def __init__(self, num_digits: int = 5) -> None:
        if isinstance(num_digits, bool) or not isinstance(num_digits, int) or not 2 <= num_digits <= 32:
            raise ValueError(f"num_digits must be an int in [2, 32], got num_digits={num_digits!r}")
        self.num_digits = num_digits
        self.prompt_length = num_digits + 1  # digits and ">"
        self.completion_length = num_digits + 1  # sorted digits and EOS
        self.reward_functions = [sorted_exact, sorted_partial, format_reward(rf"\d{{{num_digits}}}")]
        self.reward_weights = [1.0, 1.0, 0.2]

    def records(self, n: int, generator: torch.Generator | None = None) -> list[dict[str, str]]:
        digits = torch.randint(0, 10, (n, self.num_digits), generator=generator)
        out = []
        for row in digits.tolist():
            text = "".join(map(str, row))
            out.append({"prompt": f"{text}>", "answer": "".join(map(str, sorted(row)))})
        return out

    def preference_records(self, n: int, generator: torch.Generator | None = None) -> list[dict[str, str]]:
        """``[{"prompt", "chosen", "rejected", "answer"}]``: chosen is the sorted answer, rejected the same with one
        position changed to another digit (reward ``sorted_exact`` 0 against 1, ``sorted_partial`` (n-1)/n against 1).
        """
        return _with_rejected(self.records(n, generator), "0123456789", generator)

    def sft_batch(self, tokenizer: Any, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sequences [n, P + C], completion [n, P + C] bool)``: solved examples for supervised warm-up."""
        return _sft_batch(self.records(n, generator), tokenizer, self.prompt_length)


def _sft_batch(records: list[dict[str, str]], tokenizer: Any, prompt_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each record's prompt, answer and EOS; the completion is everything after the prompt."""
    ids = [tokenizer(r["prompt"] + r["answer"])["input_ids"] + [tokenizer.eos_token_id] for r in records]
    sequences = torch.tensor(ids)
    completion = torch.zeros_like(sequences, dtype=torch.bool)
    completion[:, prompt_length:] = True
    return sequences, completion


def _with_rejected(records: list[dict[str, str]], alphabet: str, generator: torch.Generator | None
                   ) -> list[dict[str, str]]:
    """Preference rows: the answer chosen, and rejected the answer with one position changed to another symbol of
    ``alphabet``."""
    n, width = len(records), len(records[0]["answer"])
    where = torch.randint(0, width, (n,), generator=generator).tolist()
    shift = torch.randint(1, len(alphabet), (n,), generator=generator).tolist()
    out = []
    for r, k, d in zip(records, where, shift):
        wrong = list(r["answer"])
        wrong[k] = alphabet[(alphabet.index(wrong[k]) + d) % len(alphabet)]
        out.append({**r, "chosen": r["answer"], "rejected": "".join(wrong)})
    return out


# ----- 4x4 Sudoku -------------------------------------------------------------------------------------------------
_UNITS = ([[4 * r + c for c in range(4)] for r in range(4)] + [[4 * r + c for r in range(4)] for c in range(4)]
          + [[4 * (2 * br + r) + 2 * bc + c for r in range(2) for c in range(2)] for br in range(2) for bc in range(2)])


def _solved_grids() -> list[str]:
    """All 288 solved 4x4 grids, as 16-character strings row by row (rows added one at a time, each kept only if
    no column or box repeats a digit so far)."""
    rows = ["".join(p) for p in itertools.permutations("1234")]
    grids = [""]
    for _ in range(4):
        grids = [g + r for g in grids for r in rows if _consistent(g + r)]
    return grids


def _consistent(cells: str) -> bool:
    """No unit repeats a digit among the first ``len(cells)`` cells."""
    for unit in _UNITS:
        seen = [cells[i] for i in unit if i < len(cells)]
        if len(seen) != len(set(seen)):
            return False
    return True


def _units_valid(grid: str) -> int:
    return sum(sorted(grid[i] for i in unit) == list("1234") for unit in _UNITS)


def sudoku_solved(prompts: list[str], completions: list[str], puzzle: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the completion is a solved grid that keeps every clue of the puzzle (``0`` = blank).

    >>> sudoku_solved([""], ["1234341221434321"], puzzle=["1034001200000000"])
    [1.0]
    """
    out = []
    for c, p in zip(completions, puzzle):
        c = c.strip()
        ok = len(c) == 16 and _units_valid(c) == 12 and all(q == "0" or q == x for q, x in zip(p, c))
        out.append(float(ok))
    return out


def sudoku_partial(prompts: list[str], completions: list[str], puzzle: list[str], **kwargs: Any) -> list[float]:
    """The fraction of the 12 units (rows, columns, boxes) holding 1-4 once each and of the clues kept (0 for a
    completion that is not 16 characters).

    >>> sudoku_partial([""], ["1234123412341234"], puzzle=["1000000000000000"])
    [0.38461538461538464]
    """
    out = []
    for c, p in zip(completions, puzzle):
        c = c.strip()
        clues = [i for i, q in enumerate(p) if q != "0"]
        if len(c) != 16:
            out.append(0.0)
            continue
        kept = sum(c[i] == p[i] for i in clues)
        out.append((_units_valid(c) + kept) / (12 + len(clues)))
    return out


class SudokuTask:
    """Complete a 4x4 Sudoku with ``blanks`` empty cells.  ``records(n, generator)`` ->
    ``[{"prompt", "puzzle", "answer"}]`` (``answer``: the grid the puzzle was cut from, one solution of possibly
    several)."""

    def __init__(self, blanks: int = 6) -> None:
        if isinstance(blanks, bool) or not isinstance(blanks, int) or not 1 <= blanks <= 12:
            raise ValueError(f"blanks must be an int in [1, 12], got blanks={blanks!r}")
        self.blanks = blanks
        self.grids = _solved_grids()
        self.prompt_length = 17  # 16 cells and ">"
        self.completion_length = 17  # 16 digits and EOS
        self.reward_functions = [sudoku_solved, sudoku_partial, format_reward(r"[1-4]{16}")]
        self.reward_weights = [1.0, 1.0, 0.2]

    def records(self, n: int, generator: torch.Generator | None = None) -> list[dict[str, str]]:
        picks = torch.randint(0, len(self.grids), (n,), generator=generator).tolist()
        holes = torch.rand(n, 16, generator=generator).argsort(-1)[:, : self.blanks].tolist()
        out = []
        for g, blank in zip(picks, holes):
            grid = self.grids[g]
            puzzle = "".join("0" if i in blank else x for i, x in enumerate(grid))
            out.append({"prompt": f"{puzzle}>", "puzzle": puzzle, "answer": grid})
        return out

    def preference_records(self, n: int, generator: torch.Generator | None = None) -> list[dict[str, str]]:
        """``[{"prompt", "puzzle", "answer", "chosen", "rejected"}]``: chosen is the grid the puzzle was cut from,
        rejected the same with one cell changed (no longer a Sudoku: ``sudoku_solved`` 0 against 1)."""
        return _with_rejected(self.records(n, generator), "1234", generator)

    def sft_batch(self, tokenizer: Any, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sequences [n, 34], completion [n, 34] bool)``: puzzles with the grid they were cut from."""
        return _sft_batch(self.records(n, generator), tokenizer, self.prompt_length)


TASKS = {"sort": SortTask, "sudoku": SudokuTask}
