"""Training curves: what ddlm-plot reads from metrics.jsonl is what it draws."""

import json
import pytest

from diffusion.cli.plot import main as plot_main
from diffusion.evaluation.run_plot import plot_training, read_training_curves, training_figure

# A run logged every 2 steps, evaluated every 4, skipped step 3, was killed after step 6 and resumed from its
# step-4 checkpoint: steps 5-6 are logged twice and the later records win.
RECORDS = [
    {"step": 0, "eval_loss": 8.3, "eval_ppl_bound": 4000.0},
    {"step": 2, "loss": 8.0, "lr": 1e-3, "tokens_per_s": 900.0, "tokens_seen": 64, "grad_norm": 1.0},
    {"step": 3, "skipped": True, "skipped_steps": 1, "loss": float("nan"), "grad_norm": float("inf")},
    {"step": 4, "loss": 7.5, "lr": 9e-4, "tokens_per_s": 1000.0, "tokens_seen": 96, "grad_norm": 1.1},
    {"step": 4, "eval_loss": 7.9, "eval_ppl_bound": 2700.0},
    {"step": 6, "loss": 7.4, "lr": 8e-4, "tokens_per_s": 1100.0, "tokens_seen": 160, "grad_norm": 1.2},
    # resumed from step 4: step 6 again (bit-exact resume, another machine speed), then on
    {"step": 6, "loss": 7.4, "lr": 8e-4, "tokens_per_s": 700.0, "tokens_seen": 160, "grad_norm": 1.2},
    {"step": 8, "loss": 7.0, "lr": 7e-4, "tokens_per_s": 1200.0, "tokens_seen": 224, "grad_norm": 1.3},
    {"step": 8, "eval_loss": 7.6, "eval_ppl_bound": 2000.0},
]


def _write(folder, records=RECORDS):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_curves_keep_each_step_once_the_later_record_winning_and_mark_skipped_steps(tmp_path):
    curves = read_training_curves(_write(tmp_path / "run") / "metrics.jsonl")
    assert curves.loss == ([2, 4, 6, 8], [8.0, 7.5, 7.4, 7.0])
    assert curves.eval_loss == ([0, 4, 8], [8.3, 7.9, 7.6])
    assert curves.tokens_per_s == ([2, 4, 6, 8], [900.0, 1000.0, 700.0, 1200.0])
    assert curves.lr == ([2, 4, 6, 8], [1e-3, 9e-4, 8e-4, 7e-4])
    assert curves.skipped_steps == [3]


def test_the_figure_draws_exactly_the_files_values(tmp_path):
    curves = read_training_curves(_write(tmp_path / "run") / "metrics.jsonl")
    figure = training_figure(curves)
    loss_axis, speed_axis, lr_axis = figure.axes
    drawn = {line.get_label(): line.get_xydata().tolist() for line in loss_axis.lines}
    assert drawn["training (window mean)"] == [[2, 8.0], [4, 7.5], [6, 7.4], [8, 7.0]]
    assert drawn["held out"] == [[0, 8.3], [4, 7.9], [8, 7.6]]
    assert [x for x, _ in drawn["skipped step (non-finite)"]] == [3]
    assert speed_axis.lines[0].get_xydata().tolist() == [[2, 900.0], [4, 1000.0], [6, 700.0], [8, 1200.0]]
    assert lr_axis.lines[0].get_xydata().tolist() == [[2, 1e-3], [4, 9e-4], [6, 8e-4], [8, 7e-4]]


def test_ddlm_plot_writes_the_training_png_and_redraws_the_calls_picture(tmp_path, capsys):
    run = _write(tmp_path / "run")
    rows = [{"label": "ancestral", "calls": c, "gen_ppl": 900.0 / c, "unigram_entropy": 5.0, "budget": c}
            for c in (4, 16)]
    (run / "quality_vs_calls.json").write_text(json.dumps({"model": "m", "length": 32, "num_samples": 2,
                                                           "rows": rows, "real_text": None}))
    assert plot_main([str(run)]) == 0
    out = capsys.readouterr().out
    for name in ("training.png", "quality_vs_calls.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"wrote {run / name}" in out
    assert not list(run.glob("*.tmp.png"))


@pytest.mark.parametrize("content, match", [
    (None, "no metrics file"),
    ('{"step": 1, "loss": 2.0}\nnot json\n', r"metrics.jsonl:2 is not JSON"),
    ('{"loss": 2.0}\n', r"metrics.jsonl:1 has no integer 'step'"),
    ('{"step": 1, "skipped": true}\n', "holds no training or held-out loss"),
])
def test_bad_metrics_files_are_named(tmp_path, content, match):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        plot_training(run)


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    run = _write(tmp_path / "run")
    for args, expected in (([str(tmp_path / "nowhere")], "does not exist"),
                           ([str(run), "--out", str(tmp_path / "a.jpg")], "must end in .png"),
                           ([str(run), "--calls", str(tmp_path / "none.json")], "--calls")):
        assert plot_main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("ddlm-plot: error: ") and expected in err and len(err.strip().splitlines()) == 1, err
