"""Corpora made here: the learnable synthetic corpora of the demo, and recordings with transcripts
encoded by DACVAE into training shards, optionally pushed to a Hugging Face Hub dataset.

    python corpus.py make-synthetic runs/synth --shards 8 --samples-per-shard 256 --seed 0
    python corpus.py build manifest.csv shards/ --push_to_hub me/corpus   # recordings + transcripts -> shards

Both write the shard format data.py reads (`../shared/spec/formats.md`); `python data.py
make-synthetic|build` hands over to this script.
"""

import argparse
import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sys
import tarfile
import time
from collections import Counter

import numpy as np
from huggingface_hub import CommitOperationAdd, HfApi
from tqdm import tqdm

import data
import storage
from data import DataError

log = logging.getLogger("corpus")


# ----------------------------------------------------------------------------
# Synthetic corpora: learnable toy speech in the real shard format (the demo's data)

SYNTHETIC_SPEAKERS = 8
_SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "zu", "ba", "do", "fi", "gu", "ja", "xo",
              "we", "yi", "hu", "qe", "ch", "st", "pl", "br"]
_PUNCTUATION = [",", ".", "!", "?", "'", "-"]


@dataclasses.dataclass(frozen=True)
class SyntheticCorpus:
    """A learnable toy corpus: each byte of a text becomes `frames_per_byte` frames of that byte's
    (random, 128-dim) vector plus the speaker's offset. Order matters: swapping two bytes swaps
    their frames, so only a model that aligns frames to text positions can generate it."""
    alphabet: str  # the bytes random strings are drawn from ("" for pseudo-words)
    min_bytes: int
    max_bytes: int
    frames_per_byte: int
    canvas: int  # latent frames per training sample (the rest of a short text's canvas is silence)
    shards: int = 4  # training shards of 512 texts per host
    # A curriculum: the first `primer_fraction` of a run's steps train on the `primer` corpus, whose
    # shorter texts align first; the rest train on this one (train_pretrain.py, "data stages").
    primer: str = ""
    primer_fraction: float = 0.0
    # Durations as in speech: each letter lasts its own number of frames (1-4, drawn once per corpus
    # seed), scaled by the speaker's rate (the slowest speaker 1.6x the fastest), and adjacent letters
    # differ. `frames_per_byte` is then unused (synthetic_durations).
    letter_durations: bool = False


SYNTHETIC_CORPORA = {
    # Random 2-6-byte strings over 8 letters, a frame per byte on a 16-frame canvas: `medium`'s primer,
    # where alignment forms first.
    "starter": SyntheticCorpus(alphabet="abcdefgh", min_bytes=2, max_bytes=6, frames_per_byte=1, canvas=16,
                               shards=1),
    # Random 4-8-byte strings over 8 letters, 2 frames per byte: easier than the demo; aligns alone.
    "short": SyntheticCorpus(alphabet="abcdefgh", min_bytes=4, max_bytes=8, frames_per_byte=2, canvas=32),
    # The embedded demo (the default): 4-12 bytes over 16 letters (median 8), a frame per byte on a
    # 12-frame canvas. Alone it did not align within 3500 steps; after `starter` for the first 70% of
    # the steps it does (README, "The demo"). 16 shards keep the median of every text the run writes,
    # its primer's included, at 8.
    "medium": SyntheticCorpus(alphabet="abcdefghijklmnop", min_bytes=4, max_bytes=12, frames_per_byte=1, canvas=12,
                              shards=16, primer="starter", primer_fraction=0.7),
    # Pseudo-sentences of 10-40 bytes over ~40 characters: far harder (`python bench.py learn`).
    "words": SyntheticCorpus(alphabet="", min_bytes=10, max_bytes=40, frames_per_byte=2, canvas=80),
    # 4-12 letters over 16 (median 8), each lasting 1-6 frames by letter and speaker: the alignment's
    # slope varies, as in speech. The canvas holds the longest text at the slowest rate.
    "durations": SyntheticCorpus(alphabet="abcdefghijklmnop", min_bytes=4, max_bytes=12, frames_per_byte=0,
                                 canvas=12 * 6, letter_durations=True),
}
SPEAKER_RATES = (1.0, 1.6)  # the fastest and the slowest speaker's letter-length factors (`durations`)
SYNTHETIC_HELD_OUT = 10  # one text in 10 (by hash) is held out: never in training shards, only in evals


