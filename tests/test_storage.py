"""storage.py: appends on a local disk and on Cloud Storage (a local emulator), and the metrics
history that uses them."""
import json
import os

import pytest
from etils import epath

import storage
import train_pretrain


@pytest.fixture(params=["local", "gs"])
def place(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return f"gs://{request.getfixturevalue('gcs')}/storage-{os.getpid()}-{request.node.name.split('[')[0]}"


def test_append_bytes_adds_to_the_end_and_leaves_no_part_behind(place):
    path = f"{place}/log.jsonl"
    storage.append_bytes(path, b"first\n")
    storage.append_bytes(path, b"second\n")
    storage.append_bytes(path, b"third\n")
    assert epath.Path(path).read_bytes() == b"first\nsecond\nthird\n"
    assert [p.name for p in epath.Path(place).iterdir()] == ["log.jsonl"]


def test_the_metrics_history_gets_only_the_new_lines_at_each_checkpoint(place, tmp_path, monkeypatch):
    """At 1.3B a run writes metrics for weeks: each checkpoint adds the lines since the last one to
    the copy beside the checkpoints instead of uploading the whole file again."""
    history = f"{place}/checkpoints/metrics.jsonl"
    epath.Path(history).parent.mkdir(parents=True, exist_ok=True)
    whole_writes, real = [], storage.write_atomically
    monkeypatch.setattr(storage, "write_atomically", lambda path, write: (whole_writes.append(path), real(path, write)))
    local = tmp_path / "run" / "metrics.jsonl"
    metrics = train_pretrain.Metrics(str(local), True, history=history)
    for step in range(1, 31):
        metrics.write(step=step, loss=1.0 / step)
        if step % 10 == 0:
            metrics.save_history()
    metrics.close()
    assert whole_writes == [history]  # the first checkpoint's copy; then appends
    assert epath.Path(history).read_bytes() == local.read_bytes()
    assert [json.loads(line)["step"] for line in local.read_text().splitlines()] == list(range(1, 31))

    # Process 0 on another worker: the history replaces the missing local file, and appends go on.
    moved = tmp_path / "elsewhere" / "metrics.jsonl"
    metrics = train_pretrain.Metrics(str(moved), True, history=history)
    metrics.write(step=31, loss=0.5)
    metrics.save_history()
    metrics.close()
    assert epath.Path(history).read_bytes() == moved.read_bytes()
    assert [json.loads(line)["step"] for line in moved.read_text().splitlines()] == list(range(1, 32))
