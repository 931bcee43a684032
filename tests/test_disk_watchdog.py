"""disk_watchdog.py on real directories, with thresholds set relative to the real free space."""
import json
import os
import shutil
import time

import pytest
from huggingface_hub import hf_hub_download

import disk_watchdog

MB = 1024 ** 2


def blob(path, mb):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\1" * (mb * MB))  # written, not sparse: deleting it frees real space
    return str(path)


@pytest.fixture
def layout(tmp_path, hub):
    """A worker's disk: a Hub cache, shard downloads (one in use), checkpoints (one being written),
    a symlink to checkpoints outside the root, and files outside the root."""
    root = tmp_path / "disk"
    hub.add_file("org/big-model", "weights.bin", b"\2" * (20 * MB))
    hf_hub_download("org/big-model", "weights.bin", cache_dir=str(root / "hf" / "hub"))
    scratch = root / "run" / "echo-shards-0-abc123"
    done_shard = blob(scratch / "shard-00001.tar", 20)
    in_use = blob(scratch / "shard-00002.tar", 20)
    held = open(in_use, "rb")
    ckpt = root / "run" / "checkpoints"
    for step in (100, 200, 300):
        blob(ckpt / f"step_{step:07d}.pkl", 6)
        blob(ckpt / f"step_{step:07d}.params.pkl", 2)
    writing = blob(ckpt / ".step_0000400.pkl.x1y2.tmp", 6)
    writer = open(writing, "ab")
    # The orbax layout: step directories with weights-only exports, a save under way, and the leftovers
    # of interrupted saves (untouched for an hour).
    orbax = root / "run" / "orbax"
    for step in (100, 200, 300):
        blob(orbax / f"step_{step:07d}" / "state" / "d" / "chunk", 3)
        blob(orbax / f"step_{step:07d}" / disk_watchdog.COMMIT_FILE, 0)
        blob(orbax / f"step_{step:07d}.params.pkl", 1)
    saving = blob(orbax / "step_0000400.orbax-checkpoint-tmp-77" / "state" / "d" / "chunk", 3)
    hour_ago = time.time() - 3600
    stale = [blob(orbax / "step_0000050.orbax-checkpoint-tmp-12" / "state" / "d" / "chunk", 3),
             blob(orbax / ".step_0000050.params.pkl.k3j.tmp", 1),
             blob(orbax / "step_0000060.unreadable-1790000000" / "state" / "d" / "chunk", 1)]
    for path in stale + [os.path.dirname(p) for p in stale]:
        os.utime(path, (hour_ago, hour_ago))
    outside = tmp_path / "outside"
    for step in (1, 2, 3):
        blob(outside / f"step_{step:07d}.pkl", 1)
    os.symlink(outside, root / "run" / "linked_checkpoints")
    (root / "run" / "old_shard_link.tar").symlink_to(outside / "step_0000001.pkl")
    yield {"root": root, "done_shard": done_shard, "in_use": in_use, "ckpt": ckpt, "writing": writing,
           "outside": outside, "metrics": tmp_path / "metrics.jsonl", "orbax": orbax, "saving": saving}
    held.close()
    writer.close()


def run(layout, capsys, extra_mb, *flags):
    free_gb = shutil.disk_usage(layout["root"]).free / 1024 ** 3
    code = disk_watchdog.main(["--paths", str(layout["root"]), "--once", "--min-free-gb",
                               str(free_gb + extra_mb / 1024), "--lock-file",
                               str(layout["outside"].parent / "wd.lock"),
                               "--metrics-file", str(layout["metrics"]), *flags])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return code, lines


def files(directory):
    return sorted(p for p in os.listdir(directory) if not p.startswith("."))


def test_frees_in_order_and_stops_when_there_is_enough(layout, capsys):
    code, lines = run(layout, capsys, 30)  # 30 MB short: the 20 MB cache entry, then one 20 MB shard
    assert code == 0
    deleted = [line for line in lines if line["event"] == "deleted"]
    assert [d["reason"].split(":")[0] for d in deleted] == ["Hub cache", "shard download the pipeline is done with"]
    assert deleted[0]["bytes"] >= 20 * MB and deleted[1]["path"] == layout["done_shard"]
    assert not [d for d in os.listdir(layout["root"] / "hf" / "hub") if d.startswith("models--")]  # via the cache API
    assert os.path.exists(layout["in_use"])  # the pipeline holds it open
    assert len(files(layout["ckpt"])) == 6  # enough was freed before the checkpoints


