"""Data: packing, splits, the built-in corpus and tokenizer, deterministic batches."""

import json

import pytest
import torch

from diffusion.data.corpus import builtin_corpus, clean_play
from diffusion.data import (
    BlockBatches,
    StreamingBlockBatches,
    build_blocks,
    load_texts,
    load_tokenizer,
    pack,
)


def test_pack_keeps_every_token_once_in_order():
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 50, (int(n),), generator=gen).tolist() for n in torch.randint(0, 40, (30,), generator=gen)]
    stream = [tok for doc in docs for tok in doc + [0]]
    blocks = list(pack(docs, 16, separator_id=0))
    assert all(len(b) == 16 for b in blocks)
    flat = [tok for b in blocks for tok in b]
    assert flat == stream[: len(flat)]
    assert len(stream) - len(flat) < 16  # only the incomplete tail is dropped


def test_builtin_tokenizer_round_trips_the_corpus():
    tokenizer = load_tokenizer("builtin")
    assert len(tokenizer) == 4097
    assert tokenizer.mask_token_id == 4096 and tokenizer.eos_token_id == 0
    corpus = builtin_corpus("shakespeare")
    for text in corpus["validation"] + corpus["train"][:2]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert 4096 not in ids
        assert tokenizer.decode(ids) == text
    assert len(tokenizer("Fair is foul, and foul is fair")["input_ids"]) < 12  # real merges, not bytes


def test_builtin_corpus_splits_are_whole_disjoint_plays():
    corpus = builtin_corpus("shakespeare")
    assert len(corpus["train"]) == 9 and len(corpus["validation"]) == 2
    assert 1_000_000 < sum(len(d) for d in corpus["train"]) < 1_300_000
    speeches_train = {s for d in corpus["train"] for s in d.split("\n\n") if len(s) > 200}
    speeches_valid = {s for d in corpus["validation"] for s in d.split("\n\n") if len(s) > 200}
    assert speeches_valid and not speeches_train & speeches_valid
    assert corpus["validation"][0].startswith("First Witch:\nWhen shall we three meet again")


def test_clean_play_drops_markup():
    markdown = "# Play\n\n## ACT I\n\n_Enter A and B,\nwith others_\n\n**A**  \nHello there,  \nfriend. _Aside_\n\n**B**  \nHail!\n"
    assert clean_play(markdown) == "A:\nHello there,\nfriend.\n\nB:\nHail!\n"


def test_local_text_files_hold_out_whole_documents(tmp_path):
    docs = [f"document number {i}\nwith two lines" for i in range(20)]
    for i, doc in enumerate(docs):
        (tmp_path / f"{i:02d}.txt").write_text(doc)
    splits = load_texts(str(tmp_path), valid_fraction=0.2, seed=3)
    assert len(splits["validation"]) == 4
    assert sorted(splits["train"] + splits["validation"]) == sorted(docs)
    assert not set(splits["train"]) & set(splits["validation"])
    assert load_texts(str(tmp_path), valid_fraction=0.2, seed=3) == splits  # deterministic


def test_local_jsonl_and_bad_column(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"row {i}"}) for i in range(10)))
    splits = load_texts(str(path), text_column="body", valid_fraction=0.1)
    assert len(splits["train"]) == 9 and len(splits["validation"]) == 1
    with pytest.raises(ValueError, match=r"data.jsonl: row 1 has no 'text' field \(its fields: \['body'\]\)"):
        load_texts(str(path))
    with pytest.raises(FileNotFoundError, match="dataset path does not exist"):
        load_texts("./no/such/file.txt")
    with pytest.raises(ValueError, match="unknown built-in corpus"):
        load_texts("builtin:poe")


def test_tokenizer_without_mask_gets_one_appended(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate("abcdefgh ")}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.mask_token_id == len(tokenizer) - 1 == 10  # EOS added at 9, then MASK
    assert tokenizer.eos_token_id == 9


def test_block_batches_visit_each_block_once_per_epoch_and_are_pure():
    blocks = torch.arange(40).reshape(10, 4)
    batches = BlockBatches(blocks, seed=1)
    epoch = torch.cat([batches.batch(step, 5) for step in range(2)])
    assert sorted(epoch[:, 0].tolist()) == list(range(0, 40, 4))
    fresh = BlockBatches(blocks, seed=1)
    assert torch.equal(fresh.batch(7, 3), batches.batch(7, 3))
    assert not torch.equal(BlockBatches(blocks, seed=2).batch(0, 5), batches.batch(0, 5))


