"""Your own corpus end to end: a tokenizer trained on the run's training documents, the run's held-out split
recorded and scored again by ddlm-eval, and the autoregressive baseline sampled by ddlm-generate."""

import json
import math
import shutil

import pytest
import torch

from diffusion.data import build_blocks, load_tokenizer
from diffusion.data.loading import held_out_ids, load_split
from diffusion.data.split_record import SPLIT_FILE
from diffusion.data.tokenizer import train_tokenizer
from diffusion.evaluation.held_out import bits_per_byte, evaluation_data, scored_bytes, spread_blocks
from diffusion.training import train
from diffusion.training.config import TrainConfig

NUM_DOCS, FRACTION, SEED = 40, 0.05, 1
UNIQUE = "Zanzibarquoxel"  # only in the held-out documents


def _documents() -> list[str]:
    plays = load_split("builtin:shakespeare").train
    text = "\n".join(plays[:2])
    docs = [text[i * 1500 : (i + 1) * 1500] for i in range(NUM_DOCS)]
    for i in held_out_ids(NUM_DOCS, FRACTION, SEED):
        docs[i] = docs[i] + (" " + UNIQUE) * 40
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in _documents()))
    return path


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(output_dir=str(out), dataset=str(corpus), seed=SEED, valid_fraction=FRACTION,
                         tokenizer="train:1000", hidden_size=32, num_layers=1, num_heads=2, seq_len=32, batch_size=4,
                         max_steps=2, warmup_steps=1, eval_every=0, eval_blocks=4, save_every=1, progress=False,
                         precision="no")  # one Accelerator state per test process: every test trains in fp32
    train(config)
    return out


def _eval(capsys, *args):
    from samplers.cli.evaluate import main

    code = main(["ppl", "--num-points", "2", "--max-blocks", "1000", "--json", *map(str, args)])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err


def test_bits_per_byte_is_nats_per_token_times_tokens_over_bytes():
    tokenizer = load_tokenizer("builtin")
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    blocks = torch.tensor([ids + [tokenizer.eos_token_id]])
    tokens, num_bytes = scored_bytes(blocks, tokenizer)
    assert (tokens, num_bytes) == (len(ids) + 1, len(text.encode("utf-8")))  # EOS is a token with no bytes
    nats = 3.217
    expected = nats * tokens / num_bytes / math.log(2.0)
    assert bits_per_byte(nats, tokens, num_bytes) == pytest.approx(expected, rel=1e-15)
    assert scored_bytes(blocks, tokenizer, skip_first=True)[0] == len(ids)  # a causal LM scores L - 1


def test_the_builtin_held_out_blocks_span_both_plays():
    assert spread_blocks(10, 4).tolist() == [0, 2, 5, 7] and spread_blocks(3, 8).tolist() == [0, 1, 2]
    data = evaluation_data("nowhere", load_tokenizer("builtin"), 64, 64, dataset="builtin:shakespeare",
                           split="validation")
    assert data.num_documents == 2 and data.documents_scored == 2
    assert data.blocks_available > 256 and len(data.blocks) == 64
    assert "2 documents, 64 of" in data.description
    first_play_blocks = len(build_blocks(load_split("builtin:shakespeare").validation[:1], load_tokenizer("builtin"), 64))
    whole = build_blocks(load_split("builtin:shakespeare").validation, load_tokenizer("builtin"), 64)
    assert torch.equal(data.blocks, whole[spread_blocks(len(whole), 64)])
    assert int(spread_blocks(len(whole), 64)[-1]) > first_play_blocks  # the last blocks are Twelfth Night's


