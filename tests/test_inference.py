import dataclasses
import json
import os
import pickle
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile
from conftest import COMPILE_CACHE, EarlyRun, REPO, UNREACHABLE_HUB

import checkpoint
import dacvae
import data
import inference
import model as echo
import train_pretrain

MAX_LATENT, MAX_TEXT, MAX_SPEAKER = 80, 48, 48
HOP = 1920


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny checkpoint written by train_pretrain.py and codec weights from `dacvae.py init-random`."""
    root = tmp_path_factory.mktemp("inference")
    code = train_pretrain.main(["--preset", "tiny", "--synthetic_corpus", "short", "--run_dir", str(root / "run"),
                                "--steps", "3", "--global_batch_size", "8",
                                "--max_latent_len", str(MAX_LATENT), "--max_text_len", str(MAX_TEXT),
                                "--max_speaker_len", str(MAX_SPEAKER), "--eval_every", "100", "--eval_samples", "0",
                                "--full_eval_samples", "0",
                                "--compile_cache_dir", COMPILE_CACHE])
    assert code == 0
    weights = root / "codec.pth"
    assert dacvae.main(["init-random", str(weights), "--size", "tiny", "--seed", "1"]) in (0, None)
    checkpoints = root / "run" / "checkpoints"
    assert train_pretrain.main(["export", str(checkpoints), str(checkpoints / "step_0000003.pkl")]) == 0
    return {"root": root, "full": str(checkpoints / "step_0000003.pkl"), "dir": str(checkpoints),
            "params": str(checkpoints / "step_0000003.params.pkl"), "codec": str(weights)}


@pytest.fixture(scope="module", autouse=True)
def unreachable_hub_inference(run, tmp_path_factory):
    """inference.py with no codec weights and the Hub unreachable, from the module's start (it waits
    out the Hub client's retries): its output path and its EarlyRun."""
    out = tmp_path_factory.mktemp("unreachable_hub") / "o.wav"
    early = EarlyRun([sys.executable, os.path.join(REPO, "inference.py"), "--checkpoint", run["params"], "--text",
                      "hi", "--output", str(out), "--compile_cache_dir", ""],
                     {**os.environ, **UNREACHABLE_HUB})
    yield out, early
    early.close()


@pytest.fixture(scope="module")
def loaded(run):
    return inference.load_model(run["params"])