def test_streaming_batches_resume_where_they_stopped():
    tokenizer = load_tokenizer("builtin")
    texts = builtin_corpus("shakespeare")["validation"]
    stream = StreamingBlockBatches(lambda: iter(texts), tokenizer, 32, num_shards=1)
    sequential = [stream.local_rows(4) for _ in range(6)]
    assert stream.positions == [24]
    resumed = StreamingBlockBatches(lambda: iter(texts), tokenizer, 32, num_shards=1, positions=[20])
    assert torch.equal(resumed.local_rows(4), sequential[5])
    assert torch.equal(torch.cat(sequential)[:8], build_blocks(texts, tokenizer, 32)[:8])  # one shard: plain packing


def test_block_batches_by_position_do_not_depend_on_the_batch_size():
    batches = BlockBatches(torch.arange(40).reshape(10, 4), seed=3)
    by_eight = torch.cat([batches.batch_at(8 * k, 8) for k in range(3)])
    by_mixed = torch.cat([batches.batch_at(0, 8), batches.batch_at(8, 4), batches.batch_at(12, 12)])
    assert torch.equal(by_eight, by_mixed)  # a resume with another global batch continues the same sequence


def test_a_prepared_dataset_holds_exactly_the_blocks_of_in_memory_packing(tmp_path):
    from diffusion.data.prepare import load_prepared, prepare_dataset

    tokenizer = load_tokenizer("builtin")
    texts = load_texts("builtin:shakespeare")
    folder = prepare_dataset(tmp_path / "prepared", dataset="builtin:shakespeare", tokenizer=tokenizer, seq_len=64,
                             num_proc=2)
    splits = load_prepared(folder, tokenizer=tokenizer, seq_len=64)
    for name in ("train", "validation"):
        assert torch.equal(splits[name].long(), build_blocks(texts[name], tokenizer, 64)), name
    with pytest.raises(ValueError, match="holds blocks of seq_len=64, the run asks for seq_len=32"):
        load_prepared(folder, tokenizer=tokenizer, seq_len=32)
    other = load_tokenizer("builtin")
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="was tokenized with another tokenizer .*4097 tokens.*4098 tokens"):
        load_prepared(folder, tokenizer=other, seq_len=64)


def test_training_reads_a_prepared_dataset_and_refuses_another_tokenizer(tmp_path):
    from diffusion.cli.prepare import main as prepare
    from diffusion.training import TrainConfig, train

    assert prepare(["--dataset", "builtin:shakespeare", "--seq-len", "32", "--output", str(tmp_path / "p")]) == 0
    config = dict(output_dir=str(tmp_path / "run"), dataset=str(tmp_path / "p"), seq_len=32, hidden_size=32,
                  num_layers=1, num_heads=2, cond_dim=16, batch_size=4, max_steps=2, eval_every=0, eval_blocks=4,
                  save_every=0, progress=False, precision="no", max_position_embeddings=64)
    assert train(TrainConfig(**config)).step == 2
    from rl.tasks import char_tokenizer

    char_tokenizer().save_pretrained(tmp_path / "tok")  # another tokenizer, its mask token last as well
    with pytest.raises(ValueError, match="was tokenized with another tokenizer .*4097 tokens.*13 tokens"):
        train(TrainConfig(**{**config, "tokenizer": str(tmp_path / "tok"), "output_dir": str(tmp_path / "run2")}))


def test_streaming_shards_resume_with_another_number_of_processes_without_repeating_a_block():
    from datasets import Dataset

    from diffusion.data import StreamingBlockBatches

    tokenizer = load_tokenizer("builtin")
    docs = [f"document {i}: " + "word " * (20 + i % 7) for i in range(60)]
    stream = Dataset.from_dict({"text": docs}).to_iterable_dataset(num_shards=4)

    def run(world: int, steps: int, rows: int, positions=None) -> tuple[list[list[int]], list[int]]:
        ranks = [StreamingBlockBatches(lambda: stream, tokenizer, 8, num_shards=4, rank=r, world_size=world,
                                       positions=positions) for r in range(world)]
        taken = [row for _ in range(steps) for part in ranks for row in part.local_rows(rows).tolist()]
        combined = [sum(part.positions[j] for part in ranks if j in part.owned) for j in range(4)]
        return taken, combined

    everything = {j: [] for j in range(4)}  # each shard's blocks, in order, from one uninterrupted reader
    for j in range(4):
        single = StreamingBlockBatches(lambda: stream, tokenizer, 8, num_shards=4, rank=j, world_size=4)
        everything[j] = single.local_rows(6).tolist()
    first, positions = run(world=2, steps=2, rows=2)  # two ranks take 8 blocks
    second, final = run(world=1, steps=4, rows=2, positions=positions)  # one process goes on
    assert positions == [2, 2, 2, 2] and final == [4, 4, 4, 4]
    expected = sorted(row for j in range(4) for row in everything[j][:4])
    assert sorted(first + second) == expected  # every block of every shard exactly once: none repeated or skipped
