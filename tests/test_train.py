import asyncio
import collections
import dataclasses
import glob
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
import soundfile
from conftest import COMPILE_CACHE, REPO, xla_flags
from tensorboard.backend.event_processing import plugin_event_accumulator

import checkpoint
import corpus
import data
import dacvae
import full_disk
import inference
import model as echo
import monitor
import pod
import storage
import train_pretrain
from shards import npy, write_shard

STEP_EXPORT = re.compile(r"^step_\d{7}\.params\.pkl$")
# The tests' runs: tiny, and their evals give val_loss only (no sampling to trace and compile); the
# runs that check the synthetic scores ask for them with SCORED.
FAST = ["--preset", "tiny", "--synthetic_corpus", "short", "--steps", "12", "--global_batch_size", "8",
        "--max_latent_len", "80", "--max_text_len", "48", "--max_speaker_len", "48", "--eval_every", "6",
        "--eval_samples", "0", "--full_eval_samples", "0", "--sample_steps", "2",
        "--compile_cache_dir", COMPILE_CACHE]
SCORED = ["--eval_samples", "4", "--full_eval_samples", "4"]


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def losses(metrics):
    return [m["loss"] for m in metrics if "loss" in m and "event" not in m]


def final_params(checkpoint_dir, step):
    """The full train state of a checkpoint, through `train_pretrain.py export`."""
    out = f"{checkpoint_dir}-step{step}.pkl"
    assert train_pretrain.main(["export", os.path.join(checkpoint_dir, f"step_{step:07d}"), out]) == 0
    return checkpoint.load_checkpoint_file(out)


def checkpoint_steps(checkpoint_dir):
    return sorted(int(name[5:]) for name in os.listdir(checkpoint_dir) if re.fullmatch(r"step_\d{7}", name))


def assert_trees_equal(a, b):
    fa, fb = echo.flatten(a), echo.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def run_inprocess(tmp_path, name, *extra):
    run_dir = tmp_path / name
    code = train_pretrain.main(["--run_dir", str(run_dir), *FAST, *extra])
    assert code == 0
    return run_dir


def test_loss_decreases_and_metrics_parse(tmp_path):
    run_dir = run_inprocess(tmp_path, "a", "--steps", "60", "--lr", "3e-3", "--eval_every", "30", *SCORED)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    steps = [m for m in metrics if "event" not in m]
    assert [m["step"] for m in steps] == list(range(1, 61))
    for m in steps:
        for field in ("step", "time", "loss", "lr", "grad_norm", "samples_per_sec", "step_time", "data_wait",
                      "latent_seconds_per_sec", "loss_by_t", "skipped"):
            assert field in m, field
        assert np.isfinite(m["loss"])
    # The rate each step trained at: --lr 3e-3 over --steps 60, warm-up 5% (as optax schedules it).
    oracle = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 3, 60, 0.0)
    assert [m["lr"] for m in steps] == pytest.approx([float(oracle(s - 1)) for s in range(1, 61)], rel=1e-5, abs=1e-9)
    first, last = np.mean(losses(metrics)[:10]), np.mean(losses(metrics)[-10:])
    assert last < 0.85 * first, (first, last)
    events = {m["event"] for m in metrics if "event" in m}
    assert {"compiled", "eval", "checkpoint"} <= events
    evals = [m for m in metrics if m.get("event") == "eval"]
    assert all(np.isfinite(e["val_loss"]) and np.isfinite(e["synthetic_nmse"]) for e in evals)
    assert all(e["synthetic_cer"] >= 0 and e["synthetic_end_frames"] >= 0 for e in evals)
    # One full eval, at the run's end: the three scores, and each under both controls.
    full = [m for m in metrics if m.get("event") == "full_eval"]
    assert [(m["step"], m["samples"], m["seeds"]) for m in full] == [(60, 4, 2)]
    for name in ("synthetic_nmse", "synthetic_cer", "synthetic_end_frames"):
        assert all(np.isfinite(full[0][name + suffix]) for suffix in ("", "_shuffled", "_other_text")), name
    # The weights-only file loads into the model.
    payload = checkpoint.load_checkpoint_file(str(run_dir / "checkpoints" / "step_0000060.params.pkl"))
    config = checkpoint.config_from_checkpoint(payload)
    assert config.model_size == echo.PRESETS["tiny"].model_size
    checkpoint.params_from_checkpoint(payload, config)


def test_recognition_scores_count_edits_and_misplaced_ends():
    """The eval's synthetic_cer and synthetic_end_frames, on held-out samples of a corpus: its own
    frames score 0 and 0; silence scores every letter missing and every end off by the speech's
    length; a sample that says a letter too many scores one edit."""
    silence = corpus.synthetic_tables(0)[2]
    texts = ["abcdefgh", "hgfedcbadc"]
    true = [corpus.synthetic_latent(t, i, 0, "short").astype(np.float32) for i, t in enumerate(texts)]
    frames = np.array([len(t) for t in true])
    truth = np.stack([np.concatenate([t, np.tile(silence, (32 - len(t), 1))]) for t in true])
    exact = train_pretrain.recognition_scores(truth, texts, frames, 0, "short")
    assert exact == {"synthetic_cer": 0.0, "synthetic_end_frames": 0.0}
    quiet = train_pretrain.recognition_scores(np.tile(silence, (2, 32, 1)), texts, frames, 0, "short")
    assert quiet == {"synthetic_cer": 1.0, "synthetic_end_frames": float(frames.mean())}
    longer = truth.copy()
    longer[0, frames[0]:frames[0] + 2] = corpus.synthetic_latent("a", 0, 0, "short")
    assert train_pretrain.recognition_scores(longer, texts, frames, 0, "short") == {
        "synthetic_cer": 1 / 18, "synthetic_end_frames": 1.0}