@pytest.fixture(scope="module")
def perturbed(loaded):
    """The checkpoint after 3 steps barely depends on its conditions (out_proj starts at zero):
    random weights on top make every guidance pass count."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (a + rng.normal(0, 0.2, a.shape)).astype(np.float32), loaded.params)
    return inference.dataclasses.replace(loaded, params=params)


@pytest.fixture(scope="module")
def codec(run):
    return dacvae.DACVAE.load(run["codec"])


def cli(run, tmp_path, *args, checkpoint="params"):
    """Run the CLI in-process; returns (exit code, stderr)."""
    return inference.main(["--checkpoint", run[checkpoint], "--dacvae_weights", run["codec"],
                           "--compile_cache_dir", COMPILE_CACHE, *args])


def read_wav(path):
    audio, rate = soundfile.read(str(path), dtype="float32")
    assert rate == 48000
    return audio


def speech_like(seconds, rate, channels, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
         + 0.02 * rng.normal(size=t.shape)).astype(np.float32)
    return np.stack([x, 0.7 * x], axis=1) if channels == 2 else x


# ---------------------------------------------------------------- the CLI end to end

def test_cli_without_reference_writes_a_48k_wav_of_the_right_length(run, tmp_path, capsys):
    out = tmp_path / "out.wav"
    assert cli(run, tmp_path, "--text", "Hello, this is a test.", "--output", str(out), "--duration", "2",
               "--steps", "4") == 0
    audio = read_wav(out)
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0
    # 2 s = 50 frames at most; trimming may only shorten it, in whole frames.
    assert len(audio) % HOP == 0 and 0 < len(audio) <= 50 * HOP
    timing = capsys.readouterr().out
    for word in ("load", "compile", "sampling", "decoding", "real-time factor"):
        assert word in timing
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary left behind


@pytest.mark.parametrize("fmt, rate, channels", [("wav", 22050, 1), ("flac", 44100, 2), ("mp3", 48000, 1),
                                                 ("mp3", 22050, 2), ("wav", 48000, 2), ("flac", 22050, 1)])
def test_cli_with_references_in_every_format_rate_and_layout(run, tmp_path, fmt, rate, channels):
    ref = tmp_path / f"ref.{fmt}"
    soundfile.write(str(ref), speech_like(1.5, rate, channels), rate)
    out = tmp_path / "cloned.wav"
    assert cli(run, tmp_path, "--text", "Say it in my voice.", "--speaker_ref", str(ref), "--output", str(out),
               "--duration", "1.6", "--steps", "3", "--seed", "5") == 0
    audio = read_wav(out)
    assert np.isfinite(audio).all() and len(audio) % HOP == 0 and 0 < len(audio) <= 40 * HOP


def test_bfloat16_compute_stays_close_to_float32(run, perturbed, tmp_path):
    bf16 = inference.dataclasses.replace(
        perturbed, config=inference.dataclasses.replace(perturbed.config, dtype="bfloat16"),
        module=echo.EchoDiT(inference.dataclasses.replace(perturbed.config, dtype="bfloat16")))
    inputs = conditions(perturbed)
    outs = [inference.sample_latents(m.module, m.params, *inputs, steps=3, seed=2, num_frames=20, progress=False)
            for m in (perturbed, bf16)]
    rel = np.linalg.norm(outs[1] - outs[0]) / np.linalg.norm(outs[0])
    assert 0 < rel < 5e-2, rel
    out = tmp_path / "bf16.wav"
    assert cli(run, tmp_path, "--text", "Half precision.", "--output", str(out), "--duration", "1", "--steps", "2",
               "--dtype", "bfloat16") == 0
    assert np.isfinite(read_wav(out)).all()


def test_reference_changes_the_output_and_is_encoded_to_the_model_length(run, loaded, codec, tmp_path):
    ref = tmp_path / "ref.wav"
    soundfile.write(str(ref), speech_like(3.0, 44100, 1), 44100)  # 75 frames > MAX_SPEAKER
    latent, mask = inference.encode_reference(str(ref), codec, loaded.max_speaker_len)
    assert latent.shape == (MAX_SPEAKER, 128) and mask.sum() == MAX_SPEAKER
    short = tmp_path / "short.wav"
    soundfile.write(str(short), speech_like(0.9, 48000, 1), 48000)  # 23 frames: padded, masked
    latent, mask = inference.encode_reference(str(short), codec, loaded.max_speaker_len)
    assert mask.sum() == 23 and np.all(latent[23:] == 0) and np.abs(latent[:23]).sum() > 0
    with_ref = inference.synthesize(loaded, codec, "Hello there.", speaker_ref=str(ref), steps=2, duration=1.0,
                                    progress=False)
    without = inference.synthesize(loaded, codec, "Hello there.", steps=2, duration=1.0, progress=False)
    assert not np.array_equal(with_ref, without)


def test_full_checkpoint_loads_like_the_weights_only_file(run, loaded, caplog):
    with caplog.at_level("INFO"):
        full = inference.load_model(run["full"])
    assert "loads faster" in caplog.text
    assert full.config == loaded.config and full.step == 3
    assert (full.max_latent_len, full.max_text_len, full.max_speaker_len) == (MAX_LATENT, MAX_TEXT, MAX_SPEAKER)
    assert full.silence_frame is not None and full.silence_frame.shape == (128,)
    for k, v in echo.flatten(full.params).items():
        np.testing.assert_array_equal(v, echo.flatten(loaded.params)[k])


def test_a_training_checkpoint_directory_loads(run, loaded, tmp_path):
    """The checkpoint directory (its newest step), one step directory, and a step without its
    .params.pkl export (a preemption save), read from the sharded checkpoint itself."""
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(os.path.join(run["dir"], "step_0000003"), bare / "step_0000003")
    for path in (run["dir"], os.path.join(run["dir"], "step_0000003"), str(bare), str(bare / "step_0000003")):
        other = inference.load_model(path)
        assert other.step == 3 and other.config == loaded.config and other.max_text_len == loaded.max_text_len
        np.testing.assert_array_equal(other.silence_frame, loaded.silence_frame)
        for k, v in echo.flatten(other.params).items():
            np.testing.assert_array_equal(np.asarray(v), np.asarray(echo.flatten(loaded.params)[k]), err_msg=k)


def test_reference_layout_and_boxed_checkpoints_load(run, loaded, tmp_path):
    flat = echo.export_reference_params(loaded.params, loaded.config)
    ref_layout = tmp_path / "reference_layout.pkl"
    with open(ref_layout, "wb") as f:  # no config: inferred from the shapes
        pickle.dump({"params": echo.unflatten(flat)}, f)
    boxed = tmp_path / "boxed.pkl"
    boxed_params = jax.tree.map(lambda a: __import__("flax").linen.LogicallyPartitioned(a, ("x",) * a.ndim),
                                loaded.params)
    with open(boxed, "wb") as f:
        pickle.dump({"params": boxed_params}, f)
    for path in (ref_layout, boxed):
        other = inference.load_model(str(path))
        assert other.config.model_size == loaded.config.model_size
        for k, v in echo.flatten(other.params).items():
            np.testing.assert_array_equal(np.asarray(v), np.asarray(echo.flatten(loaded.params)[k]), err_msg=k)
    # A file without EMA weights loads its params; asking for EMA weights it lacks is one sentence.
    with pytest.raises(inference.InferenceError, match="holds no EMA weights.*--weights raw"):
        inference.load_model(str(ref_layout), weights="ema")


# ---------------------------------------------------------------- determinism and guidance

def test_same_seed_is_bit_identical_and_another_seed_differs(run, tmp_path):
    outs = []
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        out = tmp_path / f"{name}.wav"
        assert cli(run, tmp_path, "--text", "Reproducible speech.", "--output", str(out), "--duration", "1.2",
                   "--steps", "3", "--seed", seed) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def conditions(loaded, text="[S1] A sample text.", with_speaker=True):
    ids, mask = data.encode_text(text, loaded.max_text_len)
    rng = np.random.default_rng(0)
    spk = rng.normal(size=(1, loaded.max_speaker_len, 128)).astype(np.float32)
    spk_mask = np.zeros((1, loaded.max_speaker_len), np.int32)
    spk_mask[:, :40] = 1 if with_speaker else 0
    return ids[None], mask[None], spk, spk_mask


def plain_sampler(loaded, text_ids, text_mask, spk, spk_mask, steps, seed, frames, scales, min_t=0.0, max_t=1.0):
    """Guidance written out the obvious way: full model calls, conditions dropped as in training."""
    apply = jax.jit(lambda x, t, ti, tm, s, sm: loaded.module.apply({"params": loaded.params}, x, t, ti, tm, s, sm))
    x = jax.random.normal(jax.random.key(seed), (1, frames, 128), jnp.float32)
    ts = np.linspace(1.0, 0.0, steps + 1, dtype=np.float32)
    no_text = np.zeros_like(text_mask)
    no_spk, no_spk_mask = np.zeros_like(spk), np.zeros_like(spk_mask)
    for k in range(steps):
        t = jnp.full((1,), ts[k])
        v_c = apply(x, t, text_ids, text_mask, spk, spk_mask)
        if min_t <= ts[k] <= max_t:
            if len(scales) == 1:
                v_u = apply(x, t, text_ids, no_text, no_spk, no_spk_mask)
                v = v_c + scales[0] * (v_c - v_u)
            else:
                v_nt = apply(x, t, text_ids, no_text, spk, spk_mask)
                v_ns = apply(x, t, text_ids, text_mask, no_spk, no_spk_mask)
                v = v_c + scales[0] * (v_c - v_nt) + scales[1] * (v_c - v_ns)
        else:
            v = v_c
        x = x + (ts[k + 1] - ts[k]) * v
    return np.asarray(x)


def test_joint_cfg_scale_zero_equals_the_conditional_only_result(perturbed):
    inputs = conditions(perturbed)
    got = inference.sample_latents(perturbed.module, perturbed.params, *inputs, steps=4, cfg_scale=0.0, seed=3,
                                   num_frames=30, progress=False)
    want = plain_sampler(perturbed, *inputs, steps=4, seed=3, frames=30, scales=(0.0,), min_t=2.0)  # never guided
    np.testing.assert_allclose(got, want, atol=1e-5)
    guided = inference.sample_latents(perturbed.module, perturbed.params, *inputs, steps=4, cfg_scale=3.0, seed=3,
                                      num_frames=30, progress=False)
    assert np.abs(guided - got).max() > 1e-3


@pytest.mark.parametrize("scales, interval", [((3.0,), (0.0, 1.0)), ((2.0, 4.0), (0.0, 1.0)),
                                              ((1.5, 0.5), (0.3, 0.8))])
def test_guidance_matches_a_plain_implementation(perturbed, scales, interval):
    inputs = conditions(perturbed)
    kwargs = dict(cfg_scale=scales[0]) if len(scales) == 1 else dict(cfg_text=scales[0], cfg_speaker=scales[1])
    got = inference.sample_latents(perturbed.module, perturbed.params, *inputs, steps=5, seed=11, num_frames=24,
                                   cfg_min_t=interval[0], cfg_max_t=interval[1], progress=False, **kwargs)
    want = plain_sampler(perturbed, *inputs, steps=5, seed=11, frames=24, scales=scales, min_t=interval[0],
                         max_t=interval[1])
    np.testing.assert_allclose(got, want, atol=1e-4)


# ---------------------------------------------------------------- trimming, text, batch

def test_trimming_keeps_speech_and_at_most_a_short_tail():
    rng = np.random.default_rng(0)
    silence = rng.normal(0, 0.1, 128).astype(np.float32)
    speech = rng.normal(0, 1.0, (40, 128)).astype(np.float32)
    speech[15:22] = silence + rng.normal(0, 0.02, (7, 128))  # a pause inside the speech stays
    latent = np.concatenate([speech, silence + rng.normal(0, 0.05, (60, 128)).astype(np.float32)])
    trimmed = inference.trim_trailing_silence(latent, silence)
    assert len(trimmed) == 40 + inference.TAIL_FRAMES
    assert inference.TAIL_FRAMES / 25 <= 0.3
    np.testing.assert_array_equal(trimmed, latent[:len(trimmed)])
    # Speech up to the last frame: nothing is cut.
    assert len(inference.trim_trailing_silence(speech, silence)) == 40
    # All silence: only the short tail remains; tolerance 0 disables trimming.
    assert len(inference.trim_trailing_silence(latent[45:], silence)) == inference.TAIL_FRAMES
    assert len(inference.trim_trailing_silence(latent, silence, tolerance=0)) == 100


def test_the_cli_trims_what_the_model_ends_with(run, loaded, codec, tmp_path, monkeypatch):
    """A model whose output ends in its silence latent gets a file that ends 0.2 s after the speech."""
    speech_frames = 20
    real = inference.sample_latents

    def ends_in_silence(*args, **kwargs):
        x = real(*args, **kwargs)
        x[:, speech_frames:] = loaded.silence_frame
        return x

    monkeypatch.setattr(inference, "sample_latents", ends_in_silence)
    out = tmp_path / "trimmed.wav"
    assert cli(run, tmp_path, "--text", "Short.", "--output", str(out), "--duration", "3", "--steps", "2") == 0
    assert len(read_wav(out)) == (speech_frames + inference.TAIL_FRAMES) * HOP


def test_long_text_is_split_at_sentences_and_never_cut():
    text = ("The quick brown fox jumps. It lands on a log! Does the log hold? "
            "Then a very long clause without any full stop, going on and on, until it ends.")
    chunks = inference.prepare_text(text, MAX_TEXT)
    assert len(chunks) > 2
    spoken = []
    for ids, mask in chunks:
        assert ids.shape == (MAX_TEXT,) and mask.sum() <= MAX_TEXT
        raw = bytes(ids[1:mask.sum()].astype(np.uint8)).decode()
        assert raw.startswith("[S1] ")
        spoken.append(raw[len("[S1] "):])
    assert " ".join(spoken).split() == text.split()
    assert spoken[0] == "The quick brown fox jumps."  # a sentence boundary, not the byte limit
    with pytest.raises(inference.InferenceError, match="word too long"):
        inference.prepare_text("x" * 100, MAX_TEXT)
    for empty in ("", "   \n\t"):
        with pytest.raises(inference.InferenceError, match="empty"):
            inference.prepare_text(empty)


def test_long_text_cli_joins_several_generations(run, tmp_path, capsys):
    text = "First sentence is here. Second one follows it. A third closes the text."
    assert len(inference.prepare_text(text, MAX_TEXT)) == 3
    out = tmp_path / "long.wav"
    assert cli(run, tmp_path, "--text", text, "--output", str(out), "--duration", "1", "--steps", "2",
               "--trim_tolerance", "0") == 0
    crossfade = int(inference.CROSSFADE_SECONDS * 48000)
    assert len(read_wav(out)) == 3 * 25 * HOP - 2 * crossfade


def test_batch_mode_text_file_and_jsonl(run, tmp_path, capsys):
    lines = tmp_path / "lines.txt"
    lines.write_text("First line.\n\nSecond line!\nThird, and last.\n")
    outdir = tmp_path / "batch"
    assert cli(run, tmp_path, "--text_file", str(lines), "--output", str(outdir), "--duration", "1",
               "--steps", "2") == 0
    assert sorted(os.listdir(outdir)) == ["0001.wav", "0002.wav", "0003.wav", "summary.json"]
    summary = json.loads((outdir / "summary.json").read_text())
    assert [s["text"] for s in summary] == ["First line.", "Second line!", "Third, and last."]
    assert all(s["ok"] and s["seconds"] > 0 for s in summary)
    printed = capsys.readouterr().out
    assert printed.count("compile") == 1 and "3 of 3 utterances" in printed

    ref = tmp_path / "voice.flac"
    soundfile.write(str(ref), speech_like(1.0, 44100, 1), 44100)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(j) for j in [
        {"text": "One.", "output": "one.wav", "seed": 1},
        {"text": "Two.", "output": "../../escape", "speaker_ref": "voice.flac"},  # beside the jobs file
        {"text": "   ", "output": "empty.wav"},
    ]) + "\n")
    outdir = tmp_path / "jobs"
    assert cli(run, tmp_path, "--input_jsonl", str(jobs), "--output", str(outdir), "--duration", "1",
               "--steps", "2") == 1  # one utterance failed: reported, the others written
    assert sorted(os.listdir(outdir)) == ["escape.wav", "one.wav", "summary.json"]
    summary = json.loads((outdir / "summary.json").read_text())
    assert [s["ok"] for s in summary] == [True, True, False] and "empty" in summary[2]["error"]
    assert summary[1]["speaker_ref"] == str(ref)
    assert not (tmp_path / "escape.wav").exists()


def test_latents_in_and_out(run, perturbed, tmp_path, monkeypatch):
    """--speaker_latent replaces audio; --save_latent writes the trimmed latent in the shards' format."""
    monkeypatch.setattr(inference, "load_model", lambda *a, **k: perturbed)  # a model that uses its conditions
    ref = tmp_path / "voice.ref.npy"
    np.save(ref, np.random.default_rng(3).normal(size=(60, 128)).astype(np.float16))  # longer than trained: cropped
    common = ["--text", "Latents in and out.", "--duration", "1.2", "--steps", "3", "--trim_tolerance", "0"]
    paths = {}
    for name, extra in (("plain", []), ("voice", ["--speaker_latent", str(ref)])):
        paths[name] = tmp_path / f"{name}.npy"
        assert cli(run, tmp_path, *common, *extra, "--output", str(tmp_path / f"{name}.wav"),
                   "--save_latent", str(paths[name])) == 0
    plain, voice = np.load(paths["plain"]), np.load(paths["voice"])
    assert plain.shape == (30, 128) and plain.dtype == np.float16 and np.isfinite(plain).all()
    assert not np.array_equal(plain, voice)
    # The saved latent is exactly what was decoded into the wav.
    codec = dacvae.DACVAE.load(run["codec"])
    import torch
    wave = codec.decode(torch.from_numpy(plain.astype(np.float32).T)[None])[0, 0].numpy()
    written = read_wav(tmp_path / "plain.wav")
    assert len(written) == len(wave) and np.corrcoef(written, wave)[0, 1] > 0.98  # up to float16 rounding
    # Batch mode: one NAME.npy per NAME.wav in the --save_latent directory.
    lines = tmp_path / "lines.txt"
    lines.write_text("One.\nTwo.\n")
    assert cli(run, tmp_path, "--text_file", str(lines), "--output", str(tmp_path / "batch"), "--duration", "1",
               "--steps", "2", "--save_latent", str(tmp_path / "latents")) == 0
    assert sorted(os.listdir(tmp_path / "latents")) == ["0001.npy", "0002.npy"]
    summary = json.loads((tmp_path / "batch" / "summary.json").read_text())
    assert [os.path.basename(e["latent"]) for e in summary] == ["0001.npy", "0002.npy"]


