"""Quality against network calls (samplers/sweep.py, ``ddlm-eval calls``): the calls each sampler really spends,
scores equal to scoring the same samples directly, and the JSON and picture it writes."""

from __future__ import annotations

import json

import pytest
import torch

from diffusion import DiffusionSpec
from diffusion.evaluation.autoregressive import build_causal_lm
from diffusion.evaluation.sample_quality import generative_perplexity, unigram_entropy
from samplers import FREE, get_sampler
from samplers.sweep import SweepEntry, default_entries, sweep

LENGTH = 8


@pytest.fixture(scope="module")
def reference_dir(model_dir):
    from diffusion.data import load_tokenizer

    tokenizer = load_tokenizer("builtin")
    folder = model_dir.parent / "ar"
    torch.manual_seed(1)
    build_causal_lm(vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2,
                    max_positions=32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _load(model_dir, reference_dir):
    from diffusion.cli.loading import load_model_for

    model, _, _ = load_model_for(str(model_dir))
    reference, _, _ = load_model_for(str(reference_dir))
    return model.eval(), reference.eval()


def test_each_row_spends_the_calls_its_sampler_reports_and_scores_its_own_samples(model_dir, reference_dir):
    model, reference = _load(model_dir, reference_dir)
    entries = default_entries(DiffusionSpec.from_config(model.config))
    assert [e.sampler for e in entries] == ["ancestral", "remdm", "remask", "threshold", "remask", "ardm"]
    rows = sweep(model, reference, entries=entries, budgets=[4, 8, 16], length=LENGTH, num_samples=3, batch_size=2,
                 seed=5)
    by = {(row["label"], row["budget"]): row for row in rows}
    assert ("ARDM plan", 16) not in by and len(rows) == 6 * 3 - 1  # ARDM plans at most one call per position
    for k in (4, 8):
        assert by[("ARDM plan", k)]["calls"] == k and by[("remask (low confidence)", k)]["calls"] == k
    assert by[("remask (low confidence)", 16)]["calls"] == LENGTH  # one token per call at most: L calls
    assert by[("ReMDM loop (eta 0.02)", 16)]["calls"] == 16  # the loop spends calls past L
    assert all(row["calls"] <= row["budget"] for row in rows)

    # a row's scores are those of the samples the sampler draws from the same seed, in the same batches
    again = [get_sampler("remdm", schedule="loop", eta=0.02).generate(
        model, canvas=torch.full((size, LENGTH), FREE), num_steps=8, generator=generator).tokens
        for generator in [torch.Generator().manual_seed(5)] for size in (2, 1)]
    tokens = torch.cat(again)
    row = by[("ReMDM loop (eta 0.02)", 8)]
    assert row["gen_ppl"] == pytest.approx(generative_perplexity(tokens, reference)["gen_ppl"], rel=1e-12)
    assert row["unigram_entropy"] == pytest.approx(unigram_entropy(tokens), rel=1e-12)


def test_sweep_refuses_bad_budgets_and_options_before_sampling(model_dir, reference_dir):
    model, reference = _load(model_dir, reference_dir)
    seen = []
    with pytest.raises(ValueError, match="eta must be in"):  # the second entry's options fail before the first samples
        sweep(model, reference, entries=[SweepEntry("a", "ancestral"), SweepEntry("r", "remdm", {"eta": 2.0})],
              budgets=[2], length=4, num_samples=1, batch_size=1, on_row=seen.append)
    assert seen == []
    for budgets in ([0], [2, -1], [True]):
        with pytest.raises(ValueError, match="budgets must be positive ints"):
            sweep(model, reference, entries=[SweepEntry("a", "ancestral")], budgets=budgets, length=4, num_samples=1,
                  batch_size=1)


def test_eval_calls_writes_the_rows_and_the_picture(model_dir, reference_dir, tmp_path, capsys):
    from matplotlib.image import imread

    from samplers.cli.evaluate import main

    out = tmp_path / "pic"
    assert main(["calls", "--model", str(model_dir), "--reference", str(reference_dir), "--calls", "2", "4",
                 "--samplers", "ancestral", "ardm", "--num-samples", "2", "--length", str(LENGTH), "--out", str(out),
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((tmp_path / "pic.json").read_text())
    assert printed == stored and [(r["sampler"], r["budget"]) for r in stored["rows"]] == [
        ("ancestral", 2), ("ancestral", 4), ("ardm", 2), ("ardm", 4)]
    image = imread(tmp_path / "pic.png")
    assert image.shape[:2] == (462, 1210) and float(image.std()) > 0.05  # 11 x 4.2 inches at 110 dpi, not blank
    assert main(["calls", "--model", str(model_dir), "--reference", str(reference_dir), "--calls", "0"]) == 2
    assert "--calls must all be >= 1, got [0]" in capsys.readouterr().err
    assert main(["calls", "--model", str(model_dir), "--reference", str(reference_dir), "--samplers", "euler",
                 "--out", str(out)]) == 2
    assert "--samplers ['euler'] are not in this model's set" in capsys.readouterr().err
    assert main(["calls", "--model", str(model_dir), "--reference", str(reference_dir),
                 "--out", str(tmp_path / "missing" / "pic")]) == 2
    assert "the folder" in capsys.readouterr().err
    assert main(["calls", "--model", str(model_dir), "--reference", str(reference_dir), "--real-text",
                 "--out", str(out)]) == 2
    assert "has no record of its data" in capsys.readouterr().err
