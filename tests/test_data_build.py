"""corpus.py build: real recordings (espeak-ng) in several formats -> shards -> inspect -> pipeline -> Hub."""
import csv
import io
import json
import os
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import soundfile
import soxr
import torch

import corpus
import dacvae
import data

SENTENCES = ["The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
             "It is easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
             "Rice is often served in round bowls.", "The juice of lemons makes fine punch."]


def speak(text, voice, path):
    """espeak-ng's speech as 22.05 kHz mono float32."""
    if shutil.which("espeak-ng") is None:
        if os.environ.get("CI"):
            pytest.fail("espeak-ng is not installed; .ci/run installs it")
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
    audio, rate = soundfile.read(str(path), dtype="float32")
    return audio, rate


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """A manifest of real recordings in wav/flac/mp3/ogg at several rates, mono and stereo, plus bad rows."""
    root = tmp_path_factory.mktemp("corpus")
    weights = root / "codec.pth"
    assert dacvae.main(["init-random", str(weights), "--size", "tiny", "--seed", "2"]) in (0, None)
    clips = root / "clips"
    clips.mkdir()
    rows = []
    layout = [("alice", "en", "wav", 22050, 1), ("alice", "en", "flac", 44100, 2), ("alice", "en", "mp3", 48000, 1),
              ("bob", "en+m3", "ogg", 16000, 1), ("bob", "en+m3", "mp3", 22050, 2),
              ("carol", "en-us", "flac", 48000, 1)]
    for i, (speaker, voice, fmt, rate, channels) in enumerate(layout):
        audio, native = speak(SENTENCES[i], voice, root / f"raw{i}.wav")
        audio = soxr.resample(audio, native, rate).astype(np.float32) if rate != native else audio
        audio = np.stack([audio, 0.8 * audio], axis=1) if channels == 2 else audio
        name = f"clip{i}.{fmt}"
        soundfile.write(str(clips / name), audio, rate)
        rows.append({"path": f"clips/{name}", "transcript": SENTENCES[i], "speaker_id": speaker, "lang": "en"})
    (clips / "notes.wav").write_text("not audio")
    soundfile.write(str(clips / "silence.wav"), np.zeros(48000, np.float32), 48000)
    long_audio, native = speak(" ".join(SENTENCES[:3]), "en", root / "long.wav")
    soundfile.write(str(clips / "long.wav"), long_audio, native)
    rows += [{"path": "clips/notes.wav", "transcript": "bad file", "speaker_id": "alice", "lang": "en"},
             {"path": "clips/missing.wav", "transcript": "no file", "speaker_id": "bob", "lang": "en"},
             {"path": "clips/silence.wav", "transcript": "quiet", "speaker_id": "bob", "lang": "en"},
             {"path": "clips/long.wav", "transcript": "too long", "speaker_id": "carol", "lang": "en"},
             {"path": "clips/clip0.wav", "transcript": "   ", "speaker_id": "alice", "lang": "en"}]
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "transcript", "speaker_id", "lang"])
        writer.writeheader()
        writer.writerows(rows)
    return {"root": root, "manifest": str(manifest), "weights": str(weights), "rows": rows,
            "long_seconds": len(long_audio) / native}


def build(recordings, out, *extra):
    return corpus.main(["build", recordings["manifest"], str(out), "--dacvae_weights", recordings["weights"],
                      "--shard_size", "3", "--batch_size", "2", "--max_seconds", "5", *extra])