def test_canvas_trained_samples_the_trained_length_then_cuts(run, perturbed, tmp_path, monkeypatch):
    monkeypatch.setattr(inference, "load_model", lambda *a, **k: perturbed)
    latents = {}
    for canvas in ("duration", "trained"):
        latents[canvas] = tmp_path / f"{canvas}.npy"
        assert cli(run, tmp_path, "--text", "Canvas.", "--duration", "1", "--steps", "2", "--trim_tolerance", "0",
                   "--canvas", canvas, "--output", str(tmp_path / f"{canvas}.wav"),
                   "--save_latent", str(latents[canvas])) == 0
    (ids, mask), = inference.prepare_text("Canvas.", MAX_TEXT)
    speaker = (np.zeros((1, MAX_SPEAKER, 128), np.float32), np.zeros((1, MAX_SPEAKER), np.int32))
    for canvas, frames in (("duration", 25), ("trained", MAX_LATENT)):
        z = inference.sample_latents(perturbed.module, perturbed.params, ids[None], mask[None], *speaker, steps=2,
                                     seed=42, num_frames=frames, progress=False)[0]
        np.testing.assert_array_equal(np.load(latents[canvas]), z[:25].astype(np.float16))
    assert not np.array_equal(np.load(latents["duration"]), np.load(latents["trained"]))


