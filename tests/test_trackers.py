"""--report-to: TensorBoard and W&B (offline) receive the same scalars as metrics.jsonl."""

import json
import math

import pytest

from diffusion.training import train
from diffusion.training.config import TrainConfig


def _run(tmp_path, report_to):
    config = TrainConfig(output_dir=str(tmp_path / "run"), seq_len=32, hidden_size=32, num_layers=1, num_heads=2,
                         cond_dim=16, batch_size=4, max_steps=6, warmup_steps=2, lr=3e-3, eval_every=3,
                         eval_blocks=8, eval_batch_size=8, log_every=2, save_every=0, precision="no",
                         progress=False, max_position_embeddings=64, report_to=report_to)
    train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = {}
    for record in records:
        for key, value in record.items():
            if key != "step":
                expected[(key, record["step"])] = float(value)
    assert len(expected) == 5 * 3 + 3 * 3  # 3 training records of 5 scalars, 3 held-out records of 3 (nats, ppl, bits/byte)
    return expected


def _leveldb_records(data: bytes):
    """The records of a W&B ``.wandb`` file: a 7-byte header, then LevelDB log records (crc32, length, type) in
    32 KiB blocks; a record split across blocks comes as FIRST, MIDDLE..., LAST."""
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        length = int.from_bytes(data[position + 4:position + 6], "little")
        kind = data[position + 6]
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def test_tensorboard_event_file_holds_the_metrics_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    expected = _run(tmp_path, "tensorboard")
    logged = {}
    for events in (tmp_path / "run").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                logged[(tag, event.step)] = event.value
    assert logged.keys() == expected.keys()
    for key, value in expected.items():
        assert math.isclose(logged[key], value, rel_tol=1e-6), key  # event files hold float32


def test_wandb_offline_run_holds_the_metrics_scalars(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is in the dev extra")
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    expected = _run(tmp_path, "wandb")
    # run.finish() returns once the run's exit is handled, but the W&B service may still hold the tail of the
    # run file in its write buffer (seen on a loaded CI machine: a file with no history at all). teardown()
    # stops the service, which closes the file; the exit record below proves the file is whole.
    wandb.teardown()
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    logged, kinds = {}, set()
    for data in _leveldb_records(run_file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kinds.add(record.WhichOneof("record_type"))
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = items.pop("_step")
            logged.update({(key, step): value for key, value in items.items() if not key.startswith("_")})
    assert "exit" in kinds
    assert logged == expected
