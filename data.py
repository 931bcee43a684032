"""Training data for Echo: tar shards (local or on the Hugging Face Hub) -> fixed-shape batches.

Shards hold `{key}.npy` (target latent, (N, 128) float16), `{key}.ref.npy` (speaker reference
latent) and `{key}.json` ({"text": ...}); see `../shared/spec/formats.md`. Every host of a pod
streams its own share of the shards, many at once and shuffled across them, from one source or
several mixed by weight; the stream is deterministic, pinned to the shards it started on,
resumable from a small JSON state, and survives a dirty corpus (bad samples are skipped and
counted, never unpickled). Shards named val-*.tar are the validation split.

    python data.py inspect runs/synth                       # or hf://datasets/ORG/REPO[@REV][/GLOB]
    python data.py inspect hf://datasets/me/corpus --json
    python data.py inspect "runs/a:0.7,runs/b:0.3" --batches 10   # what the trainer's batches hold

Corpora are made by corpus.py (`make-synthetic`, `build`); `python data.py make-synthetic|build`
hands over to it.

Python:

    pipeline = Pipeline(DataConfig(source="runs/synth", batch_size=32, silence_latent="runs/synth/silence_latent.npy"))
    batch = next(pipeline)          # numpy arrays of fixed shapes, plus keys/sources/speakers lists
    state = pipeline.state()        # JSON-able; Pipeline(config, state=state) continues exactly here
"""

import argparse
import dataclasses
import fnmatch
import glob
import hashlib
import io
import json
import logging
import os
import queue
import shutil
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from collections import Counter

import numpy as np
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from tqdm import tqdm

log = logging.getLogger("data")

LATENT_SIZE = 128
FRAMES_PER_SECOND = 25
SPEAKER_PATCH = 4
SHARD_SUFFIX = ".tar"


class DataError(Exception):
    """A problem the user can fix (bad source, bad flag); main() prints it as one sentence."""


# ----------------------------------------------------------------------------
# Text: shared with inference.py, so that training and inference never disagree.

_TEXT_REPLACEMENTS = (("\u2026", "..."), ("\u2018", "'"), ("\u2019", "'"), ("\u201c", '"'), ("\u201d", '"'),
                      ("\r\n", " "), ("\n", " "), ("\r", " "), (":", ","), (";", ","), ("\u2014", ", "))


def normalize_text(text: str) -> str:
    """The Echo text normalisation, plus the "[S1] " speaker prefix where the text names none."""
    for old, new in _TEXT_REPLACEMENTS:
        text = text.replace(old, new)
    text = text.strip()
    if not (text.startswith(("[", "(")) or "S1]" in text or "S2]" in text):
        text = "[S1] " + text
    return text


def encode_text(text: str, max_len: int):
    """Normalised text -> (ids, mask) int32 of length max_len: BOS 0, then UTF-8 bytes.

    Returns None when the bytes do not fit: cutting text would teach the model to drop words.
    """
    raw = normalize_text(text).encode("utf-8")
    if len(raw) + 1 > max_len:
        return None
    ids = np.zeros(max_len, np.int32)
    ids[1:len(raw) + 1] = np.frombuffer(raw, np.uint8)
    mask = np.zeros(max_len, np.int32)
    mask[:len(raw) + 1] = 1
    return ids, mask


# ----------------------------------------------------------------------------
# Sources

VAL_PREFIX = "val-"  # validation shards (corpus.py build --val_fraction/--val_speakers): never in the training stream
SPLITS = ("train", "val", "all")


def parse_hub_source(source):
    """hf://datasets/ORG/REPO[@REVISION][/GLOB] -> (repo_id, revision, glob)."""
    rest = source[len("hf://"):]
    if not rest.startswith("datasets/") or rest.count("/") < 2:
        raise DataError(f"{source}: Hub sources look like hf://datasets/ORG/REPO[@REVISION][/GLOB]")
    org, name, *pattern = rest[len("datasets/"):].split("/")
    name, _, revision = name.partition("@")
    return f"{org}/{name}", revision or "main", "/".join(pattern) or "*"