def test_the_trained_tokenizer_round_trips_holds_mask_last_and_never_saw_the_held_out_split(corpus, run):
    tokenizer = load_tokenizer(str(run / "final"))
    assert len(tokenizer) == 1001 and tokenizer.mask_token_id == len(tokenizer) - 1
    for doc in _documents():
        assert tokenizer.decode(tokenizer(doc, add_special_tokens=False)["input_ids"]) == doc
    assert len(tokenizer(" " + UNIQUE, add_special_tokens=False)["input_ids"]) > 1
    leaked = train_tokenizer(_documents(), 1000)  # the same training with the held-out documents in it
    assert len(leaked(" " + UNIQUE, add_special_tokens=False)["input_ids"]) == 1
    again = train_tokenizer(load_split(str(corpus), valid_fraction=FRACTION, seed=SEED).train, 1000)
    assert again.get_vocab() == tokenizer.get_vocab()  # deterministic: a resumed run could retrain it identically
    resumed = load_tokenizer(str(next((run / "checkpoints").iterdir()) / "tokenizer"))
    assert resumed.get_vocab() == tokenizer.get_vocab()


def test_the_trained_tokenizer_travels_with_the_hub_export(run, tmp_path):
    from diffusion.hub import export_for_hub

    folder = tmp_path / "export"
    export_for_hub(run / "final", folder)
    assert load_tokenizer(str(folder)).get_vocab() == load_tokenizer(str(run / "final")).get_vocab()


def test_eval_scores_exactly_the_runs_held_out_documents_and_names_them(corpus, run, capsys):
    record = json.loads((run / "final" / SPLIT_FILE).read_text())
    ids = held_out_ids(NUM_DOCS, FRACTION, SEED)
    assert record["held_out_ids"] == ids != held_out_ids(NUM_DOCS, FRACTION, 0)  # the run's seed, not 0
    code, result, err = _eval(capsys, "--model", run / "final")
    assert code == 0, err
    assert result["document_ids"] == ids and result["num_documents"] == len(ids) == result["documents_scored"]
    assert str(corpus) in result["data"] and "held-out" in result["data"] and "seed 1" in result["data"]
    assert result["warnings"] == [] and "warning" not in err
    held_out = [_documents()[i] for i in ids]
    tokenizer = load_tokenizer(str(run / "final"))
    blocks = build_blocks(held_out, tokenizer, 32)
    assert result["num_sequences"] == len(blocks)
    text_bytes = sum(len(d.encode("utf-8")) for d in held_out)  # the packing drops less than a block at the end
    assert text_bytes - 32 * 16 <= result["bytes_scored"] <= text_bytes
    tokens = result["num_sequences"] * 32  # a diffusion model scores every position
    assert result["bits_per_byte"] == pytest.approx(
        result["nats_per_token"] * tokens / result["bytes_scored"] / math.log(2), rel=1e-12)
    code, by_split, err = _eval(capsys, "--model", run / "final", "--dataset", corpus, "--split", "validation")
    assert code == 0 and by_split["document_ids"] == ids and by_split["nats_per_token"] == result["nats_per_token"]
    assert "training documents" not in err  # the run's own fraction and seed are used for its own data
    code, _, err = _eval(capsys, "--model", run / "final", "--split", "train")
    assert code == 2 and "--split train needs --dataset" in err


def test_eval_warns_when_the_data_overlap_the_runs_training_documents(corpus, run, capsys, tmp_path):
    code, result, err = _eval(capsys, "--model", run / "final", "--dataset", corpus)
    assert code == 0 and result["num_documents"] == NUM_DOCS
    assert f"{NUM_DOCS - 2} of the {NUM_DOCS} documents scored are training documents of this run" in err
    clean = tmp_path / "held_out.jsonl"
    clean.write_text("".join(json.dumps({"text": _documents()[i]}) + "\n"
                             for i in held_out_ids(NUM_DOCS, FRACTION, SEED)))
    code, result, err = _eval(capsys, "--model", run / "final", "--dataset", clean)
    assert code == 0 and result["num_documents"] == 2 and "training documents" not in err