def read_tar(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def npy(raw):
    return np.load(io.BytesIO(raw), allow_pickle=False)


def test_build_inspect_and_stream(recordings, tmp_path, capsys):
    assert recordings["long_seconds"] > 5
    out = tmp_path / "shards"
    assert build(recordings, out) == 0
    printed = capsys.readouterr().out
    assert "5 clips" in printed and "skipped 5 of 11" in printed and "held out for validation: 1 clips" in printed
    report = json.loads((out / "manifest.json").read_text())
    # 6 usable clips: the default split holds out one (at least --val_min 8, at most a quarter).
    assert report["samples"] == 5 and report["val_samples"] == 1 and report["clips"] == 11 and report["speakers"] == 3
    assert report["skipped"] == {"empty_text": 1, "silent": 1, "too_long": 1, "unreadable_audio": 2}
    assert [s["name"] for s in report["shards"]] == ["shard-00000.tar", "shard-00001.tar"]
    assert [s["name"] for s in report["val_shards"]] == ["val-00000.tar"]
    assert sorted(os.listdir(out)) == [".build.json", "manifest.json", "shard-00000.tar", "shard-00001.tar",
                                       "silence_latent.npy", "val-00000.tar"]
    members, train_keys = {}, set()
    for shard in report["shards"] + report["val_shards"]:
        members.update(read_tar(out / shard["name"]))
        if shard["name"].startswith("shard-"):
            train_keys |= {name.split(".")[0] for name in read_tar(out / shard["name"])}
    # carol has one usable clip; a training clip whose only same-speaker partner is held out has none.
    assert report["no_reference"] == sum(k + ".ref.npy" not in members for k in {n.split(".")[0] for n in members})
    keys = sorted({name.split(".")[0] for name in members})
    assert len(keys) == 6
    codec = dacvae.DACVAE.load(recordings["weights"])
    latents = {k: npy(members[k + ".npy"]) for k in keys}
    for k in keys:
        meta = json.loads(members[k + ".json"])
        row = recordings["rows"][int(k)]
        assert meta["text"] == row["transcript"] and meta["speaker"] == row["speaker_id"] and meta["lang"] == "en"
        assert meta["source"].endswith(row["path"]) and meta["duration"] > 1
        latent = latents[k]
        assert latent.dtype == np.float16 and latent.shape == (int(np.ceil(meta["duration"] * 25 - 1e-6)), 128)
        # Batching clips of equal length gives each clip its own latent.
        alone = codec.encode(torch.from_numpy(dacvae.load_audio(meta["source"]))[None, None])[0].T.numpy()
        np.testing.assert_allclose(latent.astype(np.float32), alone, atol=2e-2, rtol=1e-2)
        ref_name = k + ".ref.npy"
        if meta["speaker"] == "carol":
            assert ref_name not in members
            continue
        if ref_name not in members:
            continue
        ref = npy(members[ref_name])
        same = [j for j in keys if j != k and json.loads(members[j + ".json"])["speaker"] == meta["speaker"]]
        if k in train_keys:  # validation audio never reaches training, not even as a reference
            same = [j for j in same if j in train_keys]
        assert any(np.array_equal(ref, latents[j]) for j in same), k  # another clip of the same speaker
        assert not np.array_equal(ref, latent)

    assert data.main(["inspect", str(out), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert inspected["samples_ok"] == 6 and sum(inspected["skipped"].values()) == 0
    assert inspected["splits"] == {"train": {"shards": 2, "samples_ok": 5}, "val": {"shards": 1, "samples_ok": 1}}
    pipeline = data.Pipeline(data.DataConfig(source=str(out), batch_size=4, max_latent_len=200,
                                             silence_latent=str(out / "silence_latent.npy")))
    batches = [next(pipeline) for _ in range(5)]
    pipeline.close()
    assert batches[0]["latent"].shape == (4, 200, 128) and batches[0]["latent_mask"].sum(1).min() > 25
    assert batches[0]["text_mask"].sum() > 0
    assert {k for b in batches for k in b["keys"]} == train_keys  # the training stream never reads val-*.tar
    val = data.Pipeline(data.DataConfig(source=str(out), batch_size=1, max_latent_len=200, split="val"))
    assert set(next(val)["keys"]) == set(keys) - train_keys
    val.close()


def test_build_resumes_after_a_crash_and_skips_complete_shards(recordings, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    assert build(recordings, clean) == 0
    out = tmp_path / "crashed"
    calls = {"n": 0}
    real = corpus.add_member

    def crash_in_the_second_shard(tar, name, payload):
        calls["n"] += 1
        if calls["n"] > 10:  # shard 0 holds 3 samples: 9 members
            raise KeyboardInterrupt("power cut")
        real(tar, name, payload)

    monkeypatch.setattr(corpus, "add_member", crash_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build(recordings, out)
    monkeypatch.setattr(corpus, "add_member", real)
    assert sorted(p for p in os.listdir(out) if not p.startswith(".")) == ["shard-00000.tar"]  # no partial shard
    first = os.stat(out / "shard-00000.tar")
    assert build(recordings, out) == 0
    assert os.stat(out / "shard-00000.tar").st_ino == first.st_ino  # skipped, not rewritten
    for name in ("shard-00000.tar", "shard-00001.tar", "val-00000.tar", "manifest.json", "silence_latent.npy"):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    # Another manifest into the same directory is refused.
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"audio": "x.wav", "text": "t", "speaker": "s"}) + "\n")
    assert corpus.main(["build", str(other), str(out), "--dacvae_weights", recordings["weights"]]) == 2


def test_push_to_hub_resumes_and_streams_back(recordings, tmp_path, hub, capsys):
    out = tmp_path / "shards"
    hub.fail_next("/commit/main", 1, 500)  # the first commit fails: the push stops with one sentence
    assert build(recordings, out, "--push_to_hub", "me/speech") == 2
    assert "could not push" in capsys.readouterr().err
    before = len(hub.commits)
    assert build(recordings, out, "--push_to_hub", "me/speech", "--json") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["pushed_files"] == 4 and report["hub"] == "hf://datasets/me/speech"
    files = hub.repos[("dataset", "me/speech")]
    assert sorted(files) == ["manifest.json", "shard-00000.tar", "shard-00001.tar", "silence_latent.npy",
                             "val-00000.tar"]
    assert files["shard-00001.tar"] == (out / "shard-00001.tar").read_bytes()
    # Pushing again uploads nothing but the manifest.
    assert build(recordings, out, "--push_to_hub", "me/speech") == 0
    assert [added for _, added in hub.commits[before:]] == [
        ["shard-00000.tar", "shard-00001.tar", "val-00000.tar", "silence_latent.npy"], ["manifest.json"],
        ["manifest.json"]]
    pipeline = data.Pipeline(data.DataConfig(source="hf://datasets/me/speech", batch_size=2, max_latent_len=200))
    assert next(pipeline)["latent_mask"].sum() > 0
    pipeline.close()


def test_bad_manifests_are_one_sentence(recordings, tmp_path, capsys):
    no_speaker = tmp_path / "m.csv"
    no_speaker.write_text("path,transcript\nclips/clip0.wav,hello\n")
    cases = [(str(tmp_path / "absent.csv"), "does not exist"), (str(no_speaker), "no speaker column")]
    for manifest, needle in cases:
        assert corpus.main(["build", manifest, str(tmp_path / "o"), "--dacvae_weights", recordings["weights"]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_build_holds_out_whole_speakers(recordings, tmp_path, capsys):
    out = tmp_path / "unseen"
    assert build(recordings, out, "--val_speakers", "1", "--json") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    speakers = lambda names: {json.loads(v)["speaker"] for n in names for k, v in read_tar(out / n).items()
                              if k.endswith(".json")}
    train = speakers(s["name"] for s in report["shards"])
    val = speakers(s["name"] for s in report["val_shards"])
    assert len(val) == 1 and not train & val and len(train) == 2
    assert report["val_speakers"] == report["unseen_val_speakers"] == 1
    assert report["samples"] + report["val_samples"] == 6
    assert build(recordings, tmp_path / "none", "--val_speakers", "3") == 2
    assert "leaves no speaker for training" in capsys.readouterr().err


def test_split_shuffles_a_sorted_manifest_and_holds_out_a_fraction():
    rows = [{"speaker": f"spk{i // 100}"} for i in range(1000)]  # sorted by speaker, as LibriTTS comes
    train, val = corpus.split_clips(rows, list(range(1000)), seed=0, val_fraction=0.02, val_min=8)
    assert len(val) == 20 and sorted(train + val) == list(range(1000))
    assert len({rows[i]["speaker"] for i in train[:32]}) >= 8  # a shard's first rows span most speakers
    assert corpus.split_clips(rows, list(range(1000)), seed=0, val_fraction=0.001, val_min=8)[1].__len__() == 8
    assert corpus.split_clips(rows, list(range(20)), seed=0, val_fraction=0.01, val_min=8)[1].__len__() == 5
    assert corpus.split_clips(rows, list(range(1000)), seed=1, val_fraction=0.02)[1] != val
    assert corpus.split_clips(rows, list(range(1000)), seed=0, val_fraction=0)[1] == []