def synthetic_held_out(text):
    """Whether a text belongs to the held-out split (a fixed function of the string)."""
    return hashlib.sha256(text.encode()).digest()[0] % SYNTHETIC_HELD_OUT == 0


def _pseudo_sentence(rng, target):
    words = []
    while len(" ".join(words)) < target:
        word = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(1, 4))))
        if rng.random() < 0.2:
            word = word.capitalize()
        if rng.random() < 0.15:
            word += str(rng.choice(_PUNCTUATION))
        if rng.random() < 0.1:
            word += str(int(rng.integers(0, 10)))
        words.append(word)
    text = " ".join(words)[:target].strip()
    return text if len(text) >= 10 else text + " kalo mine"[:10 - len(text)]


def synthetic_text(rng, corpus="short", held_out=False):
    """A text of the corpus from the training split, or (held_out=True) from the held-out split."""
    c = SYNTHETIC_CORPORA[corpus]
    while True:
        target = int(rng.integers(c.min_bytes, c.max_bytes + 1))
        if c.letter_durations:  # no letter twice in a row: its two runs of frames would be one
            letters = [str(rng.choice(list(c.alphabet)))]
            while len(letters) < target:
                letters.append(str(rng.choice([a for a in c.alphabet if a != letters[-1]])))
            text = "".join(letters)
        elif c.alphabet:
            text = "".join(rng.choice(list(c.alphabet), size=target))
        else:
            text = _pseudo_sentence(rng, target)
        if synthetic_held_out(text) == held_out:
            return text


@functools.lru_cache(maxsize=8)
def synthetic_tables(seed):
    """Per-byte vectors, per-speaker offsets and the silence frame of the synthetic corpus (shared:
    callers must not modify them)."""
    rng = data.seeded_rng("synthetic-tables", seed)
    byte_vectors = rng.normal(0, 1.0, (256, data.LATENT_SIZE)).astype(np.float32)
    # Centred in blocks of 8 byte values, so that the mean frame of a text over many letters says
    # little about which letters: raw, the two seeds of six whose letters shared the largest mean
    # never aligned their primer, a text-blind model scoring too well there (README, "The demo").
    blocks = byte_vectors.reshape(32, 8, data.LATENT_SIZE)
    byte_vectors = (blocks - blocks.mean(axis=1, keepdims=True)).reshape(256, data.LATENT_SIZE)
    speaker_offsets = rng.normal(0, 0.5, (SYNTHETIC_SPEAKERS, data.LATENT_SIZE)).astype(np.float32)
    silence = rng.normal(0, 0.1, (data.LATENT_SIZE,)).astype(np.float32)
    return byte_vectors, speaker_offsets, silence


@functools.lru_cache(maxsize=8)
def letter_frames(seed):
    """(speakers, 256) frames each byte lasts for each speaker in the `durations` corpus: a length of
    1-4 per byte, times the speaker's rate (evenly spread over SPEAKER_RATES, in a seeded order),
    rounded, at least 1."""
    rng = data.seeded_rng("synthetic-durations", seed)
    base = rng.integers(1, 5, 256)
    rates = rng.permutation(np.linspace(*SPEAKER_RATES, SYNTHETIC_SPEAKERS))
    return np.maximum(1, np.floor(base[None, :] * rates[:, None] + 0.5)).astype(np.int64)


def synthetic_durations(text, speaker, seed, corpus="short"):
    """Frames of each byte of a (raw) text in the corpus, for this speaker."""
    raw = np.frombuffer(text.encode("utf-8"), np.uint8)
    c = SYNTHETIC_CORPORA[corpus]
    return letter_frames(seed)[speaker][raw] if c.letter_durations else np.full(len(raw), c.frames_per_byte)