def parse_sources(spec):
    """`A[:WEIGHT],B[:WEIGHT],...` -> [(source, weight)] with weights normalised to sum to 1.

    A weight follows the last ':' of a source and is optional (equal shares). A spec that names
    an existing file or directory as a whole is one source, commas and all."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError("the data source is empty; give a directory, glob, shard list or hf://datasets/ORG/REPO")
    if os.path.exists(spec):
        return [(spec, 1.0)]
    sources = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            raise DataError(f"data source {spec!r} has an empty entry between commas")
        head, colon, tail = part.rpartition(":")
        weight = None
        if colon and head and not tail.startswith("//"):
            try:
                weight = float(tail)
            except ValueError:
                weight = None
            if weight is not None and not (np.isfinite(weight) and weight > 0):
                raise DataError(f"the weight of data source {head!r} must be a positive number, got {tail!r}")
        sources.append((head, weight) if weight is not None else (part, None))
    names = [name for name, _ in sources]
    if len(set(names)) < len(names):
        raise DataError(f"data source {spec!r} names a source twice; give each once, with its weight")
    weights = [1.0 if w is None else w for _, w in sources]
    return [(name, w / sum(weights)) for name, w in zip(names, weights)]


def in_split(shard, split):
    is_val = os.path.basename(shard).startswith(VAL_PREFIX)
    return split == "all" or is_val == (split == "val")


def hub_commit(source):
    """The commit a Hub source's revision points at now (pinning a run to it)."""
    repo_id, revision, _ = parse_hub_source(source)
    try:
        return HfApi().dataset_info(repo_id, revision=revision).sha
    except Exception as e:
        raise DataError(f"cannot resolve the Hub dataset {repo_id}@{revision} ({type(e).__name__}); check the "
                        "repo id, the revision, your token (HF_TOKEN) and the network") from None


def _all_shards(source, revision=None):
    """(every shard of one source, sorted, what the source is in words): local dir, glob, text file
    of paths, or Hub dataset (at `revision` if given, else the source's own)."""
    if source.startswith("hf://"):
        repo_id, own_revision, pattern = parse_hub_source(source)
        revision = revision or own_revision
        try:
            files = HfApi().list_repo_files(repo_id, repo_type="dataset", revision=revision)
        except Exception as e:
            raise DataError(f"cannot list the Hub dataset {repo_id}@{revision} ({type(e).__name__}); check the "
                            "repo id, your token (HF_TOKEN) and the network") from None
        return sorted(f for f in files if f.endswith(SHARD_SUFFIX) and fnmatch.fnmatch(f, pattern)), \
            f"Hub dataset {repo_id}@{revision} (pattern {pattern})"
    if os.path.isdir(source):
        return sorted(glob.glob(os.path.join(source, "**", "*" + SHARD_SUFFIX), recursive=True)), f"directory {source}"
    if os.path.isfile(source) and not source.endswith(SHARD_SUFFIX):
        base = os.path.dirname(os.path.abspath(source))
        with open(source) as f:
            shards = [os.path.join(base, line.strip()) for line in f if line.strip() and not line.startswith("#")]
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise DataError(f"shard list {source} names {len(missing)} missing file(s), e.g. {missing[0]}")
        return shards, f"shard list {source}"
    return sorted(glob.glob(source)), f"path or pattern {source}"


@dataclasses.dataclass(frozen=True)
class Listing:
    """Every shard of one source, listed once (a Hub source at the commit its revision named then),
    and handed to every pipeline that reads the source: training, validation, audio samples."""
    source: str
    revision: str  # the Hub commit; None for a local source
    shards: tuple  # of every split
    kind: str  # the source in words, for errors

    def split(self, split):
        """The shards of a split: training shards ("train"), validation shards ("val", named
        val-*.tar) or both ("all")."""
        kept = [s for s in self.shards if in_split(s, split)]
        if not kept:
            what = "validation (val-*) " if split == "val" else ""
            only_val = " (only validation shards, val-*.tar)" if self.shards and split == "train" else ""
            raise DataError(f"no {what}{SHARD_SUFFIX} shards found in {self.kind}{only_val}")
        return kept

    def has(self, split):
        return any(in_split(s, split) for s in self.shards)


def list_source(source, revision=None):
    """The Listing of one source: a Hub source at `revision`, else at the commit its own revision
    points at now (pinning a run to it)."""
    if source.startswith("hf://") and revision is None:
        revision = hub_commit(source)
    shards, kind = _all_shards(source, revision)
    return Listing(source, revision, tuple(shards), kind)


def list_shards(source, split="all", revision=None):
    """The sorted shard list of one source's split at `revision` (else the source's own)."""
    shards, kind = _all_shards(source, revision)
    return Listing(source, revision, tuple(shards), kind).split(split)


def shard_fingerprint(source, shards, revision):
    """What pins a source: the Hub commit and shard names, or local shard names and sizes."""
    if source.startswith("hf://"):
        return {"revision": revision, "shards": list(shards)}
    base = source if os.path.isdir(source) else None
    return {"revision": None, "shards": [[os.path.relpath(s, base) if base else s, os.path.getsize(s)]
                                         for s in shards]}


