import glob
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from conftest import REPO

import corpus
import data
from data import DataConfig, DataError, Pipeline
from shards import npy, write_shard

SMALL = dict(max_latent_len=64, max_text_len=64, max_speaker_len=32)


def good_members(key, text, frames=10, ref_frames=12):
    rng = np.random.default_rng(abs(hash(key)) % 2 ** 32)
    return [(key + ".npy", npy(rng.normal(size=(frames, 128)).astype(np.float16))),
            (key + ".ref.npy", npy(rng.normal(size=(ref_frames, 128)).astype(np.float16))),
            (key + ".json", json.dumps({"text": text}).encode())]


def write_corpus(directory, shards, per_shard, prefix="s"):
    """Shards of samples whose text names them: 'utterance {shard}-{i}'."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for s in range(shards):
        path = os.path.join(directory, f"{prefix}-{s:03d}.tar")
        paths.append(write_shard(path, [member for i in range(per_shard) for member in good_members(
            f"k{s:03d}_{i:04d}", f"utterance {s}-{i}", frames=5 + (i % 7))]))
    return paths


def texts_of(batch):
    out = []
    for ids, mask in zip(batch["text_ids"], batch["text_mask"]):
        out.append(bytes(ids[1:mask.sum()].astype(np.uint8)).decode())
    return out


def config(source, **kw):
    return DataConfig(source=source, **{**SMALL, "batch_size": 3, "shuffle_block": 4, "process_index": 0,
                                       "process_count": 1, **kw})


def take(pipeline, n):
    return [next(pipeline) for _ in range(n)]


def first_epoch(pipeline):
    """Texts of every sample of epoch 0 (batch size 1), and the counters as of its last sample."""
    seen, counters = [], {}
    while True:
        batch = next(pipeline)
        if pipeline.state()["sources"][0]["epoch"] > 0:
            return seen, counters
        seen += texts_of(batch)
        counters = pipeline.counters()


# ---------------------------------------------------------------- text

def test_text_normalisation_and_encoding():
    assert data.normalize_text("Hello: world; \u201cquoted\u201d \u2018x\u2019\u2026\nnext\u2014end") == \
        '[S1] Hello, world, "quoted" \'x\'... next, end'
    assert data.normalize_text("[S2] already tagged") == "[S2] already tagged"
    assert data.normalize_text("(laughs) ok") == "(laughs) ok"
    ids, mask = data.encode_text("h\u00e9", 16)
    raw = "[S1] h\u00e9".encode()
    assert ids[0] == 0 and list(ids[1:len(raw) + 1]) == list(raw) and mask.sum() == len(raw) + 1
    assert not ids[len(raw) + 1:].any()
    assert data.encode_text("x" * 20, 20) is None  # never cut


# ---------------------------------------------------------------- batches

def test_batches_have_fixed_shapes_and_padding(tmp_path):
    write_corpus(tmp_path, 2, 7)
    silence = np.full((3, 128), 0.25, np.float16)
    np.save(tmp_path / "silence.npy", silence)
    p = Pipeline(config(str(tmp_path), silence_latent=str(tmp_path / "silence.npy")))
    for batch in take(p, 12):
        assert {k: (v.shape, v.dtype.name) for k, v in batch.items() if isinstance(v, np.ndarray)} == {
            "latent": ((3, 64, 128), "float32"), "latent_mask": ((3, 64), "int32"),
            "text_ids": ((3, 64), "int32"), "text_mask": ((3, 64), "int32"),
            "speaker_latent": ((3, 32, 128), "float32"), "speaker_mask": ((3, 32), "int32")}
        assert set(batch) - {"latent", "latent_mask", "text_ids", "text_mask", "speaker_latent",
                             "speaker_mask"} == {"keys", "sources", "speakers"}
        for row in range(3):
            # The key names the sample exactly as its tar members do: text 'utterance S-I' is k{S}_{I}.
            s, i = texts_of(batch)[row].split()[-1].split("-")
            assert batch["keys"][row] == f"k{int(s):03d}_{int(i):04d}" and type(batch["keys"][row]) is str
            assert batch["sources"][row] == str(tmp_path) and batch["speakers"][row] == ""
            n = batch["latent_mask"][row].sum()
            assert 5 <= n <= 11 and batch["latent_mask"][row, :n].all()
            assert np.all(batch["latent"][row, n:] == 0.25)  # the silence latent, not zeros
            assert batch["speaker_mask"][row].sum() == 12 and not batch["speaker_latent"][row, 12:].any()
            assert texts_of(batch)[row].startswith("[S1] utterance ")
    p.close()


def test_speaker_reference_is_cropped_reproducibly_and_missing_reference_is_masked(tmp_path):
    path = write_shard(tmp_path / "one.tar", good_members("a", "long reference", ref_frames=50)
                       + good_members("b", "no reference")[::2])  # .npy and .json only
    batches = []
    for _ in range(2):
        p = Pipeline(config(str(path), batch_size=2))
        batches.append(next(p))
        counters = p.counters()
        p.close()
    np.testing.assert_array_equal(batches[0]["speaker_latent"], batches[1]["speaker_latent"])
    rows = {t: i for i, t in enumerate(texts_of(batches[0]))}
    a, b = rows["[S1] long reference"], rows["[S1] no reference"]
    assert batches[0]["speaker_mask"][a].sum() == 32 and batches[0]["speaker_mask"][b].sum() == 0
    assert counters["no_reference"] >= 1 and counters["cropped_reference"] >= 1


# ---------------------------------------------------------------- hosts

@pytest.mark.parametrize("hosts", [1, 2, 3])
def test_hosts_partition_an_epoch_without_overlap_or_loss(tmp_path, hosts):
    write_corpus(tmp_path, 6, 5)
    expected = {f"[S1] utterance {s}-{i}" for s in range(6) for i in range(5)}
    seen = []
    for host in range(hosts):
        p = Pipeline(config(str(tmp_path), batch_size=1, process_index=host, process_count=hosts))
        seen += first_epoch(p)[0]
        p.close()
    assert len(seen) == len(set(seen)) == len(expected) and set(seen) == expected


def test_more_hosts_than_shards_is_a_clear_error(tmp_path):
    write_corpus(tmp_path, 2, 3)
    with pytest.raises(DataError, match="cannot feed 3 hosts"):
        Pipeline(config(str(tmp_path), process_index=0, process_count=3))


def test_epochs_reshuffle_the_order(tmp_path):
    write_corpus(tmp_path, 4, 6)
    p = Pipeline(config(str(tmp_path), batch_size=24))
    first, second = texts_of(next(p)), texts_of(next(p))
    p.close()
    assert sorted(first) == sorted(second) and first != second


# ---------------------------------------------------------------- resume

@pytest.mark.parametrize("open_shards", [1, 2, 64])
def test_resume_yields_exactly_the_same_batches(tmp_path, open_shards):
    # 3 shards of 5 samples, blocks of 4, batches of 3: shard, block and epoch boundaries (and,
    # with 2 open shards, a slot moving on to the next shard) all fall inside the 15 batches below.
    write_corpus(tmp_path, 3, 5)
    reference = Pipeline(config(str(tmp_path), open_shards=open_shards))
    expected = take(reference, 15)
    reference.close()
    for stop in (1, 2, 4, 5, 7, 9, 12):
        p = Pipeline(config(str(tmp_path), open_shards=open_shards))
        take(p, stop)
        state = json.loads(json.dumps(p.state()))
        p.close()
        resumed = Pipeline(config(str(tmp_path), open_shards=open_shards), state=state)
        for want in expected[stop:]:
            got = next(resumed)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"stop {stop}, {k}")
        resumed.close()
    assert state["sources"][0]["epoch"] >= 1  # the last resume point lies past an epoch boundary


def test_resume_rejects_a_state_from_another_seed(tmp_path):
    write_corpus(tmp_path, 1, 3)
    with pytest.raises(DataError, match="seed"):
        Pipeline(config(str(tmp_path), seed=1), state={"epoch": 0, "shard": 0, "offset": 0, "block": 0,
                                                       "emitted": 0, "samples_seen": 0, "seed": 0})


# ---------------------------------------------------------------- dirty data

def dirty_corpus(directory):
    os.makedirs(directory, exist_ok=True)
    good = []

    def good_sample(key):
        text = f"good {key}"
        good.append("[S1] " + text)
        return good_members(key, text)

    zeros = npy(np.zeros((4, 128), np.float16))
    nan = np.zeros((4, 128), np.float16)
    nan[1, 2] = np.nan
    inf = np.zeros((4, 128), np.float32)
    inf[0, 0] = np.inf
    members = good_sample("g1") + [
        ("nolatent.json", b'{"text": "x"}'),  # missing_latent
        ("nojson.npy", zeros),  # missing_json
        ("shape.npy", npy(np.zeros((4, 64), np.float16))), ("shape.json", b'{"text": "wrong shape"}'),
        ("dtype.npy", npy(np.zeros((4, 128), np.int16))), ("dtype.json", b'{"text": "wrong dtype"}'),
        ("nan.npy", npy(nan)), ("nan.json", b'{"text": "nan"}'),
        ("inf.npy", npy(inf)), ("inf.json", b'{"text": "inf"}'),
        ("pickle.npy", npy(np.array([{"evil": 1}], dtype=object), allow_pickle=True)),
        ("pickle.json", b'{"text": "pickled"}'),
        ("empty.npy", zeros), ("empty.json", b'{"text": "   "}'),
        ("utf.npy", zeros), ("utf.json", b'{"text": "caf\xe9"}'),
        ("long.npy", zeros), ("long.json", json.dumps({"text": "y" * 100}).encode()),
        ("badjson.npy", zeros), ("badjson.json", b'{"text": '),
        ("notext.npy", zeros), ("notext.json", b'{"caption": "no text field"}'),
        ("toolong.npy", npy(np.zeros((65, 128), np.float16))), ("toolong.json", b'{"text": "latent too long"}'),
        ("garbage.npy", b"\x93NUMPY garbage"), ("garbage.json", b'{"text": "garbage npy"}')]
    members += [(name, npy(np.zeros((3, 7), np.float16)) if name.endswith(".ref.npy") else payload)
                for name, payload in good_members("badref", "bad reference")]
    good.append("[S1] bad reference")
    write_shard(os.path.join(directory, "dirty.tar"), members + good_sample("g2"))
    # A truncated shard: the two samples before the cut survive.
    whole = write_shard(os.path.join(directory, "whole.tmp"),
                        good_sample("t1") + good_sample("t2") + good_members("t3", "cut off", frames=60))
    raw = open(whole, "rb").read()
    os.remove(whole)
    with open(os.path.join(directory, "truncated.tar"), "wb") as f:
        f.write(raw[:len(raw) - 8000])
    with open(os.path.join(directory, "zero.tar"), "wb") as f:
        f.write(b"")
    return good


def test_dirty_samples_are_skipped_and_counted(tmp_path):
    good = dirty_corpus(tmp_path)
    p = Pipeline(config(str(tmp_path), batch_size=1))
    seen, counters = first_epoch(p)
    p.close()
    assert sorted(seen) == sorted(good)
    for reason in ("missing_latent", "missing_json", "wrong_shape", "wrong_dtype", "pickled_array",
                   "empty_text", "non_utf8_text", "text_too_long", "bad_json", "missing_text", "latent_too_long",
                   "bad_npy", "unusable_reference"):
        assert counters.get(reason) == 1, (reason, counters)
    assert counters["non_finite"] == 2
    assert counters["truncated_tar"] == 2  # the cut shard and the empty file


def test_inspect_reports_the_same_counts(tmp_path):
    good = dirty_corpus(tmp_path)
    out = subprocess.run([sys.executable, os.path.join(REPO, "data.py"), "inspect", str(tmp_path), "--json",
                          "--max_latent_len", "64", "--max_text_len", "64", "--max_speaker_len", "32"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["samples_ok"] == len(good)
    assert report["skipped"]["non_finite"] == 2 and report["skipped"]["pickled_array"] == 1
    assert report["truncated_shards"] >= 1 and report["unusable_reference"] == 1
    human = subprocess.run([sys.executable, os.path.join(REPO, "data.py"), "inspect", str(tmp_path),
                            "--max_latent_len", "64", "--max_text_len", "64", "--max_speaker_len", "32"],
                           capture_output=True, text=True, timeout=120)
    assert f"{len(good)} usable samples" in human.stdout and "latent_frames:" in human.stdout


def test_a_corpus_with_no_usable_sample_is_an_error_not_a_hang(tmp_path):
    write_shard(tmp_path / "bad.tar", [("x.json", b'{"text": "no latent"}')])
    p = Pipeline(config(str(tmp_path)))
    with pytest.raises(DataError, match="no usable sample"):
        next(p)
    p.close()


# ---------------------------------------------------------------- the Hub

def publish(hub, repo_id, directory):
    for name in sorted(os.listdir(directory)):
        if name.endswith(".tar"):
            hub.add_file(repo_id, f"data/{name}", os.path.join(directory, name), repo_type="dataset")
    hub.add_file(repo_id, "README.md", b"# corpus", repo_type="dataset")


def test_hub_streaming_matches_local_and_keeps_disk_bounded(hub, tmp_path):
    local = tmp_path / "local"
    write_corpus(local, 12, 4)
    publish(hub, "me/corpus", local)
    scratch = tmp_path / "scratch"
    remote = Pipeline(config("hf://datasets/me/corpus", batch_size=4, open_shards=2, scratch_dir=str(scratch)))
    here = Pipeline(config(str(local), batch_size=4, open_shards=2))
    most_tars = 0
    for _ in range(15):  # more than an epoch of 48 samples
        a, b = next(remote), next(here)
        # Same shard names in the same order (the listing is sorted), so the same stream.
        assert texts_of(a) == texts_of(b)
        tars = [f for _, _, files in os.walk(scratch) for f in files if f.endswith(".tar")]
        most_tars = max(most_tars, len(tars))
    remote.close()
    here.close()
    assert 1 <= most_tars <= 3  # the two open shards and the next one
    assert any(path.startswith("/datasets/me/corpus/resolve/") for _, path in hub.requests)


def test_only_a_hub_source_makes_a_scratch_directory_and_close_removes_it(hub, tmp_path, monkeypatch):
    """Shards are downloaded into a directory under TMPDIR that the pipeline made: none for local
    shards, and the pipeline's own one is gone once it is closed (each run and evaluation used to leave one)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    write_corpus(tmp_path / "local", 2, 4)
    publish(hub, "me/scratch", tmp_path / "local")
    here = Pipeline(config(str(tmp_path / "local")))
    next(here)
    here.close()
    assert os.listdir(temp) == []
    remote = Pipeline(config("hf://datasets/me/scratch"))
    next(remote)
    assert [name for name in os.listdir(temp) if name.startswith("echo-shards-0-")]
    remote.close()
    assert os.listdir(temp) == []