def test_the_full_eval_controls_shuffle_each_text_and_swap_texts():
    """The controls keep BOS, the speaker tag and each text's letters and length, in another order;
    the other-text control gives each sample the next one's text."""
    texts = ["abcdefgh", "ponmlkji", "abab"]
    encoded = [data.encode_text(t, 24) for t in texts]
    held_out = {"text_ids": np.stack([ids for ids, _ in encoded]), "text_mask": np.stack([m for _, m in encoded])}
    controls = train_pretrain.text_controls(held_out, seed=3)
    (shuffled, shuffled_mask), (other, other_mask) = controls["_shuffled"], controls["_other_text"]
    decoded = train_pretrain.batch_texts({"text_ids": shuffled, "text_mask": shuffled_mask})
    assert [t[:5] for t in decoded] == ["[S1] "] * 3 and np.all(shuffled[:, 0] == 0)
    assert [sorted(t[5:]) for t in decoded] == [sorted(t) for t in texts]
    assert decoded[0][5:] != texts[0] and decoded[1][5:] != texts[1]
    assert train_pretrain.batch_texts({"text_ids": other, "text_mask": other_mask}) == [
        "[S1] " + t for t in texts[1:] + texts[:1]]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A 12-step run straight, and the same run stopped after 8 steps (`medium` trains on its primer
    for the first 70% of the steps: the stop falls on the switch), then restarted with nothing but
    where it lives (process 0 on another worker: no local metrics file)."""
    tmp_path = tmp_path_factory.mktemp("resumed")
    straight = run_inprocess(tmp_path, "straight", "--synthetic_corpus", "medium")
    split = run_inprocess(tmp_path, "split", "--synthetic_corpus", "medium", "--run_steps", "8")
    stopped_at = checkpoint_steps(split / "checkpoints")
    os.remove(split / "metrics.jsonl")
    assert train_pretrain.main(["--run_dir", str(split), "--log_every", "1"]) == 0
    return tmp_path, straight, split, stopped_at


def test_a_run_resumes_bit_for_bit_with_no_flags(resumed):
    _, straight, split, stopped_at = resumed
    assert stopped_at == [8]
    a, b = final_params(str(straight / "checkpoints"), 12), final_params(str(split / "checkpoints"), 12)
    for key in ("params", "opt_state", "ema_params"):
        assert_trees_equal(a[key], b[key])
    ma, mb = read_metrics(straight / "metrics.jsonl"), read_metrics(split / "metrics.jsonl")
    lr = lambda m: [x["lr"] for x in m if "loss" in x and "event" not in x]
    assert losses(ma) == losses(mb) and lr(ma) == lr(mb) and len(losses(mb)) == 12  # history from beside the ckpts
    assert any(m.get("event") == "resumed" for m in mb)
    switches = lambda m: [(x["step"], os.path.basename(x["source"])) for x in m if x.get("event") == "data_stage"]
    assert switches(ma) == switches(mb) == [(8, "synthetic-medium-0-0")]
    assert lr(ma)[8] == 0.0 < lr(ma)[7]  # the second stage warms up again


def test_a_flag_that_contradicts_the_run_is_refused_in_one_sentence(resumed, capsys):
    split = resumed[2]
    capsys.readouterr()
    assert train_pretrain.main(["--run_dir", str(split), "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lr 0.001 contradicts this run's 0.002" in err[0] and "--override lr" in err[0], err


def test_a_checkpoint_of_another_model_stops_the_run_and_moves_nothing(resumed, capsys):
    """A restore that fails for a reason other than damaged bytes (here a model change) stops the run
    in one sentence naming the step and the cause; no checkpoint is set aside."""
    split = resumed[2]
    before = sorted(os.listdir(split / "checkpoints"))
    capsys.readouterr()
    assert train_pretrain.main(["--run_dir", str(split), "--preset", "demo", "--override", "preset"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot restore" in err[0] and "step_0000012" in err[0], err
    assert "holds another model than this run builds" in err[0] and "No checkpoint was moved" in err[0], err
    assert sorted(os.listdir(split / "checkpoints")) == before


def test_the_seed_pickle_resumes_bit_for_bit_in_another_directory(resumed):
    """Step 8 exported to the seed's full pickle; --resume FILE.pkl in a new directory continues bit
    for bit, and a plain restart there resumes from its own checkpoints."""
    tmp_path, straight, split, _ = resumed
    exported = final_params(str(split / "checkpoints"), 8)
    assert exported["step"] == 8 and exported["samples_seen"] == 64 and "data_states" in exported
    moved = tmp_path / "moved"
    assert train_pretrain.main(["--run_dir", str(moved), *FAST, "--synthetic_corpus", "medium", "--resume",
                                str(split / "checkpoints-step8.pkl"), "--run_steps", "3"]) == 0
    assert checkpoint_steps(moved / "checkpoints") == [11]
    assert train_pretrain.main(["--run_dir", str(moved)]) == 0
    a = final_params(str(straight / "checkpoints"), 12)
    assert_trees_equal(a["params"], final_params(str(moved / "checkpoints"), 12)["params"])
    assert losses(read_metrics(moved / "metrics.jsonl")) == losses(read_metrics(straight / "metrics.jsonl"))[8:]


def test_a_deliberate_change_needs_override_and_is_logged(resumed):
    split = resumed[2]
    assert train_pretrain.main(["--run_dir", str(split), "--steps", "14", "--override", "steps"]) == 0
    changed = [m for m in read_metrics(split / "metrics.jsonl") if m.get("event") == "flag_changed"]
    assert [(c["flag"], c["before"], c["after"], c["step"]) for c in changed] == [("steps", 12, 14, 12)]
    assert max(m["step"] for m in read_metrics(split / "metrics.jsonl") if "loss" in m) == 14


def test_checkpoints_on_gs_resume_bit_exactly(tmp_path, gcs):
    """--checkpoint_dir gs://BUCKET/PATH (a local Cloud Storage emulator): save, stop, resume with no
    flags but the directory, and match a straight run; flags, metrics and exports live in the bucket."""
    from etils import epath
    bucket = f"gs://{gcs}/runs/exact"
    common = ["--steps", "4", "--checkpoint_every", "2", "--eval_every", "100"]
    straight = run_inprocess(tmp_path, "straight", *common)
    assert train_pretrain.main(["--run_dir", str(tmp_path / "local"), *FAST, *common, "--checkpoint_dir", bucket,
                                "--run_steps", "2"]) == 0
    names = sorted(p.name for p in epath.Path(bucket).iterdir())
    assert names == ["metrics.jsonl", "run_flags.json", "step_0000002", "step_0000002.params.pkl"], names
    assert train_pretrain.main(["--run_dir", str(tmp_path / "local"), "--checkpoint_dir", bucket]) == 0
    assert losses(read_metrics(tmp_path / "local" / "metrics.jsonl")) == \
        losses(read_metrics(straight / "metrics.jsonl"))
    names = sorted(p.name for p in epath.Path(bucket).iterdir())
    assert "step_0000004" in names and "step_0000004.params.pkl" in names
    exported = checkpoint.load_checkpoint_file(f"{bucket}/step_0000004.params.pkl")  # restricted unpickling
    local = checkpoint.load_checkpoint_file(str(straight / "checkpoints" / "step_0000004.params.pkl"))
    assert exported["step"] == 4
    assert_trees_equal(exported["params"], local["params"])
    history = [json.loads(line) for line in epath.Path(bucket, "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history if m.get("event") == "resumed"] == [2]
    # export, inference and --resume/--init_from read gs:// too (a pickle every host of a pod reads).
    assert train_pretrain.main(["export", f"{bucket}/step_0000004", f"{bucket}/full.pkl"]) == 0
    full = checkpoint.load_checkpoint(f"{bucket}/full.pkl")
    assert full["step"] == 4 and "opt_state" in full
    assert_trees_equal(full["params"], local["params"])
    assert checkpoint.load_checkpoint(bucket)["step"] == 4
    args = train_pretrain.parse_args(["--run_dir", str(tmp_path / "tuned"), "--init_from", f"{bucket}/full.pkl"])
    assert train_pretrain.resolve_defaults(args).init_from == f"{bucket}/full.pkl"
    with pytest.raises(train_pretrain.TrainError, match="no such checkpoint file"):
        train_pretrain.resolve_defaults(train_pretrain.parse_args(["--resume", f"{bucket}/missing.pkl"]))


def test_grad_accumulation_matches_the_large_batch(tmp_path):
    one = run_inprocess(tmp_path, "one", "--steps", "3")
    two = run_inprocess(tmp_path, "two", "--steps", "3", "--grad_accum", "2")
    a, b = final_params(str(one / "checkpoints"), 3), final_params(str(two / "checkpoints"), 3)
    for k, v in echo.flatten(a["params"]).items():
        np.testing.assert_allclose(v, echo.flatten(b["params"])[k], rtol=2e-4, atol=2e-6, err_msg=k)
    np.testing.assert_allclose(losses(read_metrics(one / "metrics.jsonl")),
                               losses(read_metrics(two / "metrics.jsonl")), rtol=1e-5)


def test_non_finite_steps_are_skipped(tmp_path):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    args = train_pretrain.resolve_defaults(train_pretrain.parse_args(["--run_dir", str(tmp_path), *FAST]))
    config = echo.PRESETS["tiny"]
    model = echo.EchoDiT(config)
    tx = train_pretrain.make_optimizer(args)
    params = nn.unbox(echo.init_params(config, jax.random.key(0)))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    b, s = 4, 16
    batch = {"latent": np.zeros((b, s, 128), np.float32), "latent_mask": np.ones((b, s), np.int32),
             "text_ids": np.zeros((b, 8), np.int32), "text_mask": np.ones((b, 8), np.int32),
             "speaker_latent": np.zeros((b, 8, 128), np.float32), "speaker_mask": np.ones((b, 8), np.int32)}
    jitted, run = jax.jit(train_pretrain.build_train_step(model, args)), train_pretrain.run_values(args)
    step = lambda state, batch: jitted(state, batch, run)
    good, _ = step(state, batch)  # the warmup's first learning rate is 0
    good, metrics = step(good, batch)
    assert bool(metrics["finite"]) and int(good["step"]) == 2
    assert not np.array_equal(good["params"]["out_proj"]["kernel"], params["out_proj"]["kernel"])
    batch["latent"][1, 3, 5] = np.nan
    bad, metrics = step(good, batch)
    assert not bool(metrics["finite"]) and int(bad["step"]) == 3
    assert_trees_equal(jax.tree.map(np.asarray, bad["params"]), jax.tree.map(np.asarray, good["params"]))
    for a, b in zip(jax.tree.leaves(bad["opt_state"]), jax.tree.leaves(good["opt_state"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_reads_of_a_failed_restore_finish_before_its_loop_closes():
    """Orbax runs a restore in a loop of its own (run_until_complete, then close) and leaves it at
    the first failed read. Left in flight, the other reads printed hundreds of tracebacks later,
    and a pod host blocked writing them stalled the others in a collective."""
    finished = []

    async def read(delay, fails):
        await asyncio.sleep(delay)
        if fails:
            raise OSError("a chunk is missing")
        finished.append(delay)

    async def restore():
        await asyncio.gather(read(0, True), read(0.2, False))

    with checkpoint.reads_finish_before_their_loop_closes():
        loop = asyncio.new_event_loop()
    with pytest.raises(OSError):
        loop.run_until_complete(restore())
    loop.close()
    assert finished == [0.2] and loop.is_closed()
    assert not isinstance(asyncio.new_event_loop(), checkpoint.ReadsFinishingEventLoop)  # only within


def test_interrupted_and_damaged_checkpoints(tmp_path, monkeypatch, caplog):
    """A save killed mid-write leaves only a temporary directory, removed at the next start; a
    damaged newest checkpoint (truncated chunks) gives a warning and the run resumes from the one
    before. The weights-only export is written once per invocation, of its last committed step, and
    a crash while writing it leaves no half file."""
    run_dir = run_inprocess(tmp_path, "c", "--steps", "4", "--checkpoint_every", "2")
    ckpt = run_dir / "checkpoints"
    exports = lambda: sorted(n for n in os.listdir(ckpt) if STEP_EXPORT.match(n))
    assert checkpoint_steps(ckpt) == [2, 4] and exports() == ["step_0000004.params.pkl"]
    leftover = ckpt / "step_0000006.orbax-checkpoint-tmp-1234"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "manifest.ocdbt").write_bytes(b"x" * 4096)
    for path in (ckpt / "step_0000004" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 64:
            path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="train"):
        assert train_pretrain.main(["--run_dir", str(run_dir), "--steps", "8", "--override", "steps"]) == 0
    assert "step_0000004 is damaged" in caplog.text and "resuming from step 2, which loses 2 steps" in caplog.text
    assert [m["step"] for m in read_metrics(run_dir / "metrics.jsonl") if m.get("event") == "resumed"] == [2]
    assert not leftover.exists()
    names = os.listdir(ckpt)  # the damaged step 4 and its export set aside, not deleted
    assert len([n for n in names if n.startswith("step_0000004.unreadable-")]) == 2, names
    assert checkpoint_steps(ckpt) == [4, 6, 8] and exports() == ["step_0000008.params.pkl"], names

    (ckpt / "step_0000008.params.pkl").unlink()
    from_orbax = checkpoint.load_checkpoint(str(ckpt))  # no export: read from the sharded checkpoint
    real, written = checkpoint.StreamingPickler.reducer_override, []

    def dying_after_three_arrays(self, obj):
        result = real(self, obj)
        written.extend([] if result is NotImplemented else [obj])
        if len(written) > 3:
            raise KeyboardInterrupt("power cut")
        return result

    monkeypatch.setattr(checkpoint.StreamingPickler, "reducer_override", dying_after_three_arrays)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.export_weights(str(ckpt), 8)
    names = os.listdir(ckpt)
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")] and not exports(), names
    monkeypatch.undo()
    checkpoint.export_weights(str(ckpt), 8)
    exported = checkpoint.load_checkpoint_file(str(ckpt / "step_0000008.params.pkl"))
    assert exported["step"] == from_orbax["step"] == 8 and exported["config"] == from_orbax["config"]
    assert_trees_equal(exported["params"], from_orbax["params"])
    np.testing.assert_array_equal(exported["silence_latent"], from_orbax["silence_latent"])


def test_a_full_disk_during_a_save_is_one_sentence(tmp_path, monkeypatch, capsys):
    full_disk.fill_at_the_second_save(monkeypatch.setattr)
    run_dir = tmp_path / "full"
    assert train_pretrain.main(["--run_dir", str(run_dir), *FAST, "--steps", "4", "--checkpoint_every", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "writing a checkpoint to" in err[0] and "No space left on device" in err[0], err
    assert checkpoint_steps(run_dir / "checkpoints") == [2]  # the last complete checkpoint stays


def test_a_background_write_that_fails_stops_the_run_at_once(tmp_path, monkeypatch, capsys):
    """The second checkpoint's background write meets a full disk: the run stops soon after (not at
    the run's end, 40 steps on, where it would wait for the write) in one sentence, and the first
    checkpoint stays. How many steps run meanwhile depends on the machine's speed: the bound is loose."""
    full_disk.fill_in_the_background_at_the_second_save(monkeypatch.setattr)
    run_dir = tmp_path / "full"
    assert train_pretrain.main(["--run_dir", str(run_dir), *FAST, "--steps", "100", "--checkpoint_every", "30",
                                "--eval_every", "1000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step_0000060 failed in the background" in err[0], err
    assert "No space left on device" in err[0] and "intact" in err[0], err
    assert max(m["step"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m) < 90
    assert checkpoint_steps(run_dir / "checkpoints") == [30]


def test_restricted_unpickling_refuses_code_and_unboxes_flax(tmp_path):
    import flax.linen as nn

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"params": {"x": Exploit()}}))
    with pytest.raises(checkpoint.CheckpointError, match="not a safe checkpoint"):
        checkpoint.load_checkpoint_file(str(evil))
    assert not marker.exists()
    boxed = tmp_path / "boxed.pkl"
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    boxed.write_bytes(pickle.dumps({"params": {"w": nn.LogicallyPartitioned(value, ("embed", "mlp"))}, "step": 1}))
    loaded = checkpoint.load_checkpoint_file(str(boxed))
    np.testing.assert_array_equal(loaded["params"]["w"], value)


BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax.monitoring's event for each compile
MODEL_PROGRAMS = ("jit(init)", "jit(step_fn)", "jit(eval_fn)")


def test_bad_flags_fail_before_anything_compiles(tmp_path, capsys):
    """Each bad flag: status 2 and one sentence naming it, before the model's programs are compiled
    (in-process, where a jax.monitoring listener sees every compile); and once as a user runs the CLI:
    no traceback."""
    compiled = []

    def listener(event, duration, fun_name="", **_):
        if event == BACKEND_COMPILE:
            compiled.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for flags, message in ((["--max_speaker_len", "30"], "multiple of 4"), (["--preset", "7B"], "--preset"),
                               (["--global_batch_size", "10", "--grad_accum", "3"], "--grad_accum"),
                               (["--data", str(tmp_path / "nothing")], "no .tar shards"),
                               (["--init_from", str(tmp_path / "none.pkl")], "--init_from"),
                               (["--ema_decay", "1"], "--ema_decay"), (["--weight_decay", "-1"], "--weight_decay"),
                               (["--eval_samples", "-1"], "--eval_samples must not be negative"),
                               (["--prefix_prob", "0.5"], "--preset demo-blockwise"),
                               (["--profile_steps", "5:2"], "--profile_steps"),
                               (["--sample_texts", str(tmp_path / "none.txt")], "--sample_texts"),
                               (["--dacvae_weights", str(tmp_path / "codec.pth")], "--dacvae_weights")):
            capsys.readouterr()
            code = train_pretrain.main(["--run_dir", str(tmp_path / "r"), "--compile_cache_dir",
                                        COMPILE_CACHE, *flags])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1 and message in err[0], (flags, err)
        assert not set(compiled) & set(MODEL_PROGRAMS), compiled  # (a few eager operations do compile)
        jax.jit(lambda x: x + 1)(np.zeros(2))  # the listener does see a compile
        assert compiled[-1] == "jit(<lambda>)", compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not os.path.exists(tmp_path / "r" / "metrics.jsonl")
    out = subprocess.run([sys.executable, os.path.join(REPO, "train_pretrain.py"), "--run_dir", str(tmp_path / "r"),
                          "--ema_decay", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--ema_decay" in out.stderr and "Traceback" not in out.stderr, out.stderr[-500:]


def test_prefix_training_needs_a_blockwise_preset_and_a_canvas_of_whole_patches():
    for flags, message in ((["--prefix_prob", "1.5"], "--prefix_prob must lie in [0, 1]"),
                           (["--prefix_prob", "0.5", "--preset", "840M"], "--preset 840M-blockwise"),
                           (["--preset", "tiny-blockwise", "--prefix_prob", "0.5", "--max_latent_len", "30"],
                            "a multiple of 4")):
        with pytest.raises(train_pretrain.TrainError, match=re.escape(message)):
            train_pretrain.resolve_defaults(train_pretrain.parse_args(flags))


def test_a_blockwise_run_starts_from_a_plain_checkpoint_and_trains_its_prefix_path(tmp_path):
    plain = run_inprocess(tmp_path, "plain", "--steps", "2")
    source = str(plain / "checkpoints" / "step_0000002.params.pkl")
    ema = echo.flatten(checkpoint.load_checkpoint_file(source)["ema_params"])
    init = echo.flatten(nn.unbox(echo.init_params(echo.PRESETS["tiny-blockwise"], jax.random.key(0))))
    # The warm-up's first learning rate is 0: after one step the weights are those the run started from,
    # the checkpoint's EMA weights and, for the latent-prefix path it lacks, that path's init.
    first = run_inprocess(tmp_path, "first", "--preset", "tiny-blockwise", "--init_from", source, "--steps", "1",
                          "--prefix_prob", "1")
    started = echo.flatten(final_params(str(first / "checkpoints"), 1)["params"])
    new_parts = sorted(set(started) - set(ema))
    prefix_path = re.compile(r"latent_(encoder|norm)/|.*/attention/w[kv]_latent/")
    assert new_parts and all(prefix_path.match(p) for p in new_parts)
    for path, value in started.items():
        if path in ema:
            np.testing.assert_array_equal(value, ema[path], err_msg=path)
        else:  # computed again here by another program: equal up to float32 rounding (a few 1e-9)
            np.testing.assert_allclose(value, init[path], rtol=1e-6, atol=1e-8, err_msg=path)
    # Training then reaches the path: its norm scale (no weight decay) moves only by its gradient.
    trained = run_inprocess(tmp_path, "trained", "--preset", "tiny-blockwise", "--init_from", source, "--steps", "30",
                            "--lr", "3e-3", "--prefix_prob", "0.5")
    after = echo.flatten(final_params(str(trained / "checkpoints"), 30)["params"])
    assert np.abs(after["latent_norm/weight"] - init["latent_norm/weight"]).max() > 1e-3
    assert all(np.isfinite(losses(read_metrics(trained / "metrics.jsonl"))))


def test_sigterm_writes_a_checkpoint_and_exits_zero(tmp_path):
    run_dir = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train_pretrain.py"), "--run_dir", str(run_dir),
                             *FAST, "--steps", "100000", "--checkpoint_every", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=host_env(None, 1, 0))
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    metrics = read_metrics(run_dir / "metrics.jsonl")
    preempted = [m for m in metrics if m.get("event") == "preempted"]
    assert len(preempted) == 1
    step = preempted[0]["step"]
    assert step >= 3 and step in checkpoint_steps(run_dir / "checkpoints")
    # A preemption save is only the sharded checkpoint (no pickle export); inference reads it directly.
    assert not (run_dir / "checkpoints" / f"step_{step:07d}.params.pkl").exists()
    assert checkpoint.load_checkpoint(str(run_dir / "checkpoints"))["step"] == step


STOP_SIGNAL_BURST = """
import os, subprocess
import train_pretrain
stop = train_pretrain.stop_signals()
# Another process sends them: as fast as bash can, for 3 s, SIGHUP and SIGTERM in turn.
sender = subprocess.Popen(["bash", "-c", "end=$((SECONDS + 3)); while ((SECONDS < end)); do "
                           "kill -HUP {0}; kill -TERM {0}; done".format(os.getpid())])
while sender.poll() is None:
    sum(range(1000))
print("stop requested:", stop.is_set())
"""


def test_stop_signals_in_a_burst_never_deadlock_the_trainer():
    """A dropped session sends SIGHUP to the trainer and launch.sh passes SIGTERM on at once: a handler
    that takes a lock (threading.Event.set) deadlocks when the second arrives while the first holds it."""
    out = subprocess.run([sys.executable, "-c", STOP_SIGNAL_BURST], capture_output=True, text=True, timeout=60,
                         cwd=REPO, env=host_env(None, 1, 0))
    assert out.returncode == 0 and "stop requested: True" in out.stdout, out.stderr[-2000:]


# ---------------------------------------------------------------- several processes

def identical_corpus(directory, count=64, seed=0):
    """Every sample the same: the global batch is then the same for any number of hosts."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    latent, ref = npy(rng.normal(size=(30, 128)).astype(np.float16)), npy(rng.normal(size=(20, 128)).astype(np.float16))
    text = json.dumps({"text": "the same words"}).encode()
    for shard in range(4):
        write_shard(os.path.join(directory, f"s{shard}.tar"), [
            (f"k{shard}_{i}{suffix}", payload) for i in range(count // 4)
            for suffix, payload in ((".npy", latent), (".ref.npy", ref), (".json", text))])


def host_env(port, processes, index, devices_per_process=1):
    """The environment of host `index` of a pod simulated on 127.0.0.1 (a single process joins no pod)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices_per_process)}
    if processes > 1:
        env.update(ECHO_COORDINATOR=f"127.0.0.1:{port}", ECHO_NUM_PROCESSES=str(processes), ECHO_PROCESS_ID=str(index))
    return env