def test_eval_refuses_a_model_without_a_record_and_data_that_changed(corpus, run, capsys, tmp_path):
    lone = tmp_path / "lone"
    shutil.copytree(run / "final", lone)
    (lone / SPLIT_FILE).unlink()
    code, _, err = _eval(capsys, "--model", lone)
    assert code == 2 and "no record of its data" in err and len(err.strip().splitlines()) == 1
    moved = tmp_path / "moved"
    shutil.copytree(run / "final", moved)
    record = json.loads((moved / SPLIT_FILE).read_text())
    changed = tmp_path / "changed.jsonl"
    changed.write_text(corpus.read_text().replace("the", "thee"))
    (moved / SPLIT_FILE).write_text(json.dumps({**record, "dataset": str(changed)}))
    code, _, err = _eval(capsys, "--model", moved)
    assert code == 2 and "no longer holds the documents" in err


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    from diffusion.evaluation.autoregressive import build_causal_lm

    folder = tmp_path_factory.mktemp("ar")
    tokenizer = load_tokenizer("builtin")
    torch.manual_seed(0)
    model = build_causal_lm(vocab_size=len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, max_positions=64,
                            tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("stop_at_eos", [False, True])
def test_generate_samples_the_ar_baseline_as_transformers_generate_does(baseline, capsys, stop_at_eos):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from samplers.cli.generate import main

    length_flag = "--max-length" if stop_at_eos else "--length"
    code = main(["--model", str(baseline), "--prompt", "To be", length_flag, "12", "--num-samples", "3",
                 "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9", "--seed", "5", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["sampler"] == "autoregressive"
    tokenizer = load_tokenizer(str(baseline))
    eos = tokenizer.eos_token_id
    prompt = torch.tensor([tokenizer("To be", add_special_tokens=False)["input_ids"]] * 3)
    model = AutoModelForCausalLM.from_pretrained(baseline).eval()
    model.generation_config.eos_token_id = eos if stop_at_eos else None  # the setting: stop at EOS or not
    torch.manual_seed(5)
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=GenerationConfig(
        do_sample=True, temperature=0.8, top_k=50, top_p=0.9, max_new_tokens=12, pad_token_id=eos,
        eos_token_id=eos if stop_at_eos else None)).tolist()
    for sample, row in zip(out["samples"], expected):
        if stop_at_eos and eos in row[prompt.shape[1]:]:
            row = row[: row.index(eos, prompt.shape[1]) + 1]
        assert sample["tokens"] == row[: prompt.shape[1] + 12]
        assert sample["text"] == tokenizer.decode(sample["tokens"], skip_special_tokens=True)


def test_a_causal_lm_where_a_diffusion_model_is_needed_is_one_line(baseline, capsys):
    from samplers.cli.generate import main

    assert main(["--model", str(baseline), "--suffix", "end"]) == 2
    err = capsys.readouterr().err
    assert "is a causal LM (LlamaForCausalLM)" in err and "--suffix" in err and len(err.strip().splitlines()) == 1
    from diffusion.cli.loading import load_denoiser_for

    with pytest.raises(ValueError, match=r"LlamaForCausalLM \(a causal LM\), which cannot denoise.*ddlm-generate samples"):
        load_denoiser_for(str(baseline))


def test_without_max_length_a_causal_lm_samples_past_eos_and_with_it_stops_there():
    from diffusion.evaluation.autoregressive import build_causal_lm
    from samplers.autoregressive import sample_autoregressive

    torch.manual_seed(0)
    model = build_causal_lm(vocab_size=8, hidden_size=16, num_layers=1, num_heads=2, max_positions=64,
                            eos_token_id=0).eval()  # its generation config says EOS = 0
    model.lm_head.weight.data.zero_()  # uniform over 8 tokens: EOS is drawn often
    prompt = torch.full((4, 1), 3)
    tokens, lengths = sample_autoregressive(model, prompt, 20, seed=1, eos_id=0)
    assert lengths.tolist() == [20] * 4
    assert any(0 in row[1:-1] and row[row.index(0, 1) + 1] != 0 for row in tokens.tolist())  # past an EOS
    stopped, stop_lengths = sample_autoregressive(model, prompt, 20, seed=1, eos_id=0, stop_at_eos=True)
    for row, cut, full in zip(stopped.tolist(), stop_lengths.tolist(), tokens.tolist()):
        assert row[: 1 + cut] == full[: 1 + cut] and row[cut] == 0 and set(row[1 + cut :]) <= {0}
    assert model.generation_config.eos_token_id == 0  # the model's own config is left as it was


def test_a_resumed_run_reuses_its_tokenizer_and_refuses_changed_data(corpus, tmp_path, monkeypatch):
    import diffusion.training.run_data as run_data

    data = tmp_path / "docs.jsonl"
    shutil.copyfile(corpus, data)
    config = dict(output_dir=str(tmp_path / "run"), dataset=str(data), seed=SEED, valid_fraction=FRACTION,
                  tokenizer="train:400", hidden_size=32, num_layers=1, num_heads=2, seq_len=32, batch_size=4,
                  max_steps=2, warmup_steps=1, eval_every=0, eval_blocks=4, save_every=1, progress=False,
                  precision="no")
    train(TrainConfig(**config, stop_after_steps=1))
    trained = load_tokenizer(str(tmp_path / "run" / "tokenizer")).get_vocab()

    def no_retraining(*args, **kwargs):
        raise AssertionError("a resumed run must not train its tokenizer again")

    monkeypatch.setattr(run_data, "train_tokenizer", no_retraining)
    data.write_text(corpus.read_text().replace("the", "thee"))  # the same file, edited between start and resume
    with pytest.raises(ValueError, match="differ from those the run started with"):
        train(TrainConfig(**config, resume="auto"))
    shutil.copyfile(corpus, data)
    result = train(TrainConfig(**config, resume="auto"))
    assert load_tokenizer(str(result.final_dir)).get_vocab() == trained


def test_a_plain_text_file_is_cut_into_paragraphs_and_trains(tmp_path, capsys):
    from samplers.cli.evaluate import main as evaluate
    from samplers.cli.train import main

    plays = load_split("builtin:shakespeare").train[0]
    text = plays[:30000]  # speeches separated by blank lines
    path = tmp_path / "my.txt"
    path.write_text(text)
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert load_split(str(path), valid_fraction=0.05).held_out_ids is not None
    code = main(["--output-dir", str(tmp_path / "run"), "--dataset", str(path), "--valid-fraction", "0.05",
                 "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--seq-len", "32", "--batch-size", "4",
                 "--max-steps", "2", "--eval-every", "0", "--eval-blocks", "4", "--precision", "no", "--progress",
                 "false", "--num-samples", "0"])
    out = capsys.readouterr().out
    assert code == 0
    held = round(0.05 * len(paragraphs))
    assert f"data: {path}: {len(paragraphs):,} documents, held out {held} (held-out documents; .txt split by " \
           "paragraph)" in out
    assert evaluate(["ppl", "--model", str(tmp_path / "run/final"), "--num-points", "2", "--max-blocks", "4"]) == 0
    assert f"{held} documents" in capsys.readouterr().out  # the record's rule finds the same held-out paragraphs
    by_line = load_split(str(path), valid_fraction=0.05, text_split="line")
    assert len(by_line.train) + len(by_line.validation) == sum(1 for line in text.splitlines() if line.strip())


def test_text_in_another_encoding_is_refused_naming_the_file_and_the_byte_then_read_with_encoding(tmp_path, capsys):
    from samplers.cli.train import main

    path = tmp_path / "latin.txt"
    text = "Caf\u00e9 society.\n\nNa\u00efve art.\n\nD\u00e9j\u00e0 vu.\n"
    path.write_bytes(text.encode("latin-1"))
    code = main(["--output-dir", str(tmp_path / "run"), "--dataset", str(path), "--max-steps", "2", "--precision", "no"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{path}: not utf-8 text (byte 3 is b'\\xe9')" in err and "--encoding" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    split = load_split(str(path), valid_fraction=0.3, encoding="latin-1")
    assert sorted(split.train + split.validation) == sorted(["Caf\u00e9 society.", "Na\u00efve art.", "D\u00e9j\u00e0 vu."])
    with pytest.raises(ValueError, match="encoding must be a text encoding Python knows.*got encoding='klingon'"):
        TrainConfig(encoding="klingon")