# ---------------------------------------------------------------- blockwise generation

@pytest.fixture(scope="module")
def blockwise(run, tmp_path_factory):
    """A checkpoint of tiny-blockwise, its layers unrolled as the demo's are, with random weights that
    use every condition and the prefix."""
    config = dataclasses.replace(echo.PRESETS["tiny-blockwise"], scan_layers=False)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: (np.asarray(a) + rng.normal(0, 0.2, a.shape)).astype(np.float32),
                          nn.unbox(echo.init_params(config, jax.random.key(1))))
    payload = checkpoint.load_checkpoint_file(run["params"])
    payload.update(params=params, ema_params=params, config=dataclasses.asdict(config))
    path = tmp_path_factory.mktemp("blockwise") / "blockwise.params.pkl"
    with open(path, "wb") as f:
        pickle.dump(payload, f)
    return str(path)


def test_each_block_is_sampled_from_every_frame_before_it(blockwise):
    """One Euler step per block, against the model's forward with the prefix and start_pos: the
    given frames and the blocks before are the prefix, positions run on, and guidance keeps the
    prefix in its unconditional pass."""
    loaded = inference.load_model(blockwise)
    assert loaded.config.blockwise and loaded.config.scan_layers
    (ids, mask), = inference.prepare_text("[S1] Blocks.", MAX_TEXT)
    speaker = (np.zeros((1, MAX_SPEAKER, 128), np.float32), np.zeros((1, MAX_SPEAKER), np.int32))
    given = np.random.default_rng(2).normal(size=(1, 8, 128)).astype(np.float32)
    for cfg in (0.0, 2.0):
        z = inference.sample_latents(loaded.module, loaded.params, ids[None], mask[None], *speaker, steps=1,
                                     cfg_scale=cfg, seed=3, blocks=[8, 6], prefix=given, progress=False)
        assert z.shape == (1, 14, 128)
        frames = np.concatenate([given, z], axis=1)
        for start, length in ((8, 8), (16, 6)):
            prefix = np.zeros((1, 24, 128), np.float32)
            prefix[:, :start] = frames[:, :start]
            x = np.asarray(inference.initial_noise(3, 1, start + length, 128))[:, start:]

            def velocity(keep):
                return loaded.module.apply({"params": loaded.params}, x, jnp.ones(1), ids[None], mask[None] * keep,
                                           speaker[0], speaker[1] * keep, prefix_latent=prefix, start_pos=start)
            v = velocity(1) if cfg == 0 else velocity(1) + cfg * (velocity(1) - velocity(0))
            np.testing.assert_allclose(frames[:, start:start + length], x - v, rtol=1e-4, atol=1e-4)