def one_core(index):
    """The command prefix that pins simulated host `index` to one core, as launch.sh does: XLA:CPU
    with several threads runs independent collectives in an order that differs between hosts, and
    gloo then fails. (taskset, not a preexec_fn: forking this multithreaded process and running
    Python in the child before exec can deadlock.)"""
    return ["taskset", "-c", str(index % os.cpu_count())] if shutil.which("taskset") else []


Host = collections.namedtuple("Host", "output status ended")


def run_pod(run_dir, processes, devices_per_process, *extra, checkpoint_dirs=None, host_flags=None, wrappers=None,
            distributed_timeout=60, expect=0):
    """The tests' one simulated pod: `processes` trainers on 127.0.0.1 (each pinned to a core, as
    launch.sh does) with the FAST flags and `extra`; host i adds host_flags[i] and runs Python with
    wrappers[i] (a `-c` wrapper) in front of the trainer. Returns each host's Host(output, exit
    status, monotonic time it ended); with `expect`, every status must be that."""
    port, procs = pod.coordinator_port(), []
    # Each host writes to a file: a pipe nobody reads while the hosts run fills up, and a host
    # blocked printing leaves the others waiting in a collective.
    outputs = [tempfile.TemporaryFile("w+") for _ in range(processes)]
    for i in range(processes):
        ckpt = checkpoint_dirs[i] if checkpoint_dirs else os.path.join(run_dir, "checkpoints")
        procs.append(subprocess.Popen(
            [*(one_core(i) if processes > 1 else []), sys.executable, *(wrappers or {}).get(i, ()),
             os.path.join(REPO, "train_pretrain.py"), "--run_dir", str(run_dir), *FAST, "--checkpoint_dir", str(ckpt),
             "--distributed_timeout", str(distributed_timeout), *extra, *(host_flags or {}).get(i, ())],
            stdout=outputs[i], stderr=subprocess.STDOUT, text=True, env=host_env(port, processes, i,
                                                                                 devices_per_process)))
    ended, deadline = [None] * processes, time.monotonic() + 600
    while None in ended and time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if ended[i] is None and p.poll() is not None:
                ended[i] = time.monotonic()
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
    hosts = []
    for p, output, end in zip(procs, outputs, ended):
        p.wait()
        output.seek(0)
        hosts.append(Host(output.read(), p.returncode, end))
        output.close()
    if expect is not None:
        assert [host.status for host in hosts] == [expect] * processes, \
            "\n".join(f"--- host {i} (exit {host.status}):\n{host.output[-3000:]}" for i, host in enumerate(hosts))
    return hosts