def describe_change(old, new):
    """One phrase saying how a pinned shard list changed: added, removed, resized shards."""
    old_sizes = {s[0] if isinstance(s, list) else s: (s[1] if isinstance(s, list) else None) for s in old}
    new_sizes = {s[0] if isinstance(s, list) else s: (s[1] if isinstance(s, list) else None) for s in new}
    parts = []
    for label, names in (("added", sorted(set(new_sizes) - set(old_sizes))),
                         ("removed", sorted(set(old_sizes) - set(new_sizes))),
                         ("changed size", sorted(n for n in set(old_sizes) & set(new_sizes)
                                                 if old_sizes[n] != new_sizes[n]))):
        if names:
            parts.append(f"{len(names)} {label} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    return "; ".join(parts) or "the order changed"


class ShardFetcher:
    """Local paths for shards; Hub shards are downloaded into a scratch directory just before use
    (ahead, in the background) and deleted once consumed, so disk holds the open shards and the
    next few."""

    def __init__(self, source, scratch_dir, retries=5, backoff=1.0, revision=None):
        self.hub = parse_hub_source(source) if source.startswith("hf://") else None
        if self.hub and revision:
            self.hub = (self.hub[0], revision, self.hub[2])
        self.scratch_dir = scratch_dir
        self.retries, self.backoff = retries, backoff
        self.pending = {}  # shard -> Thread
        self.results = {}  # shard -> path or exception
        self.opened = {}  # shard -> path of a download in use
        self.held = {}  # shard -> open file: a download in use, from arrival to release

    def _download(self, shard):

        repo_id, revision, _ = self.hub
        error = None
        for attempt in range(self.retries + 1):
            try:
                path = hf_hub_download(repo_id, shard, repo_type="dataset", revision=revision,
                                       local_dir=self.scratch_dir)
                # Held open until released: disk_watchdog.py never deletes a file some process has open.
                self.held[shard] = open(path, "rb")
                self.results[shard] = path
                return
            except (RepositoryNotFoundError, EntryNotFoundError) as e:
                if "Local" not in type(e).__name__:  # a real 404: retrying will not help
                    error = e
                    break
                error = e
            except Exception as e:
                error = e
            if attempt < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        self.results[shard] = error

    def prefetch(self, shard):
        if self.hub and shard not in self.pending and shard not in self.results and shard not in self.opened:
            self.pending[shard] = threading.Thread(target=self._download, args=(shard,), daemon=True)
            self.pending[shard].start()

    def open(self, shard):
        """Local path of the shard, or an exception if it could not be fetched."""
        if not self.hub:
            return shard
        if shard in self.opened:
            return self.opened[shard]
        self.prefetch(shard)
        self.pending.pop(shard).join()
        path = self.results.pop(shard)
        if isinstance(path, str):
            self.opened[shard] = path
        return path

    def release(self, shard):
        """The shard is consumed: delete its download."""
        path = self.opened.pop(shard, None)
        held = self.held.pop(shard, None)
        if held:
            held.close()
        if path and os.path.exists(path):
            os.remove(path)


# ----------------------------------------------------------------------------
# Samples

@dataclasses.dataclass
class DataConfig:
    source: str  # one source, or several with weights: "A:0.7,B:0.3" (see parse_sources)
    batch_size: int = 32  # per host
    max_latent_len: int = 768  # frames (30.7 s); longer clips are skipped, never cropped
    max_text_len: int = 768  # bytes including BOS; longer texts are skipped
    max_speaker_len: int = 768  # frames, a multiple of 4; longer references are cropped
    seed: int = 0
    shuffle_block: int = 512  # samples shuffled together within a host (drawn from all open shards)
    open_shards: int = 64  # shards per source read at once, interleaved: batches span this many shards
    prefetch_batches: int = 4
    silence_latent: str = None  # .npy of silence frames that pad targets (zeros if None)
    scratch_dir: str = None  # where Hub shards are downloaded (default: a temp dir per host)
    process_index: int = 0  # this host's share of the shards: the trainer passes jax.process_index()
    process_count: int = 1  # and jax.process_count()
    retries: int = 2  # whole-download retries, on top of huggingface_hub's own per-request backoff
    warn_every_s: float = 60.0
    split: str = "train"  # "train" skips validation shards (val-*.tar), "val" reads only them, "all" both
    accept_data_change: bool = False  # resume even if a source's pinned shard list changed

    def validate(self):
        for name in ("batch_size", "max_latent_len", "max_text_len", "max_speaker_len", "shuffle_block",
                     "open_shards"):
            if getattr(self, name) < 1:
                raise DataError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_speaker_len % SPEAKER_PATCH:
            raise DataError(f"max_speaker_len must be a multiple of {SPEAKER_PATCH}, got {self.max_speaker_len}")
        if self.max_text_len < 2:
            raise DataError("max_text_len must leave room for BOS and at least one byte")
        if self.split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")


def load_silence(path, frames):
    """(frames, 128) float32 padding: the silence latent, repeated as needed; zeros if no path."""
    if path is None:
        return np.zeros((frames, LATENT_SIZE), np.float32)
    try:
        silence = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"cannot read the silence latent {path} ({type(e).__name__})") from None
    if silence.ndim != 2 or silence.shape[1] != LATENT_SIZE or len(silence) == 0 or not np.isfinite(silence).all():
        raise DataError(f"silence latent {path} must be a finite (frames, {LATENT_SIZE}) array, got {silence.shape}")
    return np.resize(silence.astype(np.float32), (frames, LATENT_SIZE)) if len(silence) < frames \
        else silence[:frames].astype(np.float32)