def test_hub_source_revision_and_glob(hub, tmp_path):
    write_corpus(tmp_path / "a", 2, 2, prefix="train")
    write_corpus(tmp_path / "b", 2, 2, prefix="valid")
    publish(hub, "me/split", tmp_path / "a")
    publish(hub, "me/split", tmp_path / "b")
    assert data.list_shards("hf://datasets/me/split@main/data/train-*") == ["data/train-000.tar",
                                                                            "data/train-001.tar"]
    assert len(data.list_shards("hf://datasets/me/split")) == 4
    with pytest.raises(DataError, match="cannot list the Hub dataset"):
        data.list_shards("hf://datasets/me/absent")
    with pytest.raises(DataError, match="hf://datasets/ORG/REPO"):
        data.list_shards("hf://models/x")


def test_hub_downloads_retry_transient_errors_and_skip_dead_shards(hub, tmp_path):
    write_corpus(tmp_path, 3, 2)
    publish(hub, "me/flaky", tmp_path)
    rev = hub.heads[("dataset", "me/flaky")]  # downloads read the commit the stream pinned, not "main"
    hub.fail_next(f"me/flaky/resolve/{rev}/data/s-000.tar", 2)  # 503s: huggingface_hub's own backoff recovers
    hub.fail_next(f"me/flaky/resolve/{rev}/data/s-002.tar", 3, status=403)  # fails 3 downloads, then works
    hub.fail_next(f"me/flaky/resolve/{rev}/data/s-001.tar", 10 ** 6, status=403)  # never comes back
    p = Pipeline(config("hf://datasets/me/flaky", batch_size=1, retries=3, scratch_dir=str(tmp_path / "x")))
    p.streams[0].fetcher.backoff = 0.01
    seen, counters = first_epoch(p)
    p.close()
    assert sorted(seen) == ["[S1] utterance 0-0", "[S1] utterance 0-1", "[S1] utterance 2-0", "[S1] utterance 2-1"]
    assert counters["shard_download_failed"] == 1