def copy_of_run(source, target):
    """A copy of a run's checkpoints, to restart in another way (with its own --metrics_file: the run's
    flags name the original's)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("metrics.jsonl"))
    return target


TWO_HOSTS = ["--steps", "6", "--eval_every", "100"]


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    """The same corpus trained for 6 steps by one process with two devices and by two processes with
    one each (a checkpoint at step 3), then by two processes restarted from that step-3 checkpoint."""
    tmp_path = tmp_path_factory.mktemp("two_hosts")
    corpus = tmp_path / "corpus"
    identical_corpus(corpus)
    common = ["--data", str(corpus), *TWO_HOSTS]
    # One device per simulated host, as on launch.sh's pod: with several, XLA:CPU interleaves the
    # collectives of its device threads differently on each host and gloo fails now and then
    # ("Received data size doesn't match expected size").
    run_pod(tmp_path / "one", 1, 2, *common)
    run_pod(tmp_path / "two", 2, 1, *common, "--checkpoint_every", "3")
    split = copy_of_run(tmp_path / "two", tmp_path / "split")
    shutil.rmtree(split / "checkpoints" / "step_0000006")
    os.remove(split / "checkpoints" / "step_0000006.params.pkl")
    run_pod(split, 2, 1, *common, "--metrics_file", str(split / "metrics.jsonl"))
    return tmp_path, common


def test_two_processes_match_one(two_hosts):
    tmp_path, _ = two_hosts
    one = losses(read_metrics(tmp_path / "one" / "metrics.jsonl"))
    two = losses(read_metrics(tmp_path / "two" / "metrics.jsonl"))
    np.testing.assert_allclose(one, two, rtol=1e-4)


def test_two_processes_resume_bit_for_bit(two_hosts):
    """2 processes: restarted from step 3, 3 more steps == 6 straight, bit for bit."""
    tmp_path, _ = two_hosts
    a = final_params(str(tmp_path / "two" / "checkpoints"), 6)
    b = final_params(str(tmp_path / "split" / "checkpoints"), 6)
    assert_trees_equal(a["params"], b["params"])
    resumed = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [m["step"] for m in resumed if m.get("event") == "resumed"] == [3]
    assert losses(resumed) == losses(read_metrics(tmp_path / "two" / "metrics.jsonl"))[3:]


def test_another_number_of_hosts_continues_from_the_checkpoint(two_hosts):
    """The 2-host checkpoint on 1 host: restored onto the new mesh, with one warning saying how the
    data order continues."""
    tmp_path, common = two_hosts
    run = copy_of_run(tmp_path / "split", tmp_path / "one_host_after_two")
    out = run_pod(run, 1, 2, *common, "--steps", "8", "--override", "steps",
                  "--metrics_file", str(run / "metrics.jsonl"))[0].output
    assert "data positions of 2 host(s), this run has 1: every host continues at the start of epoch 1" in out, \
        out[-2000:]
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics if m.get("event") == "resumed"] == [6]
    assert [m["step"] for m in metrics if "loss" in m and "event" not in m][-2:] == [7, 8]
    saved = lambda step: storage.read_json(str(run / "checkpoints" / f"step_{step:07d}" / "meta" / "metadata"))
    before, after = saved(6)["data_states"], saved(8)["data_states"]
    assert [s["sources"][0]["epoch"] for s in before] == [0, 0] and after[0]["sources"][0]["epoch"] == 1
    assert len(after) == 1 and after[0]["pins"] == before[0]["pins"]  # the same shards, in the next epoch


def test_a_chunk_only_one_host_reads_is_damage_both_hosts_agree_on(two_hosts):
    """A missing chunk of step 6 that only host 1 reads: host 0 restores it, host 1 cannot. No hang:
    both hosts agree in one collective, set step 6 aside and resume from step 3."""
    tmp_path, common = two_hosts
    run = copy_of_run(tmp_path / "split", tmp_path / "damaged")
    state = run / "checkpoints" / "step_0000006" / "state"
    sharded = sorted(d for d in state.glob("params.*") if len([c for c in d.iterdir() if c.name[0] != "."]) == 2)
    assert sharded, "no array split over the two hosts"
    chunk = max(c for c in sharded[0].iterdir() if c.name[0] != ".")  # index 1 along the split axis: host 1's
    chunk.unlink()
    hosts = run_pod(run, 2, 1, *common, "--steps", "8", "--override", "steps",
                    "--metrics_file", str(run / "metrics.jsonl"))
    for host in hosts:
        assert "step_0000006 is damaged on host(s) 1" in host.output, host.output[-3000:]
        assert "resuming from step 3, which loses 3 steps" in host.output
        # the reads orbax left in flight on host 1 finish quietly
        assert "Traceback" not in host.output and "Exception ignored" not in host.output, host.output[-3000:]
    names = os.listdir(run / "checkpoints")
    aside = [n for n in names if n.startswith("step_0000006.unreadable-") and not n.endswith(".params.pkl")]
    assert len(aside) == 1 and "step_0000003" in names, names
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics if m.get("event") == "resumed"] == [3]
    assert max(m["step"] for m in metrics if "loss" in m and "event" not in m) == 8


def test_hosts_with_different_checkpoint_directories_are_refused(tmp_path):
    """Each worker writing to its own local disk cannot hold a sharded checkpoint: refused at start."""
    corpus = tmp_path / "corpus"
    identical_corpus(corpus)
    start = time.perf_counter()
    outs = [host.output for host in run_pod(tmp_path / "pod", 2, 1, "--data", str(corpus), "--steps", "2", expect=2,
                                            checkpoint_dirs=[tmp_path / "disk0", tmp_path / "disk1"])]
    assert time.perf_counter() - start < 120
    for out in outs:
        assert "host(s) 1 do not see process 0's --checkpoint_dir" in out and "gs://" in out, out[-1500:]
        assert "Traceback" not in out and "compiled" not in out
    assert not os.path.exists(tmp_path / "pod" / "metrics.jsonl")


def test_an_error_on_one_host_stops_every_host_at_once(tmp_path):
    """A bad flag or a full disk that only host 1 meets: host 1 says it in one sentence, and host 0 stops
    within seconds with the same sentence (not after --distributed_timeout or the heartbeat)."""
    corpus = tmp_path / "corpus"
    identical_corpus(corpus)
    common = ["--data", str(corpus), "--eval_every", "100"]
    for flags, message, on_host0 in (
            (["--lr", "-1"], "--lr must be positive", "host 1 stopped the run: --lr must be positive"),
            (["--bogus", "1"], "unrecognized arguments: --bogus 1", "host 1 stopped the run: unrecognized"),
            (["--lr", "0.5"], "host(s) 1 run with other flags than process 0", "host(s) 1 run with other flags")):
        start = time.monotonic()
        outs, codes, ended = zip(*run_pod(tmp_path / "flag", 2, 1, *common, host_flags={1: flags},
                                          distributed_timeout=120, expect=None))
        assert codes == (2, 2), outs
        assert max(ended) - start < 60, outs  # not the 120 s --distributed_timeout
        # Where both hosts meet it (different flags), either may report first: each prints it once.
        assert message in outs[1] and on_host0 in outs[0], outs
        assert "Traceback" not in outs[0] + outs[1]
    outs, codes, ended = zip(*run_pod(tmp_path / "full", 2, 1, *common, "--steps", "4", "--checkpoint_every", "2",
                                      wrappers={1: ["-c", full_disk.FULL_DISK_WRAPPER]}, distributed_timeout=120,
                                      expect=None))
    assert codes == (2, 2), outs
    assert abs(ended[0] - ended[1]) < 30, ended  # not the 45 s heartbeat
    assert "No space left on device" in outs[1] and "host 1 stopped the run: " in outs[0], outs
    assert "No space left on device" in outs[0].split("host 1 stopped the run: ")[1], outs[0][-1000:]
    assert "Traceback" not in outs[0] + outs[1] and "Terminating process" not in outs[0] + outs[1], outs
    assert checkpoint_steps(tmp_path / "full" / "checkpoints") == [2]


def test_val_loss_comes_from_held_out_data_only(tmp_path, caplog):
    identical_corpus(tmp_path / "train")
    identical_corpus(tmp_path / "held-out", count=16, seed=1)
    common = ["--data", str(tmp_path / "train"), "--steps", "2", "--eval_every", "1"]
    with caplog.at_level(logging.WARNING, logger="train"):
        run_inprocess(tmp_path, "none", *common)
    assert sum("no held-out data" in r.getMessage() for r in caplog.records) == 1
    assert not [m for m in read_metrics(tmp_path / "none" / "metrics.jsonl") if "val_loss" in m]
    val = {}
    for name, source in (("held", "held-out"), ("same", "train")):
        run_inprocess(tmp_path, name, *common, "--eval_data", str(tmp_path / source))
        val[name] = [m["val_loss"] for m in read_metrics(tmp_path / name / "metrics.jsonl") if "val_loss" in m]
        assert len(val[name]) == 2 and all(np.isfinite(val[name]))
    assert val["held"] != val["same"]  # it is the --eval_data samples that are scored
    # A corpus with a validation split (val-*.tar, as data.py build writes) is scored on it by default,
    # and a mixture of sources trains.
    split = tmp_path / "split"
    split.mkdir()
    for path in sorted((tmp_path / "train").glob("*.tar")):
        shutil.copy(path, split / path.name)
    for i, path in enumerate(sorted((tmp_path / "held-out").glob("*.tar"))):
        shutil.copy(path, split / f"val-{i}.tar")
    run_inprocess(tmp_path, "split", *common[2:], "--data", str(split))
    assert [m["val_loss"] for m in read_metrics(tmp_path / "split" / "metrics.jsonl") if "val_loss" in m] == val["held"]
    run_inprocess(tmp_path, "mixed", *common[2:], "--data", f"{tmp_path / 'train'}:0.5,{split}:0.5")
    assert len([m for m in read_metrics(tmp_path / "mixed" / "metrics.jsonl") if "val_loss" in m]) == 2


def test_a_hub_source_is_listed_once_and_evaluated_at_its_pinned_commit(tmp_path, hub):
    """A start lists each Hub source once (one revision lookup, one tree listing), and every pipeline
    of the run (training, validation) reads that listing; after a resume, validation still reads
    the commit the run is pinned to, whatever was pushed since."""
    identical_corpus(tmp_path / "train")
    identical_corpus(tmp_path / "held-out", count=16, seed=1)
    for path in sorted((tmp_path / "train").glob("*.tar")):
        hub.add_file("me/pinned", path.name, str(path), repo_type="dataset")
    for i, path in enumerate(sorted((tmp_path / "held-out").glob("*.tar"))):
        hub.add_file("me/pinned", f"val-{i}.tar", str(path), repo_type="dataset")
    pinned = hub.heads[("dataset", "me/pinned")]
    hub.requests.clear()
    common = ["--data", "hf://datasets/me/pinned", "--steps", "4", "--eval_every", "2", "--checkpoint_every", "2"]
    run_inprocess(tmp_path, "hub", *common, "--run_steps", "2")
    api = [path for _, path in hub.requests if path.startswith("/api/datasets/me/pinned")]
    assert sum("/revision/" in p for p in api) == 1 and sum("/tree/" in p for p in api) == 1, api
    # Another validation shard is pushed; the resumed run keeps scoring the pinned commit's.
    hub.add_file("me/pinned", "val-9.tar", str(sorted((tmp_path / "train").glob("*.tar"))[0]), repo_type="dataset")
    assert hub.heads[("dataset", "me/pinned")] != pinned
    hub.requests.clear()
    assert train_pretrain.main(["--run_dir", str(tmp_path / "hub")]) == 0
    downloads = [path for _, path in hub.requests if "/resolve/" in path]
    assert downloads and all(f"/resolve/{pinned}/" in p for p in downloads), downloads
    assert not any("val-9" in p for p in downloads)
    evals = [m["val_loss"] for m in read_metrics(tmp_path / "hub" / "metrics.jsonl") if "val_loss" in m]
    assert len(evals) == 2 and all(np.isfinite(evals))


def test_the_fake_devices_leave_xla_threads_to_spare():
    """A device waiting at a collective holds one of XLA:CPU's threads, and may wait at several at
    once: the suite's 8 fake devices get 4 threads each (conftest's PJRT_NPROC), not XLA's default
    of one, so the devices that are ahead never hold every thread while another still has to arrive.
    The suite's subprocesses do not inherit the setting: 32 threads would crowd a one-device run."""
    import jax

    mesh = jax.make_mesh((8,), ("d",))
    x = jax.device_put(np.ones(8, np.float32), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    assert float(jax.jit(lambda a: a.sum(), out_shardings=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))(x)) == 8.0

    def name(thread):
        try:
            with open(f"/proc/self/task/{thread}/comm") as f:
                return f.read().strip()
        except OSError:  # a thread that ended meanwhile
            return None

    names = [name(t) for t in os.listdir("/proc/self/task")]
    assert jax.device_count() == 8 and names.count("tf_XLAEigen") >= 4 * jax.device_count(), names
    assert "PJRT_NPROC" not in os.environ


