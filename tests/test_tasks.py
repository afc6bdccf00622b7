"""The synthetic RL tasks (rl/tasks.py): Sudoku's grids, puzzles and rewards checked by brute force."""

from __future__ import annotations

import pytest
import torch

from rl.tasks import SortTask, SudokuTask, char_tokenizer, sudoku_partial, sudoku_solved


def _valid(grid):
    rows = [grid[4 * r: 4 * r + 4] for r in range(4)]
    cols = ["".join(grid[4 * r + c] for r in range(4)) for c in range(4)]
    boxes = ["".join(grid[4 * (2 * a + r) + 2 * b + c] for r in range(2) for c in range(2)) for a in range(2)
             for b in range(2)]
    return all(sorted(u) == list("1234") for u in rows + cols + boxes)


def test_sudoku_grids_are_every_valid_grid():
    task = SudokuTask()
    brute = []

    def fill(cells):  # cell by cell, any digit not yet in the cell's row, column or box
        if len(cells) == 16:
            brute.append(cells)
            return
        i = len(cells)
        r, c = divmod(i, 4)
        used = {cells[j] for j in range(i) if j // 4 == r or j % 4 == c or (j // 8 == r // 2 and j % 4 // 2 == c // 2)}
        for d in "1234":
            if d not in used:
                fill(cells + d)

    fill("")
    assert sorted(task.grids) == sorted(brute) and len(brute) == 288 and all(_valid(g) for g in brute)


def test_sudoku_records_rewards_and_sft_batch():
    task, tokenizer = SudokuTask(blanks=6), char_tokenizer()
    records = task.records(64, torch.Generator().manual_seed(0))
    for r in records:
        assert r["prompt"] == r["puzzle"] + ">" and r["puzzle"].count("0") == 6
        assert all(q in ("0", a) for q, a in zip(r["puzzle"], r["answer"])) and _valid(r["answer"])
    answers = [r["answer"] for r in records]
    puzzles = [r["puzzle"] for r in records]
    assert sudoku_solved([], answers, puzzle=puzzles) == [1.0] * 64
    assert sudoku_partial([], answers, puzzle=puzzles) == [1.0] * 64
    other = {g for g in task.grids if all(q in ("0", x) for q, x in zip(puzzles[0], g))}  # every solution counts
    assert sudoku_solved([], sorted(other), puzzle=[puzzles[0]] * len(other)) == [1.0] * len(other)
    wrong = answers[0][:-1] + ("1" if answers[0][-1] != "1" else "2")
    assert sudoku_solved([], [wrong, answers[0][:15]], puzzle=puzzles[:1] * 2) == [0.0, 0.0]
    clues = 10
    kept = sum(a == b for a, b, q in zip(wrong, answers[0], puzzles[0]) if q != "0")
    assert sudoku_partial([], [wrong], puzzle=puzzles[:1])[0] == pytest.approx((12 - 3 + kept) / (12 + clues))
    sequences, completion = task.sft_batch(tokenizer, 4, torch.Generator().manual_seed(1))
    assert sequences.shape == (4, 34) and completion.sum(-1).tolist() == [17] * 4
    assert tokenizer.decode(sequences[0, 17:33].tolist()) in task.grids
    with pytest.raises(ValueError, match="blanks=13"):
        SudokuTask(blanks=13)
    with pytest.raises(ValueError, match="num_digits=1"):
        SortTask(1)


def test_the_rl_sections_prose_commands_run_shortened(tmp_path, capsys):
    """README's in-prose ddlm-rl commands (tree, SEPO, Sudoku, wd1), in-process with 2 steps each."""
    import json

    from rl.cli import main

    short = ["--max-steps", "2", "--sft-steps", "2", "--eval-prompts", "4", "--prompts-per-step", "2",
             "--variance-draws", "0", "--progress", "false"]
    base = tmp_path / "base"
    assert main(["--output-dir", str(base), *short]) == 0
    runs = {"tree": ["--model", str(base / "final"), "--rollout", "tree", "--tree-branches", "2", "--tree-depth", "3",
                     "--group-size", "8"],
            "sepo": ["--new-model", "sedd", "--estimator", "sepo", "--sampler", "analytic", "--lr", "3e-4"],
            "sudoku": ["--task", "sudoku", "--group-size", "2"],
            "wd1": ["--model", str(base / "final"), "--objective", "wd1", "--group-size", "2"]}
    for name, argv in runs.items():
        capsys.readouterr()
        assert main(["--output-dir", str(tmp_path / name), *short, *argv]) == 0, name
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [0, 1], name
        assert (tmp_path / name / "final" / "model.safetensors").is_file()
    tree = [json.loads(line) for line in (tmp_path / "tree" / "metrics.jsonl").read_text().splitlines()]
    assert tree[0]["rollout_row_calls"] == 2 * (2 * 2 + 4 * 2 + 8 * 2)  # 2 prompts; 6 steps in 3 segments of 2
    sudoku = json.loads((tmp_path / "sudoku" / "grpo_config.json").read_text())
    assert sudoku["completion_length"] == 17