# ---------------------------------------------------------------- sources and tools

def test_local_sources_directory_glob_and_list_file(tmp_path):
    paths = write_corpus(tmp_path / "c", 3, 1)
    assert data.list_shards(str(tmp_path / "c")) == paths
    assert data.list_shards(str(tmp_path / "c" / "s-00[01].tar")) == paths[:2]
    listing = tmp_path / "shards.txt"
    listing.write_text("c/s-002.tar\n# comment\nc/s-000.tar\n")
    assert data.list_shards(str(listing)) == [paths[2], paths[0]]
    listing.write_text("c/missing.tar\n")
    with pytest.raises(DataError, match="missing file"):
        data.list_shards(str(listing))
    with pytest.raises(DataError, match="no .tar shards"):
        data.list_shards(str(tmp_path / "nothing-*"))


def read_corpus(directory):
    """{key: (meta, latent)} of every sample in a directory's shards."""
    samples = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.tar"))):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name, payload in members.items():
            if name.endswith(".json"):
                samples[name[:-5]] = (json.loads(payload), np.load(io.BytesIO(members[name[:-5] + ".npy"])))
    return samples


def test_make_synthetic_is_learnable_and_deterministic(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(REPO, "data.py"), "make-synthetic", str(tmp_path / "a"),
                          "--shards", "2", "--samples-per-shard", "200", "--seed", "5"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    corpus.make_synthetic(str(tmp_path / "b"), 2, 200, seed=5)
    assert open(tmp_path / "a" / "shard-00001.tar", "rb").read() == open(tmp_path / "b" / "shard-00001.tar", "rb").read()
    silence = np.load(tmp_path / "a" / "silence_latent.npy")
    assert silence.shape == (750, 128) and silence.dtype == np.float16
    for which, lengths, symbols, median in (("starter", (2, 6), 8, 4), ("short", (4, 8), 8, 6),
                                            ("medium", (4, 12), 16, 8), ("words", (10, 40), 30, 20),
                                            ("durations", (4, 12), 16, 8)):
        directory = str(tmp_path / which)
        corpus.make_synthetic(directory, 2, 200, seed=5, corpus=which)
        samples = read_corpus(directory)
        texts = [meta["text"] for meta, _ in samples.values()]
        for meta, latent in samples.values():
            np.testing.assert_array_equal(latent, corpus.synthetic_latent(meta["text"], meta["speaker"], 5, which))
            assert len(latent) == corpus.synthetic_durations(meta["text"], meta["speaker"], 5, which).sum()
        size = sorted(len(t.encode()) for t in texts)
        assert lengths[0] <= size[0] and size[-1] <= lengths[1] and size[len(size) // 2] >= median
        assert len(set("".join(texts))) >= symbols
        assert {meta["speaker"] for meta, _ in samples.values()} == set(range(corpus.SYNTHETIC_SPEAKERS))
        # Every held-out text is a string the training split never contains.
        held = str(tmp_path / f"{which}-held-out")
        corpus.make_synthetic(held, 1, 200, seed=5, corpus=which, held_out=True)
        held_texts = [meta["text"] for meta, _ in read_corpus(held).values()]
        assert all(corpus.synthetic_held_out(t) for t in held_texts) and not any(map(corpus.synthetic_held_out, texts))
        assert not set(held_texts) & set(texts)
        latent_len, text_len, speaker_len = corpus.synthetic_lengths(which)
        assert all(len(lat) <= latent_len for _, lat in samples.values()) and speaker_len % 4 == 0
        assert all(data.encode_text(t, text_len) is not None for t in texts)
    assert all(len(corpus.synthetic_durations(meta["text"], 0, 5, "medium")) == len(meta["text"])
               for meta, _ in read_corpus(str(tmp_path / "medium")).values())
    # Every byte, its place in the order, and the speaker change the latent.
    a = corpus.synthetic_latent("abcdefghij", 0, 5)
    assert not np.array_equal(a, corpus.synthetic_latent("abcdefghiz", 0, 5))
    assert not np.array_equal(a, corpus.synthetic_latent("bacdefghij", 0, 5))
    assert not np.array_equal(a, corpus.synthetic_latent("abcdefghij", 1, 5))
    # The letters' mean frame says little about a text: byte vectors are centred in blocks of 8 values.
    for seed in range(3):
        byte_vectors = corpus.synthetic_tables(seed)[0]
        np.testing.assert_allclose(byte_vectors.reshape(32, 8, -1).mean(axis=1), 0, atol=1e-5)
        letters = byte_vectors[np.frombuffer(corpus.SYNTHETIC_CORPORA["medium"].alphabet.encode(), np.uint8)]
        assert np.linalg.norm(letters.mean(axis=0)) < 0.2 * np.linalg.norm(letters, axis=1).mean()


def test_the_durations_corpus_gives_each_letter_and_speaker_its_own_length(tmp_path):
    """Read back from the shards as a recogniser would (runs of equal frames): a letter lasts the
    same for a speaker wherever it stands, letters differ in length, the slowest speaker takes at
    least 1.5x the fastest's frames, and no letter follows itself (its runs would merge)."""
    directory = corpus.make_synthetic(str(tmp_path / "d"), 2, 300, seed=3, corpus="durations")
    lengths, frames_per_letter = {}, {}
    for meta, latent in read_corpus(directory).values():
        text, speaker = meta["text"], meta["speaker"]
        assert all(a != b for a, b in zip(text, text[1:])), text
        changes = np.flatnonzero(np.any(np.diff(latent.astype(np.float32), axis=0) != 0, axis=1)) + 1
        runs = np.diff(np.concatenate([[0], changes, [len(latent)]]))
        assert len(runs) == len(text)
        for letter, run in zip(text, runs):
            assert lengths.setdefault((speaker, letter), run) == run, (speaker, letter)
        frames_per_letter.setdefault(speaker, []).append(len(latent) / len(text))
        assert len(latent) <= corpus.synthetic_lengths("durations")[0]
    assert len(set(lengths.values())) >= 4  # 1-4 frames, and more for slower speakers
    for speaker in range(corpus.SYNTHETIC_SPEAKERS):
        assert len({lengths[k] for k in lengths if k[0] == speaker}) >= 3, speaker
    rates = sorted(np.mean(v) for v in frames_per_letter.values())
    assert len(rates) == corpus.SYNTHETIC_SPEAKERS and rates[-1] / rates[0] >= 1.4, rates
    table = corpus.letter_frames(3)
    letters = np.frombuffer(b"abcdefghijklmnop", np.uint8)
    assert table[:, letters].sum(axis=1).max() / table[:, letters].sum(axis=1).min() >= 1.5


@pytest.mark.parametrize("which", ["starter", "short", "medium", "words", "durations"])
def test_the_recogniser_reads_every_corpus_exactly(tmp_path, which):
    """Every target of the corpus, padded with silence to its canvas as the trainer pads it, reads
    back as its text, ending where its speech ends; each sample's reference speaker's latent too."""
    directory = corpus.make_synthetic(str(tmp_path / which), 1, 100, seed=2, corpus=which)
    canvas = corpus.synthetic_lengths(which)[0]
    silence = data.load_silence(os.path.join(directory, "silence_latent.npy"), canvas)
    for meta, latent in read_corpus(directory).values():
        padded = np.concatenate([latent.astype(np.float32), silence[len(latent):]])
        assert corpus.recognise(padded, 2, which) == (meta["text"], len(latent)), meta
        assert corpus.character_error_rate(meta["text"], meta["text"]) == 0


def test_the_recogniser_scores_mistakes_as_they_are():
    seed, which, speaker, text = 4, "durations", 3, "abcadefg"
    say = lambda t, tail="": np.concatenate([corpus.synthetic_latent(t, speaker, seed, which).astype(np.float32),
                                             *([corpus.synthetic_latent(tail, speaker, seed, which)] if tail else []),
                                             np.tile(corpus.synthetic_tables(seed)[2], (20, 1))])
    end = len(corpus.synthetic_latent(text, speaker, seed, which))
    cases = {"abcdefg": 1 / 8,  # a dropped letter
             "abcadeefg": 1 / 8,  # a letter doubled as a second letter (runs of e's merge: read by length)
             "bacadefg": 2 / 8}  # two letters swapped
    for said, cer in cases.items():
        got, _ = corpus.recognise(say(said), seed, which)
        assert corpus.character_error_rate(got, text) == pytest.approx(cer), (said, got)
    got, got_end = corpus.recognise(say(text, tail="hij"), seed, which)  # letters where silence belongs
    assert got == text + "hij" and got_end - end == len(corpus.synthetic_latent("hij", speaker, seed, which))
    assert corpus.character_error_rate(got, text) == pytest.approx(3 / 8)
    assert corpus.recognise(np.tile(corpus.synthetic_tables(seed)[2], (30, 1)), seed, which) == ("", 0)
    # Noise of the size a trained model leaves changes nothing.
    noisy = say(text) + np.random.default_rng(0).normal(0, 0.2, say(text).shape)
    assert corpus.recognise(noisy, seed, which) == (text, end)


# ---------------------------------------------------------------- shuffling, mixing, pinning

def speaker_corpus(directory, speakers, per_shard, prefix="spk"):
    """One shard per speaker, as a corpus cut from a manifest sorted by speaker comes out."""
    os.makedirs(directory, exist_ok=True)
    for s in range(speakers):
        members = []
        for i in range(per_shard):
            meta = json.dumps({"text": f"{prefix} {s} says {i}", "speaker": f"{prefix}{s}"}).encode()
            members += [(name, meta if name.endswith(".json") else payload)
                        for name, payload in good_members(f"{prefix}{s:03d}-{i:05d}", f"{prefix} {s} says {i}", frames=8)]
        write_shard(os.path.join(directory, f"shard-{s:05d}.tar"), members)


@pytest.mark.parametrize("speakers", [16, 64])
def test_batches_span_many_shards(tmp_path, speakers):
    # Shards larger than the shuffle block, as real ones are (1,000 clips against 512).
    speaker_corpus(tmp_path, speakers, 70)
    uniform = speakers * (1 - (1 - 1 / speakers) ** 32)
    distinct = {}
    for open_shards in (1, 64):
        p = Pipeline(config(str(tmp_path), batch_size=32, shuffle_block=64, open_shards=open_shards))
        distinct[open_shards] = np.mean([len(set(next(p)["speakers"])) for _ in range(20)])
        p.close()
    assert distinct[64] >= 0.7 * uniform, distinct
    assert distinct[1] <= 3  # one shard at a time: the trap this default avoids


def test_parse_sources_weights_and_errors(tmp_path):
    (tmp_path / "a,b").mkdir()
    assert data.parse_sources("x:3,hf://datasets/o/r:1") == [("x", 0.75), ("hf://datasets/o/r", 0.25)]
    assert data.parse_sources("hf://datasets/o/r@v1/data/*.tar,y") == [("hf://datasets/o/r@v1/data/*.tar", 0.5),
                                                                      ("y", 0.5)]
    assert data.parse_sources(str(tmp_path / "a,b")) == [(str(tmp_path / "a,b"), 1.0)]
    for spec, needle in (("x:0,y", "positive"), ("x:-1", "positive"), ("x,,y", "empty entry"), ("x,x:2", "twice"),
                         ("", "empty")):
        with pytest.raises(DataError, match=needle):
            data.parse_sources(spec)


def test_sources_mix_by_weight_and_resume_exactly(tmp_path):
    write_corpus(tmp_path / "a", 3, 40, prefix="a")
    write_corpus(tmp_path / "b", 2, 7, prefix="b")  # small: loops over its epochs on its own
    spec = f"{tmp_path / 'a'}:0.25,{tmp_path / 'b'}:0.75"
    p = Pipeline(config(spec, batch_size=8))
    batches = take(p, 50)
    sources = [s for b in batches for s in b["sources"]]
    assert sources.count(str(tmp_path / "a")) == 100 and sources.count(str(tmp_path / "b")) == 300
    assert all(k.startswith("k") for b in batches for k in b["keys"])
    assert p.state()["sources"][1]["epoch"] >= 20 and p.state()["sources"][0]["epoch"] == 0
    state = json.loads(json.dumps(p.state()))
    expected = take(p, 6)
    p.close()
    resumed = Pipeline(config(spec, batch_size=8), state=state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    resumed.close()
    with pytest.raises(DataError, match="has 2 source.*names 1"):
        Pipeline(config(str(tmp_path / "a"), batch_size=8), state=state)


def test_skip_counters_are_kept_per_source(tmp_path):
    dirty_corpus(tmp_path / "dirty")
    write_corpus(tmp_path / "clean", 2, 10)
    spec = f"{tmp_path / 'dirty'},{tmp_path / 'clean'}"
    p = Pipeline(config(spec, batch_size=4))
    take(p, 30)
    per_source = p.source_counters()
    p.close()
    assert per_source[str(tmp_path / "dirty")]["non_finite"] >= 2
    assert not {k: v for k, v in per_source[str(tmp_path / "clean")].items() if k != "cropped_reference"}
    assert p.counters()["non_finite"] == per_source[str(tmp_path / "dirty")]["non_finite"]


def test_a_changed_local_shard_list_stops_a_resume(tmp_path):
    paths = write_corpus(tmp_path, 3, 4)
    p = Pipeline(config(str(tmp_path)))
    take(p, 2)
    state = json.loads(json.dumps(p.state()))
    p.close()
    assert state["pins"][0]["shards"] == [["s-000.tar", os.path.getsize(paths[0])],
                                          ["s-001.tar", os.path.getsize(paths[1])],
                                          ["s-002.tar", os.path.getsize(paths[2])]]
    write_corpus(tmp_path / "more", 1, 2, prefix="t")  # one shard added (in a subdirectory)
    with open(paths[1], "ab") as f:
        f.write(b"\0" * 10240)  # one grown
    with pytest.raises(DataError, match=r"changed since this run started: 1 added \(more/t-000.tar\); 1 changed "
                                        r"size \(s-001.tar\).*--accept_data_change"):
        Pipeline(config(str(tmp_path)), state=state)
    p = Pipeline(config(str(tmp_path), accept_data_change=True), state=state)
    assert len(texts_of(next(p))) == 3 and len(p.state()["pins"][0]["shards"]) == 4
    p.close()


def test_hub_sources_are_pinned_to_a_commit(hub, tmp_path):
    write_corpus(tmp_path / "v1", 2, 3)
    publish(hub, "me/growing", tmp_path / "v1")
    first = hub.heads[("dataset", "me/growing")]
    p = Pipeline(config("hf://datasets/me/growing", scratch_dir=str(tmp_path / "x")))
    take(p, 1)
    state = json.loads(json.dumps(p.state()))
    expected = take(p, 4)
    p.close()
    assert state["pins"][0]["revision"] == first
    # Shards pushed between two runs: the resume still reads the pinned commit, batch for batch.
    write_corpus(tmp_path / "v2", 4, 3, prefix="new")
    publish(hub, "me/growing", tmp_path / "v2")
    assert hub.heads[("dataset", "me/growing")] != first
    resumed = Pipeline(config("hf://datasets/me/growing", scratch_dir=str(tmp_path / "y")), state=state)
    for want in expected:
        assert texts_of(next(resumed)) == texts_of(want)
    resumed.close()
    # A fresh run pins today's commit.
    fresh = Pipeline(config("hf://datasets/me/growing", scratch_dir=str(tmp_path / "z")))
    assert fresh.state()["pins"][0]["revision"] == hub.heads[("dataset", "me/growing")]
    assert len(fresh.state()["pins"][0]["shards"]) == 6
    fresh.close()
    # A pinned commit the Hub no longer serves stops the resume, unless accepted.
    state["pins"][0]["revision"] = "f" * 40
    with pytest.raises(DataError, match="pinned to commit f{40}.*--accept_data_change"):
        Pipeline(config("hf://datasets/me/growing"), state=state)


def test_inspect_batches_shows_diversity(tmp_path):
    speaker_corpus(tmp_path / "a", 12, 10)
    speaker_corpus(tmp_path / "b", 4, 10, prefix="other")
    out = subprocess.run([sys.executable, os.path.join(REPO, "data.py"), "inspect",
                          f"{tmp_path / 'a'}:0.75,{tmp_path / 'b'}:0.25", "--batches", "3", "--batch_size", "16",
                          "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["batch"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["samples"] == r["named_speakers"] == 16 and r["distinct_speakers"] >= 6
        assert r["sources"] == {str(tmp_path / "a"): 12, str(tmp_path / "b"): 4}
    human = subprocess.run([sys.executable, os.path.join(REPO, "data.py"), "inspect", str(tmp_path / "a"),
                            "--batches", "2"], capture_output=True, text=True, timeout=120)
    assert "batch 1: 32 samples" in human.stdout and "distinct speakers (of 32 named)" in human.stdout