def test_peak_flops_come_from_the_device_kind():
    peaks = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
             "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA A100-SXM4-80GB": 312e12}
    for kind, peak in peaks.items():
        assert train_pretrain.peak_flops(kind) == peak, kind
    assert train_pretrain.peak_flops("cpu") is None and train_pretrain.peak_flops("TPU v9 hyper") is None


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    """One 4-step run with EMA weights, audio samples every 2 steps (a random tiny codec),
    TensorBoard events and a profile of steps 2-3: (run directory, TensorBoard directory)."""
    tmp_path = tmp_path_factory.mktemp("sampled")
    codec = tmp_path / "codec.pth"
    assert dacvae.main(["init-random", str(codec), "--size", "tiny", "--seed", "3"]) in (0, None)
    texts = tmp_path / "texts.txt"
    texts.write_text("hello there\nsecond prompt\n")
    run = run_inprocess(tmp_path, "run", "--steps", "4", "--checkpoint_every", "1", "--keep_checkpoints", "0",
                        "--export_every", "1",
                        "--ema_decay", "0.5", "--sample_every", "2", "--sample_texts", str(texts),
                        "--dacvae_weights", str(codec), "--tensorboard_dir", str(tmp_path / "tb"),
                        "--profile_steps", "2:3", "--eval_every", "2", *SCORED)
    return run, tmp_path / "tb"