def synthetic_latent(text, speaker, seed, corpus="short"):
    """The ground truth of the synthetic corpus for a (raw) text: (N, 128) float16."""
    byte_vectors, speaker_offsets, _ = synthetic_tables(seed)
    raw = np.frombuffer(text.encode("utf-8"), np.uint8)
    frames = np.repeat(byte_vectors[raw], synthetic_durations(text, speaker, seed, corpus), axis=0)
    return (frames + speaker_offsets[speaker]).astype(np.float16)


def recognise(latent, seed, corpus="short"):
    """What a synthetic corpus's latent says, read as an exact recogniser would: each frame is the
    nearest of the corpus's letter vectors (each plus each speaker's offset) or silence; the speaker
    is the one most frames point to; each run of one letter is as many letters as its length holds
    that letter's frames for that speaker (`medium`'s doubled letters count twice). Returns (text,
    end): end is the frame after the last one that is not silence (0 for no speech)."""
    byte_vectors, speaker_offsets, silence = synthetic_tables(seed)
    c = SYNTHETIC_CORPORA[corpus]
    alphabet = np.frombuffer((c.alphabet or bytes(range(32, 127)).decode()).encode(), np.uint8)
    candidates = (byte_vectors[alphabet][None] + speaker_offsets[:, None]).reshape(-1, data.LATENT_SIZE)
    candidates = np.concatenate([candidates, silence[None]])
    frames = np.asarray(latent, np.float32)
    distances = (frames ** 2).sum(1)[:, None] - 2 * frames @ candidates.T + (candidates ** 2).sum(1)[None]
    nearest = distances.argmin(axis=1)
    speech = nearest < len(candidates) - 1
    if not speech.any():
        return "", 0
    speaker = int(np.bincount(nearest[speech] // len(alphabet)).argmax())
    letters = alphabet[nearest[speech] % len(alphabet)]
    starts = np.flatnonzero(np.concatenate([[True], letters[1:] != letters[:-1]]))
    runs = np.diff(np.concatenate([starts, [len(letters)]]))
    text = []
    for letter, run in zip(letters[starts], runs):
        expected = synthetic_durations(chr(letter), speaker, seed, corpus)[0]
        text.append(chr(letter) * max(1, int(np.floor(run / expected + 0.5))))
    return "".join(text), int(np.flatnonzero(speech)[-1]) + 1


def edit_distance(said, text):
    """Levenshtein distance: the insertions, deletions and substitutions that turn `text` into `said`."""
    previous = list(range(len(said) + 1))
    for i, want in enumerate(text, 1):
        current = [i]
        for j, got in enumerate(said, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (want != got)))
        previous = current
    return previous[-1]


def character_error_rate(said, text):
    return edit_distance(said, text) / max(len(text), 1)


def synthetic_lengths(corpus="short"):
    """(max_latent_len, max_text_len, max_speaker_len) for a corpus: its canvas, the longest text's
    bytes plus BOS and normalize_text's "[S1] " prefix, and the canvas again for references."""
    c = SYNTHETIC_CORPORA[corpus]
    return c.canvas, c.max_bytes + 1 + len("[S1] "), -(-c.canvas // 4) * 4


def add_member(tar, name, payload):
    """One file of a shard: its bytes under `name`, with a fixed mtime (the same corpus, the same bytes)."""
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(payload))


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def make_synthetic(out_dir, shards, samples_per_shard, seed=0, corpus="short", held_out=False):
    """Write a learnable synthetic corpus in the real shard format, and its silence_latent.npy.
    Texts come from the training split, or with held_out=True from the held-out one (disjoint)."""
    if corpus not in SYNTHETIC_CORPORA:
        raise DataError(f"synthetic corpus must be one of {', '.join(SYNTHETIC_CORPORA)}, got {corpus!r}")
    os.makedirs(out_dir, exist_ok=True)
    rng = data.seeded_rng("synthetic-corpus", seed, corpus, held_out)
    for shard in range(shards):
        path = os.path.join(out_dir, f"shard-{shard:05d}.tar")

        def write(f, shard=shard):
            with tarfile.open(fileobj=f, mode="w") as tar:
                for i in range(samples_per_shard):
                    key = f"{shard:05d}-{i:06d}"
                    speaker = int(rng.integers(SYNTHETIC_SPEAKERS))
                    text = synthetic_text(rng, corpus, held_out)
                    ref_text = synthetic_text(rng, corpus, held_out)
                    add_member(tar, key + ".npy", npy_bytes(synthetic_latent(text, speaker, seed, corpus)))
                    add_member(tar, key + ".ref.npy", npy_bytes(synthetic_latent(ref_text, speaker, seed, corpus)))
                    meta = {"text": text, "speaker": speaker, "synthetic_seed": seed, "synthetic_corpus": corpus}
                    add_member(tar, key + ".json", json.dumps(meta).encode())
        storage.write_atomically(path, write)
    # Last: the trainer takes its presence for a complete corpus.
    _, _, silence = synthetic_tables(seed)
    storage.write_bytes(os.path.join(out_dir, "silence_latent.npy"),
                        npy_bytes(np.tile(silence, (750, 1)).astype(np.float16)))
    return out_dir


# ----------------------------------------------------------------------------
# Corpus builder: a folder of recordings and transcripts -> training shards (python corpus.py build)

MANIFEST_COLUMNS = {"audio": ("audio", "audio_path", "path", "file", "wav"),
                    "text": ("text", "transcript", "transcription", "sentence"),
                    "speaker": ("speaker", "speaker_id", "spk")}
BUILD_STATE = ".build.json"  # what the directory was built from: a rerun must continue the same build
LATENT_CACHE = ".latents"  # every clip's latent (or why it was skipped) until the build completes


def read_manifest(path):
    """A CSV or JSON Lines manifest -> [row dict or (None, reason)], audio paths made absolute.

    Each row names an audio file, a transcript and a speaker (MANIFEST_COLUMNS lists the accepted
    column names); every other column is kept for the sample's JSON."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.lower().endswith((".jsonl", ".ndjson", ".json")):
                raw = []
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except ValueError:
                            row = None
                        raw.append(row if isinstance(row, dict) else {"__bad__": number})
            else:
                reader = csv.DictReader(f)
                header = [c.strip() for c in reader.fieldnames or []]
                for role, names in MANIFEST_COLUMNS.items():
                    if not set(names) & set(header):
                        raise DataError(f"manifest {path} has no {role} column (one of {', '.join(names)}); "
                                        f"its columns are {', '.join(header) or 'none'}")
                raw = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    except FileNotFoundError:
        raise DataError(f"manifest {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the manifest {path} ({getattr(e, 'strerror', None) or e})") from None
    if not raw:
        raise DataError(f"manifest {path} holds no rows")
    base = os.path.dirname(os.path.abspath(path))
    rows = []
    for row in raw:
        if "__bad__" in row:
            rows.append((None, "bad_manifest_row"))
            continue
        found = {role: next((row[n] for n in names if row.get(n) not in (None, "")), None)
                 for role, names in MANIFEST_COLUMNS.items()}
        if found["audio"] is None or found["speaker"] is None or not isinstance(found["audio"], str):
            rows.append((None, "bad_manifest_row"))
            continue
        extra = {k: v for k, v in row.items() if k not in sum(MANIFEST_COLUMNS.values(), ())}
        rows.append({"audio": os.path.join(base, os.path.expanduser(found["audio"])),
                     "text": found["text"] if isinstance(found["text"], str) else "",
                     "speaker": str(found["speaker"]), "extra": extra})
    return rows


def _encode_clips(codec, rows, cache, max_seconds, batch_size, progress):
    """Encode every clip not yet in the cache: `{i}.npy` latent plus `{i}.json` ({"duration"} or
    {"skip": reason}), the JSON written last as the clip's completion mark. Clips of one
    hop-rounded length are batched together (padding clips of other lengths would change them)."""
    import torch  # the codec's: only a build of recordings needs it, never make-synthetic or the trainer

    import dacvae  # with torch

    def done(i, **info):
        storage.write_json(os.path.join(cache, f"{i:08d}.json"), info)

    pending = [i for i, row in enumerate(rows) if not os.path.exists(os.path.join(cache, f"{i:08d}.json"))]
    bar = tqdm(total=len(pending), desc="encode", unit="clip", disable=not progress)
    encoded_seconds, start = 0.0, time.perf_counter()
    window = max(64, 4 * batch_size)  # clips loaded at once: enough to find equal lengths, bounded memory
    for w in range(0, len(pending), window):
        by_frames = {}
        for i in pending[w:w + window]:
            row = rows[i]
            if isinstance(row, tuple):
                done(i, skip=row[1])
            elif not row["text"].strip():
                done(i, skip="empty_text")
            else:
                try:
                    audio = dacvae.load_audio(row["audio"])
                except dacvae.DACVAEError as e:
                    log.warning("skipping %s", e)
                    done(i, skip="unreadable_audio")
                    bar.update()
                    continue
                if len(audio) > max_seconds * dacvae.SAMPLE_RATE:
                    done(i, skip="too_long")
                elif float(np.max(np.abs(audio))) < dacvae.SILENT_PEAK:
                    done(i, skip="silent")
                else:
                    by_frames.setdefault(-(-len(audio) // codec.hop), []).append((i, audio))
                    continue
            bar.update()
        for frames, clips in sorted(by_frames.items()):
            for b in range(0, len(clips), batch_size):
                group = clips[b:b + batch_size]
                audio = torch.cat([dacvae.reflect_pad_right(torch.from_numpy(a)[None, None],
                                                            frames * codec.hop - len(a)) for _, a in group])
                latents = codec.encode(audio).transpose(1, 2).numpy().astype(np.float16)
                for (i, a), latent in zip(group, latents):
                    if not np.isfinite(latent).all():
                        done(i, skip="non_finite_latent")
                    else:
                        storage.write_bytes(os.path.join(cache, f"{i:08d}.npy"), npy_bytes(latent))
                        done(i, duration=round(len(a) / dacvae.SAMPLE_RATE, 4))
                    encoded_seconds += len(a) / dacvae.SAMPLE_RATE
                bar.update(len(group))
                bar.set_postfix(audio_s_per_s=f"{encoded_seconds / (time.perf_counter() - start):.1f}")
    bar.close()


def split_clips(rows, usable, seed, val_fraction=0.01, val_min=8, val_speakers=0):
    """Shuffle the usable clips (seeded) and hold some out: (training clips, validation clips).

    --val_speakers N holds out every clip of N speakers (unseen voices); otherwise a fraction of
    the clips, at least val_min of them, at most a quarter of the corpus."""
    order = [usable[j] for j in data.seeded_rng("build-order", seed).permutation(len(usable))]
    if val_speakers:
        speakers = sorted({rows[i]["speaker"] for i in usable})
        if val_speakers >= len(speakers):
            raise DataError(f"--val_speakers {val_speakers} leaves no speaker for training: the corpus has "
                            f"{len(speakers)}")
        held = {speakers[j] for j in data.seeded_rng("val-speakers", seed).permutation(len(speakers))[:val_speakers]}
        return [i for i in order if rows[i]["speaker"] not in held], [i for i in order if rows[i]["speaker"] in held]
    count = min(max(math.ceil(val_fraction * len(order)), val_min), len(order) // 4) if val_fraction > 0 else 0
    return order[count:], order[:count]


def write_shards(out_dir, rows, info, train, val, cache, seed, shard_size):
    """The training and validation shards of encoded clips, each clip with another clip of its
    speaker as reference; shards already there (written whole by an earlier run) are kept. Returns
    ({"train": [shard entries], "val": [...]}, clips without a reference, speakers)."""
    in_train = set(train)
    by_speaker = {}
    for i in sorted(train + val):  # every usable clip, in manifest order
        by_speaker.setdefault(rows[i]["speaker"], []).append(i)

    def reference_of(i):
        # A training clip's reference is another training clip: no validation audio is ever trained on.
        others = [j for j in by_speaker[rows[i]["speaker"]] if j != i and (j in in_train or i not in in_train)]
        return others[int(data.seeded_rng("reference", seed, i).integers(len(others)))] if others else None

    latent_path = lambda i: os.path.join(cache, f"{i:08d}.npy")
    written, no_reference = {"train": [], "val": []}, 0
    for split, clips, prefix in (("train", train, "shard-"), ("val", val, data.VAL_PREFIX)):
        for s in range(-(-len(clips) // shard_size)):
            members = clips[s * shard_size:(s + 1) * shard_size]
            no_reference += sum(reference_of(i) is None for i in members)
            name = f"{prefix}{s:05d}{data.SHARD_SUFFIX}"
            written[split].append({"name": name, "samples": len(members),
                                   "seconds": round(sum(info[i]["duration"] for i in members), 3)})
            if os.path.exists(os.path.join(out_dir, name)):
                continue  # written whole by an earlier run

            def write(f, members=members):
                with tarfile.open(fileobj=f, mode="w") as tar:
                    for i in members:
                        row, key = rows[i], f"{i:08d}"
                        meta = {**row["extra"], "text": row["text"], "duration": info[i]["duration"],
                                "speaker": row["speaker"], "source": row["audio"]}
                        add_member(tar, key + ".json", json.dumps(meta, ensure_ascii=False).encode())
                        with open(latent_path(i), "rb") as latent:
                            add_member(tar, key + ".npy", latent.read())
                        ref = reference_of(i)
                        if ref is not None:
                            with open(latent_path(ref), "rb") as latent:
                                add_member(tar, key + ".ref.npy", latent.read())
            storage.write_atomically(os.path.join(out_dir, name), write)

    return written, no_reference, len(by_speaker)


def build_corpus(manifest, out_dir, dacvae_weights=None, shard_size=1000, max_seconds=30.7, batch_size=8, seed=0,
                 progress=True, val_fraction=0.01, val_min=8, val_speakers=0):
    """Encode a manifest's clips with DACVAE and write shuffled training shards (shard-XXXXX.tar) and
    validation shards (val-XXXXX.tar), resumably. Returns the report (also OUT_DIR/manifest.json)."""
    import dacvae  # with torch: only a build of recordings needs the codec, never make-synthetic or the trainer

    if shard_size < 1 or batch_size < 1 or not max_seconds > 0:
        raise DataError("--shard_size and --batch_size must be at least 1 and --max_seconds positive")
    if not 0 <= val_fraction < 1 or val_min < 0 or val_speakers < 0:
        raise DataError("--val_fraction must lie in [0, 1), --val_min and --val_speakers must not be negative")
    rows = read_manifest(manifest)
    with open(manifest, "rb") as f:
        plan = {"manifest_sha256": hashlib.sha256(f.read()).hexdigest(), "shard_size": shard_size,
                "max_seconds": max_seconds, "seed": seed, "val_fraction": val_fraction, "val_min": val_min,
                "val_speakers": val_speakers}
    os.makedirs(out_dir, exist_ok=True)
    state_path = os.path.join(out_dir, BUILD_STATE)
    if os.path.exists(state_path):
        with open(state_path) as f:
            if json.load(f) != plan:
                raise DataError(f"{out_dir} holds a build of another manifest or other settings; build into a new "
                                "directory (or delete it)")
    else:
        storage.write_json(state_path, plan)
    report_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(report_path):
        with open(report_path) as f:
            log.info("%s is complete already", out_dir)
            return json.load(f)

    try:
        codec = dacvae.DACVAE.load(dacvae_weights, flag="--dacvae_weights")
    except dacvae.DACVAEError as e:
        raise DataError(str(e)) from None
    cache = os.path.join(out_dir, LATENT_CACHE)
    os.makedirs(cache, exist_ok=True)
    _encode_clips(codec, rows, cache, max_seconds, batch_size, progress)

    info = []
    for i in range(len(rows)):
        with open(os.path.join(cache, f"{i:08d}.json")) as f:
            info.append(json.load(f))
    skipped = Counter(x["skip"] for x in info if "skip" in x)
    usable = [i for i in range(len(rows)) if "duration" in info[i]]
    train, val = split_clips(rows, usable, seed, val_fraction, val_min, val_speakers)
    written, no_reference, speakers = write_shards(out_dir, rows, info, train, val, cache, seed, shard_size)
    silence = dacvae.silence_latent(codec, 30.0)
    storage.write_bytes(os.path.join(out_dir, "silence_latent.npy"), npy_bytes(silence))
    shards, val_shards = written["train"], written["val"]
    report = {"shards": shards, "samples": sum(s["samples"] for s in shards),
              "seconds": round(sum(s["seconds"] for s in shards), 3), "clips": len(rows),
              "skipped": dict(sorted(skipped.items())), "speakers": speakers,
              "val_shards": val_shards, "val_samples": len(val),
              "val_seconds": round(sum(s["seconds"] for s in val_shards), 3),
              "val_speakers": len({rows[i]["speaker"] for i in val}),
              "unseen_val_speakers": len({rows[i]["speaker"] for i in val} - {rows[i]["speaker"] for i in train}),
              "no_reference": no_reference, "codec": codec.kwargs, "max_seconds": max_seconds}
    storage.write_json(report_path, report)
    shutil.rmtree(cache)
    return report


def push_to_hub(out_dir, repo_id, shards_per_commit=20):
    """Upload a built corpus to a Hub dataset repo: files already there (same size) are skipped, the
    shards go up in commits of a few, the manifest last, so a rerun continues an interrupted push."""
    report_path = os.path.join(out_dir, "manifest.json")
    if not os.path.exists(report_path):
        raise DataError(f"{out_dir} is not a complete build (no manifest.json); run corpus.py build first")
    with open(report_path) as f:
        report = json.load(f)
    names = [s["name"] for s in report["shards"] + report.get("val_shards", [])] + ["silence_latent.npy"]
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
        remote = {f.path: getattr(f, "size", None) for f in api.list_repo_tree(repo_id, repo_type="dataset",
                                                                               recursive=True)}
        pending = [n for n in names if remote.get(n) != os.path.getsize(os.path.join(out_dir, n))]
        for b in range(0, len(pending), shards_per_commit):
            batch = pending[b:b + shards_per_commit]
            api.create_commit(repo_id, [CommitOperationAdd(n, os.path.join(out_dir, n)) for n in batch],
                              commit_message=f"Add {', '.join(batch[:3])}{' ...' if len(batch) > 3 else ''}",
                              repo_type="dataset")
            log.info("pushed %d/%d files to %s", b + len(batch), len(pending), repo_id)
        api.create_commit(repo_id, [CommitOperationAdd("manifest.json", report_path)],
                          commit_message="Add manifest.json", repo_type="dataset")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"could not push to the Hub dataset {repo_id} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); check the repo id, your token (HF_TOKEN) "
                        "and the network, then rerun: files already pushed are skipped") from None
    return len(pending)


def _print_build_report(report, out_dir):
    print(f"{out_dir}: {report['samples']} clips in {len(report['shards'])} shard(s), "
          f"{report['seconds'] / 3600:.2f} h of audio, {report['speakers']} speaker(s)")
    skipped = report["skipped"]
    print(f"skipped {sum(skipped.values())} of {report['clips']}: "
          + (", ".join(f"{k} {v}" for k, v in skipped.items()) or "none"))
    print(f"held out for validation: {report['val_samples']} clips in {len(report['val_shards'])} shard(s) "
          f"(val-*.tar), {report['val_speakers']} speaker(s), {report['unseen_val_speakers']} never in training")
    print(f"without a reference (a speaker's only clip): {report['no_reference']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-synthetic", help="write a learnable synthetic corpus in the real shard format")
    p.add_argument("out_dir", help="output directory (shards and silence_latent.npy)")
    p.add_argument("--shards", type=int, default=8, help="number of .tar shards")
    p.add_argument("--samples-per-shard", type=int, default=256, help="samples in each shard")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (texts, speakers, tables)")
    p.add_argument("--held-out", action="store_true", help="write texts of the held-out split (disjoint from "
                   "the training split) instead")
    p.add_argument("--corpus", default="short", choices=list(SYNTHETIC_CORPORA),
                   help="starter: random 2-6-byte strings over 8 letters; short: 4-8 bytes over 8 letters (the "
                   "trainer's default); medium: 4-12 bytes over 16 letters (the trainer trains on starter first); "
                   "words: 10-40-byte pseudo-sentences over ~40 characters; durations: 4-12 letters over 16, "
                   "each lasting 1-6 frames by letter and speaker")
    p = sub.add_parser("build", help="encode a corpus of recordings and transcripts into training shards")
    p.add_argument("manifest", help="CSV or JSONL: an audio path, a transcript and a speaker id per row "
                   "(columns audio/path, text/transcript, speaker/speaker_id; others are kept)")
    p.add_argument("out_dir", help="output directory for shard-XXXXX.tar, manifest.json and silence_latent.npy")
    p.add_argument("--dacvae_weights", default=None, help="local DACVAE weights.pth or Hub repo id (default "
                   "$DACVAE_WEIGHTS, else facebook/dacvae-watermarked)")
    p.add_argument("--shard_size", type=int, default=1000, help="manifest rows per shard")
    p.add_argument("--max_seconds", type=float, default=30.7, help="longer clips are skipped (the training maximum)")
    p.add_argument("--batch_size", type=int, default=8, help="clips of equal length encoded together")
    p.add_argument("--seed", type=int, default=0, help="seed for the shuffle of clips into shards, the validation "
                   "split and each clip's speaker reference")
    p.add_argument("--val_fraction", type=float, default=0.01, help="clips held out for validation (val-*.tar): "
                   "this fraction, at least --val_min, at most a quarter of the corpus; 0 holds none out")
    p.add_argument("--val_min", type=int, default=8, help="fewest clips --val_fraction holds out")
    p.add_argument("--val_speakers", type=int, default=0, metavar="N", help="instead hold out every clip of N "
                   "speakers (seeded choice): validation on voices never trained on")
    p.add_argument("--push_to_hub", default=None, metavar="ORG/REPO", help="then upload to this Hub dataset repo")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on one line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "build":
            report = build_corpus(args.manifest, args.out_dir, args.dacvae_weights, args.shard_size,
                                  args.max_seconds, args.batch_size, args.seed, val_fraction=args.val_fraction,
                                  val_min=args.val_min, val_speakers=args.val_speakers)
            if args.push_to_hub:
                pushed = push_to_hub(args.out_dir, args.push_to_hub)
                report = dict(report, pushed_files=pushed, hub=f"hf://datasets/{args.push_to_hub}")
            print(json.dumps(report)) if args.json else _print_build_report(report, args.out_dir)
        elif args.command == "make-synthetic":
            if args.shards < 1 or args.samples_per_shard < 1:
                raise DataError("--shards and --samples-per-shard must be at least 1")
            make_synthetic(args.out_dir, args.shards, args.samples_per_shard, args.seed, args.corpus, args.held_out)
            print(f"wrote {args.shards} shard(s) of {args.samples_per_shard} samples and silence_latent.npy "
                  f"to {args.out_dir}")
    except DataError as e:
        print(f"corpus.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