def test_the_cli_samples_blocks_and_continues_a_recording(run, blockwise, tmp_path, capsys):
    common = ["--checkpoint", blockwise, "--text", "[S1] Go on.", "--duration", "1", "--steps", "2",
              "--trim_tolerance", "0"]
    latent = tmp_path / "blocks.npy"
    assert cli(run, tmp_path, *common, "--blocks", "8,rest", "--output", str(tmp_path / "blocks.wav"),
               "--save_latent", str(latent)) == 0
    loaded = inference.load_model(blockwise)
    (ids, mask), = inference.prepare_text("[S1] Go on.", MAX_TEXT)
    speaker = (np.zeros((1, MAX_SPEAKER, 128), np.float32), np.zeros((1, MAX_SPEAKER), np.int32))
    expect = inference.sample_latents(loaded.module, loaded.params, ids[None], mask[None], *speaker, steps=2,
                                      seed=42, blocks=[8, 17], progress=False)[0]
    np.testing.assert_array_equal(np.load(latent), expect.astype(np.float16))
    assert len(read_wav(tmp_path / "blocks.wav")) == 25 * HOP
    # --continue_from: the output holds the recording's frames (whole patches: its first frames go),
    # then 1 s more.
    given = tmp_path / "given.npy"
    np.save(given, np.random.default_rng(4).normal(size=(14, 128)).astype(np.float16))
    assert cli(run, tmp_path, *common, "--continue_from", str(given), "--blocks", "12,rest", "--output",
               str(tmp_path / "more.wav"), "--save_latent", str(tmp_path / "more.npy")) == 0
    more = np.load(tmp_path / "more.npy")
    assert more.shape == (12 + 25, 128)
    np.testing.assert_array_equal(more[:12], np.load(given)[2:])
    # Every knob applies to every block: independent guidance, the speaker force, truncation, rescaling.
    assert cli(run, tmp_path, *common, "--blocks", "8,rest", "--cfg_text", "2", "--cfg_speaker", "3",
               "--speaker_kv_scale", "1.5", "--speaker_kv_min_t", "0.5", "--truncation", "0.8", "--rescale_k", "1.2",
               "--rescale_sigma", "3", "--output", str(tmp_path / "knobs.wav")) == 0
    # A recording as audio goes through the codec: 25 frames of it, cut to 24.
    assert cli(run, tmp_path, *common, "--continue_from", str(tmp_path / "blocks.wav"), "--output",
               str(tmp_path / "audio.wav"), "--save_latent", str(tmp_path / "audio.npy")) == 0
    assert np.load(tmp_path / "audio.npy").shape == (24 + 25, 128)
    capsys.readouterr()
    for flags, needles in ((["--blocks", "16,16"], ("32 frames do not fit the canvas of 25",)),
                           (["--blocks", "24,rest", "--duration", "0.96"], ("'rest' would be empty",))):
        one_sentence_error(capsys, cli(run, tmp_path, *common, *flags, "--output", str(tmp_path / "x.wav")),
                           *needles)
    short_recording = tmp_path / "short.npy"
    np.save(short_recording, np.zeros((3, 128), np.float16))
    one_sentence_error(capsys, cli(run, tmp_path, *common, "--continue_from", str(short_recording), "--output",
                                   str(tmp_path / "x.wav")), "short.npy", "at least 4")
    assert not os.path.exists(tmp_path / "x.wav")
    # A recording as long as the trained canvas: the model continues from its last half.
    long_recording = tmp_path / "long.npy"
    np.save(long_recording, np.random.default_rng(5).normal(size=(MAX_LATENT, 128)).astype(np.float16))
    assert cli(run, tmp_path, *common, "--continue_from", str(long_recording), "--output", str(tmp_path / "l.wav"),
               "--save_latent", str(tmp_path / "long_out.npy")) == 0
    assert np.load(tmp_path / "long_out.npy").shape == (MAX_LATENT + 25, 128)