def test_ema_weights_follow_their_formula_into_the_export(sampled_run):
    run, _ = sampled_run
    exports = [checkpoint.load_checkpoint_file(str(run / "checkpoints" / f"step_{k:07d}.params.pkl"))
               for k in (1, 2, 3, 4)]
    for k in (1, 2, 3):  # ema(k+1) = d ema(k) + (1 - d) params(k+1), d = min(decay, (1 + k) / (10 + k))
        d = min(0.5, (1 + k) / (10 + k))
        want = {n: d * e + (1 - d) * p for (n, e), p in zip(echo.flatten(exports[k - 1]["ema_params"]).items(),
                                                            echo.flatten(exports[k]["params"]).values())}
        for name, value in echo.flatten(exports[k]["ema_params"]).items():
            np.testing.assert_allclose(value, want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert not all(np.array_equal(a, b) for a, b in zip(echo.flatten(exports[3]["params"]).values(),
                                                        echo.flatten(exports[3]["ema_params"]).values()))
    path = str(run / "checkpoints" / "step_0000004.params.pkl")
    ema, raw = inference.load_model(path), inference.load_model(path, weights="raw")
    first = lambda tree: echo.flatten(tree)[sorted(echo.flatten(tree))[0]]
    np.testing.assert_array_equal(first(ema.params), first(checkpoint.params_from_checkpoint(
        exports[3], ema.config, key="ema_params")))
    assert not np.array_equal(first(ema.params), first(raw.params))
    evals = [m for m in read_metrics(run / "metrics.jsonl") if m.get("event") == "eval"]
    assert len(evals) == 2 and all(np.isfinite(e["val_loss_ema"]) for e in evals if "val_loss" in e)


def test_an_unknown_chip_reports_no_mfu(sampled_run):
    metrics = read_metrics(sampled_run[0] / "metrics.jsonl")
    start = next(m for m in metrics if m.get("event") == "start")
    assert start["device_kind"] == "cpu" and start["peak_flops_per_chip"] is None
    assert not [m for m in metrics if "mfu" in m]


def test_audio_samples_are_written_and_announced(sampled_run):
    """At steps 2 and 4: two prompts plus a ground truth, 48 kHz wavs and PNG spectrograms, named by
    a samples event, in a directory whose name is no checkpoint's."""
    run, _ = sampled_run
    events = [m for m in read_metrics(run / "metrics.jsonl") if m.get("event") == "samples"]
    assert [e["step"] for e in events] == [2, 4] and all(e["weights"] == "ema" for e in events)
    assert os.path.dirname(events[-1]["index"]) == train_pretrain.samples_dir(str(run), 4)
    index = json.loads(open(events[-1]["index"]).read())
    assert [e["text"] for e in index["samples"]][:2] == ["hello there", "second prompt"]
    assert [e["kind"] for e in index["samples"]] == ["generated", "generated", "ground truth"]
    for entry in index["samples"]:
        audio, rate = soundfile.read(os.path.join(os.path.dirname(events[-1]["index"]), entry["wav"]))
        assert rate == 48000 and len(audio) > 0 and np.isfinite(audio).all()
        assert open(os.path.join(os.path.dirname(events[-1]["index"]), entry["spectrogram"]), "rb").read(4) == \
            b"\x89PNG"


def test_tensorboard_holds_every_step_the_evals_the_audio_and_a_profile(sampled_run):
    reader = plugin_event_accumulator.EventAccumulator(str(sampled_run[1]), size_guidance={"tensors": 0})
    reader.Reload()
    assert len(reader.Tensors("train/loss")) == 4 and len(reader.Tensors("eval/val_loss_ema")) == 2
    assert len(reader.Tensors("eval/synthetic_cer")) == 2
    assert len(reader.Tensors("full_eval/synthetic_cer_shuffled")) == 1
    assert any(t.startswith("train/loss_by_t/") for t in reader.PluginTagToContent("scalars"))
    assert len(reader.PluginTagToContent("audio")) == 3
    assert glob.glob(str(sampled_run[1] / "plugins" / "profile" / "*" / "*.xplane.pb"))


def test_the_dashboard_serves_exactly_the_sample_files(sampled_run):
    store = monitor.MetricsStore(str(sampled_run[0] / "metrics.jsonl"))
    store.poll()
    listed = store.samples()
    assert [s["step"] for s in listed] == [4, 2] and listed[0]["samples"][0]["text"] == "hello there"
    body, kind = store.sample_file(4, listed[0]["samples"][0]["audio"].split("/")[-1])
    assert body[:4] == b"RIFF" and kind == "audio/wav"
    assert store.sample_file(4, "index.json") is None and store.sample_file(4, "../metrics.jsonl") is None
    assert store.sample_file(3, listed[0]["samples"][0]["audio"].split("/")[-1]) is None


def test_a_resume_on_changed_shards_stops_unless_accepted(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    identical_corpus(corpus)
    flags = ["--data", str(corpus), "--steps", "4"]
    run_inprocess(tmp_path, "run", *flags, "--run_steps", "2")
    shutil.copy(corpus / "s0.tar", corpus / "s9.tar")  # a shard added between two runs
    capsys.readouterr()
    assert train_pretrain.main(["--run_dir", str(tmp_path / "run"), *FAST, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "changed since this run started: 1 added (s9.tar)" in err[0], err
    assert "--accept_data_change" in err[0]
    run_inprocess(tmp_path, "run", *flags, "--accept_data_change")
    saved = [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m.get("event") == "checkpoint"]
    assert saved[-1] == 4


def test_a_missing_peer_ends_with_a_clear_message(tmp_path):
    identical_corpus(tmp_path / "corpus")
    env = host_env(pod.coordinator_port(), 2, 0)  # host 1 never starts
    out = subprocess.run([sys.executable, os.path.join(REPO, "train_pretrain.py"), "--run_dir", str(tmp_path / "r"),
                          "--data", str(tmp_path / "corpus"), "--distributed_timeout", "5"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "only 1 of 2 hosts joined within 5 s" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_taken_rendezvous_port_ends_with_a_clear_message(tmp_path):
    import socket
    port = pod.coordinator_port()
    with socket.socket() as taken:  # another program listens on the port after the coordinator's
        taken.bind(("127.0.0.1", port + 1))
        taken.listen(1)
        out = subprocess.run([sys.executable, os.path.join(REPO, "train_pretrain.py"), "--run_dir",
                              str(tmp_path / "r"), "--distributed_timeout", "5"],
                             capture_output=True, text=True, env=host_env(port, 2, 0), timeout=120)
    assert out.returncode == 2 and f"cannot listen on 127.0.0.1:{port + 1}" in out.stderr, out.stderr[-1500:]
    assert "Traceback" not in out.stderr


def test_aot_compile_for_a_small_tpu_topology(capsys):
    pytest.importorskip("libtpu", reason="requirements-tpu.txt is not installed")
    code = train_pretrain.main(["--preset", "tiny", "--aot_topology", "v4:2x2x1", "--global_batch_size", "8",
                                "--max_latent_len", "96", "--max_text_len", "64", "--max_speaker_len", "96"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["chips"] == 4 and result["fits"] is True
    assert 0 < result["per_chip_bytes"] < result["hbm_bytes"] == 32 * 2 ** 30
    assert result["flops_per_step"] == 8 * echo.flops_per_sample(echo.PRESETS["tiny"], 96, 64, 96)
    assert result["compile_s"] > 0
    assert train_pretrain.main(["--aot_topology", "v5:2x2"]) == 2


def collectives_by_computation(hlo_text):
    """{computation name: number of collectives in it} of a compiled program's HLO text."""
    counts, computation = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and not line.startswith(" "):
            computation = "ENTRY" if header.group(1) else header.group(2)
        elif re.search(r"= .*\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(", line):
            counts[computation] = counts.get(computation, 0) + 1
    return counts


@pytest.mark.parametrize("unroll_scan", [False, True])
def test_a_cpu_pod_compiles_its_step_with_every_collective_outside_loops(unroll_scan):
    """XLA:CPU keeps collectives in program order only among those at the same level of a program;
    on a multi-process CPU run (gloo) every host must call them in one order, so the train step,
    scanned layers and micro-batch scan included, compiles with none inside a loop."""
    import flax.linen as nn
    import jax

    args = train_pretrain.parse_args(["--preset", "tiny", "--grad_accum", "2", "--global_batch_size", "8"])
    train_pretrain.resolve_defaults(args)
    config = dataclasses.replace(echo.PRESETS["tiny"], unroll_scan=unroll_scan)
    assert config.scan_layers
    # Two simulated hosts of one device each, as launch.sh --local 2 runs them.
    mesh = jax.make_mesh((1, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=jax.devices()[:2])
    rules = echo.logical_axis_rules()
    tx = train_pretrain.make_optimizer(args)
    abstract, shardings = train_pretrain.state_layout(config, tx, mesh, rules, ema=False)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding) for k, (shape, dtype) in {
        "latent": ((8, 16, 128), np.float32), "latent_mask": ((8, 16), np.int32), "text_ids": ((8, 12), np.int32),
        "text_mask": ((8, 12), np.int32), "speaker_latent": ((8, 16, 128), np.float32),
        "speaker_mask": ((8, 16), np.int32)}.items()}
    step_fn = train_pretrain.build_train_step(echo.EchoDiT(config), args)
    replicated = shardings["step"]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        hlo = jax.jit(step_fn, in_shardings=(shardings, batch_sharding, replicated)).lower(
            state, batch, train_pretrain.run_values(args)).compile().as_text()
    counts = collectives_by_computation(hlo)
    assert counts.get("ENTRY", 0) > 0
    in_loops = {name: n for name, n in counts.items() if name != "ENTRY"}
    if unroll_scan:
        assert in_loops == {}, in_loops
    else:  # what a scanned step looks like: the hazard this option removes
        assert sum(in_loops.values()) > 0


@pytest.fixture(scope="module")
def paced_run(tmp_path_factory):
    """One in-process run of 6 steps, an eval at step 4 that takes 4 s more (on_eval sleeps) and a
    checkpoint at 6; records how many step lines the metrics file held as each batch was fetched."""
    import data
    run_dir = tmp_path_factory.mktemp("paced")
    args = train_pretrain.resolve_defaults(train_pretrain.parse_args(
        ["--run_dir", str(run_dir), *FAST, "--steps", "6", "--eval_every", "4", "--checkpoint_every", "6",
         "--full_eval_samples", "4"]))
    lines_at_fetch, fetch = [], data.Pipeline.__next__

    def counting_fetch(pipeline):
        path = args.metrics_file
        lines_at_fetch.append(len(losses(read_metrics(path))) if os.path.exists(path) else 0)
        return fetch(pipeline)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data.Pipeline, "__next__", counting_fetch)
        train_pretrain.train(args, on_eval=lambda step, fields: time.sleep(4))
    return read_metrics(args.metrics_file), lines_at_fetch


def test_step_time_leaves_out_the_pauses_for_evaluation(paced_run):
    """Step 5 follows the 4 s eval of step 4: its step time and samples/s are a step's, not the eval's."""
    metrics, _ = paced_run
    steps = {m["step"]: m for m in metrics if "loss" in m and "event" not in m}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert steps[5]["step_time"] < 2.0, steps[5]
    assert steps[5]["samples_per_sec"] > 8 / 2.0


def test_evals_without_samples_give_val_loss_only(paced_run):
    """--eval_samples 0 (FAST): the periodic evals score held-out batches and sample nothing; the full
    eval at the run's end (--full_eval_samples 4) still samples and scores."""
    metrics, _ = paced_run
    evals = [m for m in metrics if m.get("event") == "eval"]
    assert [m["step"] for m in evals] == [4, 6] and all(np.isfinite(m["val_loss"]) for m in evals), evals
    assert not [k for m in evals for k in m if k.startswith("synthetic_")], evals
    full = [m for m in metrics if m.get("event") == "full_eval"]
    assert [(m["step"], m["samples"]) for m in full] == [(6, 4)] and np.isfinite(full[0]["synthetic_cer"]), full


def test_a_step_is_logged_once_the_next_is_dispatched(paced_run):
    """With --log_every 1 no host waits for the step in flight: when the batch of step k is fetched,
    the metrics hold steps 1..k-2 (step k-1 is still running), except after a pause (the eval at 4)."""
    _, lines_at_fetch = paced_run
    assert lines_at_fetch[-6:] == [0, 0, 1, 2, 4, 4]  # the training batches come after the held-out ones