def test_never_deletes_what_it_must_not(layout, capsys):
    code, lines = run(layout, capsys, 10 ** 7, "--keep-checkpoints", "0")  # asks for 10 TB: everything allowed goes
    assert code == 0
    # The newest complete checkpoint (keep 0 still keeps one), with its weights-only file.
    assert files(layout["ckpt"]) == ["step_0000300.params.pkl", "step_0000300.pkl"]
    assert os.path.exists(layout["writing"])  # a checkpoint being written
    assert os.path.exists(layout["in_use"])  # a shard the pipeline has open
    assert files(layout["outside"]) == ["step_0000001.pkl", "step_0000002.pkl", "step_0000003.pkl"]
    assert os.path.islink(layout["root"] / "run" / "old_shard_link.tar")
    deleted = {d["path"] for d in lines if d["event"] == "deleted"}
    for step in (100, 200):  # a checkpoint and its weights-only file go together
        assert {str(layout["ckpt"] / f"step_{step:07d}.pkl"), str(layout["ckpt"] / f"step_{step:07d}.params.pkl")} \
            <= deleted
    assert all(d["bytes"] > 0 and d["reason"] for d in lines if d["event"] == "deleted")
    # Orbax: the newest step directory and its export stay, and the save under way; leftovers go.
    assert files(layout["orbax"]) == ["step_0000300", "step_0000300.params.pkl", "step_0000400.orbax-checkpoint-tmp-77"]
    assert os.path.exists(layout["saving"])
    assert str(layout["orbax"] / "step_0000100") in deleted and str(layout["orbax"] / "step_0000050.orbax-checkpoint-tmp-12") in deleted
    assert next(d for d in lines if d.get("path") == str(layout["orbax"] / "step_0000200"))["bytes"] == 3 * MB
    # Still below the (critical) threshold with nothing left: the dashboard hears of it, once.
    assert any(line["event"] == "disk_critical" for line in lines)
    events = [json.loads(line) for line in layout["metrics"].read_text().splitlines()]
    assert [e["event"] for e in events] == ["disk_critical"] and "nothing left" in events[0]["message"]


def test_dry_run_only_reports(layout, capsys):
    before = sorted(os.path.relpath(os.path.join(d, f), layout["root"]) for d, _, fs in os.walk(layout["root"])
                    for f in fs)
    code, lines = run(layout, capsys, 10 ** 7, "--dry-run")
    after = sorted(os.path.relpath(os.path.join(d, f), layout["root"]) for d, _, fs in os.walk(layout["root"])
                   for f in fs)
    assert code == 0 and before == after
    would = [line for line in lines if line["event"] == "would_delete"]
    # cache entry, done shard, three leftovers, pickle checkpoint 100 (keep 2) with its params file,
    # orbax checkpoint 100 with its export
    assert len(would) == 1 + 1 + 3 + 2 + 2
    assert not [line for line in lines if line["event"] == "deleted"]


def test_a_second_watchdog_exits_and_errors_never_crash(layout, capsys, monkeypatch):
    lock_path = str(layout["root"] / "wd.lock")
    lock = disk_watchdog.take_lock(lock_path)
    assert lock is not None
    args = ["--paths", str(layout["root"]), "--once", "--min-free-gb", "1e9", "--lock-file", lock_path]
    assert disk_watchdog.main(args) == 1
    assert "another watchdog" in capsys.readouterr().err
    assert len(files(layout["ckpt"])) == 6  # it did nothing
    lock.close()

    def broken(path):
        raise OSError("disk vanished")

    monkeypatch.setattr(disk_watchdog.shutil, "disk_usage", broken)
    assert disk_watchdog.main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert any(line["event"] == "error" and "disk vanished" in line["error"] for line in lines)
    assert len(files(layout["ckpt"])) == 6