# ---------------------------------------------------------------- errors

class Boom:
    def __reduce__(self):
        return (os.system, (f"touch {BOOM_FILE}",))


BOOM_FILE = "/tmp/echo_inference_pickle_ran"


def test_restricted_unpickling_refuses_a_crafted_pickle(run, tmp_path, capsys):
    if os.path.exists(BOOM_FILE):
        os.remove(BOOM_FILE)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"params": {"x": Boom()}}))
    assert inference.main(["--checkpoint", str(evil), "--text", "hi", "--output", str(tmp_path / "o.wav"),
                           "--dacvae_weights", run["codec"]]) == 1
    err = capsys.readouterr().err
    assert "not a safe checkpoint" in err and "system" in err
    assert not os.path.exists(BOOM_FILE)
    with pytest.raises(checkpoint.CheckpointError):
        inference.load_model(str(evil))


def one_sentence_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code != 0, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_every_user_error_is_one_clear_sentence(run, tmp_path, capsys):
    out = str(tmp_path / "o.wav")
    base = ["--dacvae_weights", run["codec"], "--output", out]
    corrupt = tmp_path / "corrupt.pkl"
    corrupt.write_bytes(os.urandom(3000))
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(open(run["params"], "rb").read()[:5000])
    incompatible = tmp_path / "other.pkl"
    payload = checkpoint.load_checkpoint_file(run["params"])
    for key in ("params", "ema_params"):  # the EMA weights are the ones inference loads
        payload[key]["in_proj"]["kernel"] = np.zeros((128, 7), np.float32)
    with open(incompatible, "wb") as f:
        pickle.dump(payload, f)
    damaged = tmp_path / "damaged" / "step_0000003"  # a preemption save (no export) missing a chunk
    shutil.copytree(os.path.join(run["dir"], "step_0000003"), damaged)
    next(f for f in sorted((damaged / "state").glob("params.*/*")) if not f.name.startswith(".")).unlink()
    not_echo = tmp_path / "not_echo.pkl"
    not_echo.write_bytes(pickle.dumps({"weights": [1, 2]}))
    not_audio = tmp_path / "ref.wav"
    not_audio.write_text("not audio at all")
    wrong_width, ints = tmp_path / "wrong_width.npy", tmp_path / "ints.npy"
    np.save(wrong_width, np.zeros((10, 64), np.float16))
    np.save(ints, np.zeros((10, 128), np.int32))
    cases = [
        (["--checkpoint", str(tmp_path / "none.pkl"), "--text", "hi"], ("does not exist",)),
        (["--checkpoint", str(tmp_path), "--text", "hi"], ("holds no complete training checkpoint",)),
        (["--checkpoint", str(corrupt), "--text", "hi"], (str(corrupt),)),
        (["--checkpoint", str(truncated), "--text", "hi"], (str(truncated),)),
        (["--checkpoint", str(incompatible), "--text", "hi"], (str(incompatible),)),
        (["--checkpoint", str(not_echo), "--text", "hi"], ("not an Echo checkpoint",)),
        (["--checkpoint", str(damaged.parent), "--text", "hi"], (str(damaged), "not a readable checkpoint")),
        (["--checkpoint", run["params"], "--text", "  "], ("text is empty",)),
        (["--checkpoint", run["params"], "--text", "hi", "--speaker_ref", str(tmp_path / "nope.mp3")],
         ("nope.mp3", "does not exist")),
        (["--checkpoint", run["params"], "--text", "hi", "--speaker_ref", str(not_audio)],
         ("ref.wav", "not a readable audio file")),
        (["--checkpoint", run["params"], "--text", "hi", "--steps", "0"], ("--steps",)),
        (["--checkpoint", run["params"], "--text", "hi", "--duration", "-2"], ("--duration",)),
        (["--checkpoint", run["params"], "--text", "hi", "--cfg_min_t", "0.9", "--cfg_max_t", "0.1"],
         ("--cfg_min_t",)),
        (["--checkpoint", run["params"], "--text", "hi", "--dacvae_weights", str(tmp_path / "codec.pth")],
         ("codec.pth",)),
        (["--checkpoint", run["params"], "--text", "hi", "--sampler_preset", "Fast"],
         ("unknown --sampler_preset 'Fast'", "Independent-Low-CFG")),
        (["--checkpoint", run["params"], "--text", "hi", "--rescale_k", "1.2"], ("--rescale_sigma",)),
        (["--checkpoint", run["params"], "--text", "hi", "--sway", "3"], ("--sway",)),
        (["--checkpoint", run["params"], "--text", "hi", "--speaker_kv_scale", "2", "--speaker_kv_max_layers",
          "99"], ("--speaker_kv_max_layers 99",)),
        (["--checkpoint", run["params"], "--text", "hi", "--speaker_latent", str(wrong_width)],
         ("wrong_width.npy", "(10, 64)")),
        (["--checkpoint", run["params"], "--text", "hi", "--speaker_latent", str(ints)], ("ints.npy", "int32")),
        (["--checkpoint", run["params"], "--text", "hi", "--speaker_latent", str(not_audio)],
         ("ref.wav", "not a readable .npy")),
        (["--checkpoint", run["params"], "--text", "hi", "--speaker_latent", str(tmp_path / "none.npy")],
         ("none.npy", "does not exist")),
        (["--checkpoint", run["params"], "--text", "hi", "--blocks", "8,rest"], ("no latent-prefix path",)),
        (["--checkpoint", run["params"], "--text", "hi", "--blocks", "10,rest"], ("multiple of 4", "'10'")),
        (["--checkpoint", run["params"], "--text", "hi", "--blocks", "rest,8"], ("only the last may be 'rest'",)),
        (["--checkpoint", run["params"], "--text", "hi", "--continue_from", str(tmp_path / "none.wav")],
         ("none.wav", "does not exist")),
    ]
    for args, needles in cases:
        one_sentence_error(capsys, inference.main(base + args), *needles)
        assert not os.path.exists(out)
    for bad_out in (str(tmp_path / "missing_dir" / "o.wav"), str(tmp_path)):
        one_sentence_error(capsys, inference.main(["--checkpoint", run["params"], "--text", "hi",
                                                   "--dacvae_weights", run["codec"], "--output", bad_out]),
                           "o.wav" if bad_out.endswith("o.wav") else "directory")


def test_short_or_silent_reference_warns_and_continues(run, tmp_path, caplog):
    short = tmp_path / "short.wav"
    soundfile.write(str(short), speech_like(0.3, 48000, 1), 48000)
    silent = tmp_path / "silent.flac"
    soundfile.write(str(silent), np.zeros(48000, np.float32), 48000)
    for ref, needle in ((short, "under 0.5 s"), (silent, "digital silence")):
        out = tmp_path / f"{ref.stem}.wav"
        with caplog.at_level("WARNING"):
            assert cli(run, tmp_path, "--text", "Hello.", "--speaker_ref", str(ref), "--output", str(out),
                       "--duration", "1", "--steps", "2") == 0
        assert needle in caplog.text and out.exists()


def test_unreachable_hub_without_local_codec_weights(unreachable_hub_inference):
    path, early = unreachable_hub_inference
    out = early.result()
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "could not download DACVAE weights" in errors[0] and "--dacvae_weights" in errors[0]
    assert not path.exists()