def _load_latent(raw):
    """Bytes of a .npy -> (array, None) or (None, reason). Never unpickles."""
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError as e:
        return None, "pickled_array" if "pickle" in str(e).lower() or "object" in str(e).lower() else "bad_npy"
    except Exception:
        return None, "bad_npy"
    if array.ndim != 2 or array.shape[1] != LATENT_SIZE or array.shape[0] == 0:
        return None, "wrong_shape"
    if not np.issubdtype(array.dtype, np.floating):
        return None, "wrong_dtype"
    if not np.isfinite(array).all():
        return None, "non_finite"
    return array, None


class Sample:
    """One parsed training example (before padding)."""
    __slots__ = ("key", "latent", "text_ids", "text_mask", "reference", "speaker")

    def __init__(self, key, latent, text_ids, text_mask, reference, speaker=""):
        self.key, self.latent, self.text_ids, self.text_mask, self.reference, self.speaker = \
            key, latent, text_ids, text_mask, reference, speaker


def parse_sample(key, members, config, counters):
    """Tar members of one key -> Sample, or None (and a counted reason)."""
    def skip(reason):
        counters[reason] += 1
        return None

    if key + ".npy" not in members:
        return skip("missing_latent")
    if key + ".json" not in members:
        return skip("missing_json")
    try:
        meta = json.loads(members[key + ".json"].decode("utf-8"))
    except UnicodeDecodeError:
        return skip("non_utf8_text")
    except ValueError:
        return skip("bad_json")
    if not isinstance(meta, dict):
        return skip("bad_json")
    if not isinstance(meta.get("text"), str):
        return skip("missing_text")
    if not meta["text"].strip():
        return skip("empty_text")
    encoded = encode_text(meta["text"], config.max_text_len)
    if encoded is None:
        return skip("text_too_long")
    latent, reason = _load_latent(members[key + ".npy"])
    if latent is None:
        return skip(reason)
    if len(latent) > config.max_latent_len:
        return skip("latent_too_long")
    reference = None
    if key + ".ref.npy" in members:
        reference, reason = _load_latent(members[key + ".ref.npy"])
        if reference is None:
            counters["unusable_reference"] += 1
    else:
        counters["no_reference"] += 1
    speaker = meta.get("speaker")
    return Sample(key, latent, encoded[0], encoded[1], reference, "" if speaker is None else str(speaker))


def read_shard(path, start, config, counters):
    """Yield (index, Sample or None) for the raw sample groups of a tar, from group `start` on.

    Members are grouped by key (the name up to the first dot of its basename). A truncated or
    corrupt tar keeps the samples before the damage.
    """
    def key_of(name):
        directory, base = os.path.split(name)
        return os.path.join(directory, base.split(".", 1)[0])

    index, key, members = 0, None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k = key_of(member.name)
                if k != key and key is not None:
                    if index >= start:
                        yield index, parse_sample(key, members, config, counters)
                    index, members = index + 1, {}
                key = k
                if index >= start:
                    members[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        counters["truncated_tar"] += 1
        return  # the group in progress may be cut: drop it
    if key is not None and index >= start:
        yield index, parse_sample(key, members, config, counters)


def seeded_rng(*parts):
    """A numpy Generator from a tuple of ints/strings: the same inputs give the same stream."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def shard_order(shards, seed, source_index, epoch):
    return [shards[i] for i in seeded_rng("shards", seed, source_index, epoch).permutation(len(shards))]


# ----------------------------------------------------------------------------
# The per-host stream

class SourceStream:
    """One source's samples for this host, forever: each epoch takes the host's share of the shards
    in a seeded order and reads `open_shards` of them at once (a used-up shard's slot takes the next
    shard), interleaving them into blocks of `shuffle_block` samples that are shuffled.

    Its position is a small JSON dict: epoch, block number, the open shards as of the block's start
    ([position in the epoch's order, sample offset]), the next shard to open, and how many of the
    block's samples were handed out. Every choice follows from (seed, source, epoch, block)."""

    def __init__(self, index, source, shards, config, scratch_dir, revision=None):
        self.index, self.source, self.shards, self.config = index, source, shards, config
        self.fetcher = ShardFetcher(source, scratch_dir, config.retries, revision=revision)
        self.counters = Counter()
        self.readers = {}  # (epoch, position) -> [offset, generator] of each open shard

    def host_shards(self, epoch):
        c = self.config
        return shard_order(self.shards, c.seed, self.index, epoch)[c.process_index::c.process_count]

    def samples(self, position):
        """((shard, index, epoch, Sample), position after it) forever, from `position` on."""
        c, s = self.config, dict(position)
        empty_epochs, fresh, found = 0, s["slots"] is None, False
        while True:
            if s["slots"] is None:
                first = min(c.open_shards, len(self.host_shards(s["epoch"])))
                s = dict(s, slots=[[p, 0] for p in range(first)], next=first, block=0, emitted=0)
            block, slots, following = self._read_block(s["epoch"], s["block"], s["slots"], s["next"])
            order = seeded_rng("block", c.seed, self.index, s["epoch"], s["block"]).permutation(len(block))
            for i in range(s["emitted"], len(block)):
                found = True
                yield block[order[i]], dict(s, emitted=i + 1)
            if slots:
                s = dict(s, block=s["block"] + 1, slots=slots, next=following, emitted=0)
                continue
            empty_epochs = empty_epochs + 1 if fresh and not found else 0
            if empty_epochs >= 2:
                raise DataError(f"host {c.process_index} found no usable sample in a whole epoch of "
                                f"{self.source}; run `python data.py inspect` on it")
            s = dict(s, epoch=s["epoch"] + 1, slots=None, next=0, block=0, emitted=0)
            fresh, found = True, False

    def _read_block(self, epoch, block, slots, following):
        """Up to `shuffle_block` usable samples, taken round by round from the open shards in a
        seeded order; returns them, the open shards after them and the next shard to open."""
        order = self.host_shards(epoch)
        live = [list(slot) for slot in slots]
        for position, _ in live:  # downloads of the shards this block opens run side by side
            if (epoch, position) not in self.readers:
                self.fetcher.prefetch(order[position])
        if following < len(order):
            self.fetcher.prefetch(order[following])

        def pull(j):
            """The next usable sample of slot j; a used-up shard's slot moves on to the next shard."""
            nonlocal following
            while live[j] is not None:
                position, offset = live[j]
                reader = self.readers.get((epoch, position))
                if reader is None or reader[0] != offset:
                    reader = self.readers[(epoch, position)] = [offset, self._open(order[position], offset)]
                for index, sample in reader[1]:
                    reader[0] = live[j][1] = index + 1
                    if sample is not None:
                        return order[position], index, epoch, sample
                del self.readers[(epoch, position)]
                self.fetcher.release(order[position])
                if following < len(order):
                    live[j], following = [following, 0], following + 1
                    if following < len(order):
                        self.fetcher.prefetch(order[following])
                else:
                    live[j] = None
            return None

        rng = seeded_rng("interleave", self.config.seed, self.index, epoch, block)
        samples = []
        while live and len(samples) < self.config.shuffle_block:
            for j in rng.permutation(len(live)):
                sample = pull(j)
                if sample is not None:
                    samples.append(sample)
                    if len(samples) == self.config.shuffle_block:
                        break
            live = [slot for slot in live if slot is not None]
        return samples, live, following

    def _open(self, shard, offset):
        path = self.fetcher.open(shard)
        if isinstance(path, BaseException):
            self.counters["shard_download_failed"] += 1
            log.warning("skipping shard %s: download failed after %d retries (%s)", shard, self.config.retries,
                        type(path).__name__)
            return iter(())
        return read_shard(path, offset, self.config, self.counters)

    def close(self):
        self.readers.clear()
        for shard in list(self.fetcher.opened):
            self.fetcher.release(shard)


def _upgrade_state(state, sources):
    """A data state saved before sources and open shards existed -> today's, at its epoch's start."""
    if state is None or "sources" in state:
        return state
    if len(sources) != 1:
        raise DataError("the saved data state has one source, the config names several")
    log.warning("data state from an earlier version of data.py: the stream restarts epoch %d", state["epoch"])
    return {"seed": state["seed"], "samples_seen": state["samples_seen"],
            "sources": [{"epoch": state["epoch"], "slots": None, "next": 0, "block": 0, "emitted": 0, "taken": 0}]}


def start_of_next_epoch(states):
    """The data position of every host of a run whose number of hosts changed, from the positions
    the old hosts saved: each source at the start of the epoch after the furthest any of them
    reached, on the same pinned shards and Hub commits (a host's share of an epoch depends on the
    number of hosts, so the old positions cannot be split exactly)."""
    epochs = [max(state["sources"][i]["epoch"] for state in states) + 1 for i in range(len(states[0]["sources"]))]
    return {"seed": states[0]["seed"], "samples_seen": 0, "pins": states[0].get("pins"),
            "sources": [{"epoch": epoch, "slots": None, "next": 0, "block": 0, "emitted": 0, "taken": 0}
                        for epoch in epochs]}


class Pipeline:
    """Infinite, deterministic, resumable batches for this host. Iterate, or call next().

    With several sources, sample n comes from the source furthest behind its weight's share
    ((n + 1) * weight - samples taken), so the mix holds to within one sample at every point."""

    def __init__(self, config: DataConfig, state: dict = None, listings=None):
        config.validate()
        self.config = config
        self.sources = parse_sources(config.source)
        state = _upgrade_state(state, self.sources)
        if state is not None and state.get("seed", config.seed) != config.seed:
            raise DataError(f"the saved data state used seed {state['seed']}, the config says {config.seed}")
        if state is not None and len(state["sources"]) != len(self.sources):
            raise DataError(f"the saved data state has {len(state['sources'])} source(s), the data flag names "
                            f"{len(self.sources)}; resume with the sources the run started with")
        saved_pins = (state or {}).get("pins")
        if config.silence_latent is None:
            log.warning("no silence latent given: target latents are padded with zeros, not the codec's "
                        "silence (make one with `python dacvae.py silence`)")
        self.silence = load_silence(config.silence_latent, config.max_latent_len)
        self.streams, self.pins, self.listings = [], [], {}
        pinned_shards = []
        for i, (source, _) in enumerate(self.sources):
            pin, shards = self._pin(source, saved_pins[i] if saved_pins else None, (listings or {}).get(source))
            if len(shards) < config.process_count:
                raise DataError(f"{len(shards)} shard(s) in {source} cannot feed {config.process_count} hosts: "
                                "every host needs at least one shard")
            self.pins.append(pin)
            pinned_shards.append(shards)
        # Only Hub shards are downloaded; a scratch directory made here is this pipeline's and goes with it.
        hub = any(source.startswith("hf://") for source, _ in self.sources)
        self._own_scratch = tempfile.mkdtemp(prefix=f"echo-shards-{config.process_index}-") \
            if hub and not config.scratch_dir else None
        scratch = config.scratch_dir or self._own_scratch
        for i, ((source, _), shards, pin) in enumerate(zip(self.sources, pinned_shards, self.pins)):
            self.streams.append(SourceStream(i, source, shards, config, os.path.join(scratch, str(i)) if
                                             scratch and len(self.sources) > 1 else scratch, pin["revision"]))
        fresh = {"epoch": 0, "slots": None, "next": 0, "block": 0, "emitted": 0, "taken": 0}
        self._state = state or {"seed": config.seed, "samples_seen": 0, "sources": [fresh] * len(self.sources)}
        self._delivered_counters = {source: {} for source, _ in self.sources}
        self._queue = queue.Queue(maxsize=config.prefetch_batches)
        self._stop = threading.Event()
        self._last_warning = 0.0
        self._thread = threading.Thread(target=self._produce, daemon=True)
        self._thread.start()

    def _pin(self, source, saved, listing):
        """(pin, shards) of a source, from its `listing` (listed here where none is handed over, or
        where the run is pinned to another commit). The pin is the Hub commit and its shard names,
        or local shard names and sizes; a resume reads what it pinned, and a changed shard list
        stops it unless accept_data_change."""
        accept = self.config.accept_data_change
        pinned = saved.get("revision") if saved else None
        if listing is None or (pinned and listing.revision != pinned):
            try:
                listing = list_source(source, pinned)
                listing.split(self.config.split)
            except DataError as e:
                if not pinned:
                    raise
                if not accept:
                    raise DataError(f"{source}: this run is pinned to commit {pinned}, which cannot be read now "
                                    f"({e}); pass --accept_data_change to continue on today's revision") from None
                listing = list_source(source)
                log.warning("%s: pinned commit unreadable; continuing on %s", source, listing.revision)
        shards = listing.split(self.config.split)
        self.listings[source] = listing
        pin = dict(shard_fingerprint(source, shards, listing.revision), source=source)
        if saved and pin["shards"] != saved["shards"]:
            change = describe_change(saved["shards"], pin["shards"])
            if not accept:
                raise DataError(f"the shards of {source} changed since this run started: {change}; restore them, "
                                "or pass --accept_data_change to continue on today's shards (the data order "
                                "changes)")
            log.warning("the shards of %s changed since this run started (%s): continuing on today's shards, "
                        "in a new order", source, change)
        return pin, shards

    # -- consumer side
    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, state, counters = item
        self._state, self._delivered_counters = state, counters
        return batch

    def state(self):
        """Where the NEXT batch starts, per source, and what each source is pinned to (JSON-able)."""
        return dict(self._state, pins=self.pins)

    def counters(self):
        """Skipped samples by reason, and other events, as of the last batch handed out (all sources)."""
        total = Counter()
        for counts in self._delivered_counters.values():
            total.update(counts)
        return dict(total)

    def source_counters(self):
        """counters(), per source (as written in the data flag)."""
        return {source: dict(counts) for source, counts in self._delivered_counters.items()}

    def close(self):
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.1)
        for stream in self.streams:
            stream.close()
        if self._own_scratch:
            shutil.rmtree(self._own_scratch, ignore_errors=True)

    # -- producer side
    def _samples(self):
        """((source index, (shard, index, epoch, Sample)), state after it) forever, from self._state."""
        s = self._state
        weights = [weight for _, weight in self.sources]
        positions = list(s["sources"])
        taken = [position["taken"] for position in positions]
        streams = [stream.samples(position) for stream, position in zip(self.streams, positions)]
        seen = s["samples_seen"]
        while not self._stop.is_set():
            n = sum(taken)
            i = max(range(len(streams)), key=lambda j: (n + 1) * weights[j] - taken[j])
            item, position = next(streams[i])
            taken[i] += 1
            positions[i] = dict(position, taken=taken[i])
            seen += 1
            yield (i, item), {"seed": s["seed"], "samples_seen": seen, "sources": list(positions)}

    def _produce(self):
        try:
            c = self.config
            batch, count = self._empty_batch(), 0
            for (i, (shard, index, epoch, sample)), state in self._samples():
                stream = self.streams[i]
                # Keyed by the shard's file name: a corpus copied elsewhere crops the same way.
                fill_row(batch, count, sample, self.silence, c.max_speaker_len,
                         seeded_rng("crop", c.seed, epoch, os.path.basename(shard), index), stream.counters)
                batch["keys"][count], batch["sources"][count] = sample.key, stream.source
                batch["speakers"][count] = sample.speaker
                count += 1
                if count == c.batch_size:
                    self._maybe_warn()
                    counters = {s.source: dict(s.counters) for s in self.streams}
                    if not self._put((batch, state, counters)):
                        return
                    batch, count = self._empty_batch(), 0
        except BaseException as e:  # handed to the consumer, who raises it
            self._put(e)

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _maybe_warn(self):
        skipped = Counter()
        for stream in self.streams:
            skipped.update({k: v for k, v in stream.counters.items() if k not in ("no_reference", "cropped_reference")})
        now = time.monotonic()
        if skipped and now - self._last_warning >= self.config.warn_every_s:
            self._last_warning = now
            log.warning("data: skipped so far %s", json.dumps(dict(skipped), sort_keys=True))

    def _empty_batch(self):
        """Arrays of fixed shapes, plus each sample's key, source and speaker (lists of str)."""
        c = self.config
        b = c.batch_size
        return {"latent": np.empty((b, c.max_latent_len, LATENT_SIZE), np.float32),
                "latent_mask": np.zeros((b, c.max_latent_len), np.int32),
                "text_ids": np.empty((b, c.max_text_len), np.int32),
                "text_mask": np.empty((b, c.max_text_len), np.int32),
                "speaker_latent": np.zeros((b, c.max_speaker_len, LATENT_SIZE), np.float32),
                "speaker_mask": np.zeros((b, c.max_speaker_len), np.int32),
                "keys": [""] * b, "sources": [""] * b, "speakers": [""] * b}


def fill_row(batch, row, sample, silence, max_speaker_len, rng, counters):
    """Write one sample into row `row` of a batch: padded latent, text, cropped reference."""
    n = len(sample.latent)
    batch["latent"][row, :n] = sample.latent
    batch["latent"][row, n:] = silence[:batch["latent"].shape[1] - n]
    batch["latent_mask"][row] = 0
    batch["latent_mask"][row, :n] = 1
    batch["text_ids"][row] = sample.text_ids
    batch["text_mask"][row] = sample.text_mask
    batch["speaker_latent"][row] = 0
    batch["speaker_mask"][row] = 0
    ref = sample.reference
    if ref is not None:
        if len(ref) > max_speaker_len:
            start = int(rng.integers(0, len(ref) - max_speaker_len + 1))
            ref = ref[start:start + max_speaker_len]
            counters["cropped_reference"] += 1
        batch["speaker_latent"][row, :len(ref)] = ref
        batch["speaker_mask"][row, :len(ref)] = 1


def inspect(source, config=None):
    """Read every sample of a source through the trainer's parsing code; counts and distributions."""
    config = config or DataConfig(source=source)
    config.validate()
    counters = Counter()
    fetcher = ShardFetcher(source, tempfile.mkdtemp(prefix="echo-inspect-"), config.retries)
    latent_lens, text_lens, ref_lens = [], [], []
    shards = list_shards(source, "all")
    splits = {split: {"shards": 0, "samples_ok": 0} for split in ("train", "val")}
    for name in tqdm(shards, desc="inspect", unit="shard", disable=len(shards) < 3):
        split = splits["val" if in_split(name, "val") else "train"]
        split["shards"] += 1
        path = fetcher.open(name)
        if isinstance(path, BaseException):
            counters["shard_download_failed"] += 1
            continue
        for _, sample in read_shard(path, 0, config, counters):
            if sample is None:
                continue
            counters["samples_ok"] += 1
            split["samples_ok"] += 1
            latent_lens.append(len(sample.latent))
            text_lens.append(int(sample.text_mask.sum()))
            if sample.reference is not None:
                ref_lens.append(len(sample.reference))
        fetcher.release(name)

    def stats(values):
        if not values:
            return {}
        v = np.asarray(values)
        return {"min": int(v.min()), "mean": round(float(v.mean()), 1), "p50": int(np.percentile(v, 50)),
                "p95": int(np.percentile(v, 95)), "max": int(v.max())}

    informational = ("samples_ok", "no_reference", "unusable_reference", "cropped_reference", "truncated_tar",
                     "shard_download_failed")
    ok = counters["samples_ok"]
    return {"source": source, "shards": len(shards), "samples_ok": ok, "splits": splits,
            "skipped": {k: v for k, v in sorted(counters.items()) if k not in informational},
            "truncated_shards": counters["truncated_tar"], "failed_shards": counters["shard_download_failed"],
            "no_reference": counters["no_reference"], "unusable_reference": counters["unusable_reference"],
            "latent_frames": stats(latent_lens), "text_bytes": stats(text_lens), "reference_frames": stats(ref_lens),
            "fraction_reference_cropped": round(sum(n > config.max_speaker_len for n in ref_lens) / max(ok, 1), 4)}


def inspect_batches(config, batches):
    """Diversity of the first `batches` batches the trainer would read on host 0: per batch, the
    distinct speakers (of the samples whose JSON names one) and the samples of each source."""
    config = dataclasses.replace(config, process_index=0, process_count=1)
    pipeline = Pipeline(config)
    rows = []
    try:
        for b in range(batches):
            batch = next(pipeline)
            named = [s for s in batch["speakers"] if s]
            rows.append({"batch": b, "samples": len(batch["keys"]), "named_speakers": len(named),
                         "distinct_speakers": len(set(named)) if named else None,
                         "sources": dict(Counter(batch["sources"]))})
    finally:
        pipeline.close()
    return rows


def _print_batches(rows):
    for row in rows:
        speakers = (f"{row['distinct_speakers']} distinct speakers (of {row['named_speakers']} named)"
                    if row["distinct_speakers"] is not None else "no speaker named")
        sources = ", ".join(f"{s} {n}" for s, n in row["sources"].items())
        print(f"batch {row['batch']}: {row['samples']} samples, {speakers}; sources: {sources}")
    named = [r["distinct_speakers"] for r in rows if r["distinct_speakers"] is not None]
    if named:
        print(f"mean distinct speakers per batch: {np.mean(named):.1f}")


def _print_report(report):
    print(f"{report['source']}: {report['shards']} shard(s), {report['samples_ok']} usable samples")
    for name, split in report["splits"].items():
        print(f"  {name}: {split['shards']} shard(s), {split['samples_ok']} usable samples")
    skipped = report["skipped"]
    print(f"skipped {sum(skipped.values())}: " + (", ".join(f"{k} {v}" for k, v in skipped.items()) or "none"))
    print(f"truncated shards {report['truncated_shards']}, failed downloads {report['failed_shards']}, "
          f"no reference {report['no_reference']}, unusable reference {report['unusable_reference']}")
    for name, unit in (("latent_frames", "frames"), ("text_bytes", "bytes"), ("reference_frames", "frames")):
        s = report[name]
        if s:
            print(f"{name}: min {s['min']}, mean {s['mean']}, median {s['p50']}, p95 {s['p95']}, max {s['max']} {unit}")
    print(f"references cropped to max_speaker_len: {100 * report['fraction_reference_cropped']:.1f}%")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["make-synthetic"], ["build"]):  # corpus.py's commands, once data.py's
        corpus = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.py")
        os.execv(sys.executable, [sys.executable, corpus, *argv])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for moved in ("make-synthetic", "build"):
        sub.add_parser(moved, help=f"python corpus.py {moved} (see its --help)")
    p = sub.add_parser("inspect", help="read a corpus the way the trainer does; counts and length statistics")
    p.add_argument("source", help="directory, glob, text file of shard paths, or hf://datasets/ORG/REPO[@REV][/GLOB]; "
                   "with --batches also several sources with weights (A:0.7,B:0.3)")
    p.add_argument("--json", action="store_true", help="print one JSON object on one line")
    p.add_argument("--batches", type=int, default=0, metavar="N", help="instead, show the first N training batches "
                   "of host 0: distinct speakers and samples per source in each")
    p.add_argument("--batch_size", type=int, default=32, help="samples per batch for --batches")
    p.add_argument("--seed", type=int, default=0, help="data seed for --batches")
    p.add_argument("--max_latent_len", type=int, default=768, help="frames; longer targets are skipped")
    p.add_argument("--max_text_len", type=int, default=768, help="bytes; longer texts are skipped")
    p.add_argument("--max_speaker_len", type=int, default=768, help="frames; longer references are cropped")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        config = DataConfig(source=args.source, max_latent_len=args.max_latent_len, max_text_len=args.max_text_len,
                            max_speaker_len=args.max_speaker_len, batch_size=args.batch_size, seed=args.seed)
        if args.batches < 0:
            raise DataError("--batches must not be negative")
        if args.batches:
            rows = inspect_batches(config, args.batches)
            print(json.dumps(rows)) if args.json else _print_batches(rows)
        else:
            report = inspect(args.source, config)
            print(json.dumps(report)) if args.json else _print_report(report)
    except DataError as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
