"""Training data for Echo: tar shards (local or on the Hugging Face Hub) -> fixed-shape batches.

Shards hold `{key}.npy` (target latent, (N, 128) float16), `{key}.ref.npy` (speaker reference
latent) and `{key}.json` ({"text": ...}); see `../shared/spec/formats.md`. Every host of a pod
streams its own share of the shards, many at once and shuffled across them, from one source or
several mixed by weight; the stream is deterministic, pinned to the shards it started on,
resumable from a small JSON state, and survives a dirty corpus (bad samples are skipped and
counted, never unpickled). Shards named val-*.tar are the validation split.

    python data.py make-synthetic runs/synth --shards 8 --samples-per-shard 256 --seed 0
    python data.py inspect runs/synth                       # or hf://datasets/ORG/REPO[@REV][/GLOB]
    python data.py inspect hf://datasets/me/corpus --json
    python data.py inspect "runs/a:0.7,runs/b:0.3" --batches 10   # what the trainer's batches hold
    python data.py build manifest.csv shards/ --push_to_hub me/corpus   # recordings + transcripts -> shards

Python:

    pipeline = Pipeline(DataConfig(source="runs/synth", batch_size=32, silence_latent="runs/synth/silence_latent.npy"))
    batch = next(pipeline)          # numpy arrays of fixed shapes, plus keys/sources/speakers lists
    state = pipeline.state()        # JSON-able; Pipeline(config, state=state) continues exactly here
"""

import argparse
import dataclasses
import fnmatch
import functools
import glob
import hashlib
import io
import json
import logging
import math
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

VAL_PREFIX = "val-"  # validation shards (data.py build --val_fraction/--val_speakers): never in the training stream
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


def has_split(source, split):
    """Whether a source holds shards of a split ("val": any val-*.tar)."""
    try:
        list_shards(source, split)
    except DataError:
        return False
    return True


def hub_commit(source):
    """The commit a Hub source's revision points at now (pinning a run to it)."""
    from huggingface_hub import HfApi
    repo_id, revision, _ = parse_hub_source(source)
    try:
        return HfApi().dataset_info(repo_id, revision=revision).sha
    except Exception as e:
        raise DataError(f"cannot resolve the Hub dataset {repo_id}@{revision} ({type(e).__name__}); check the "
                        "repo id, the revision, your token (HF_TOKEN) and the network") from None


def list_shards(source, split="all", revision=None):
    """The sorted shard list of one source: local dir, glob, text file of paths, or Hub dataset
    (at `revision` if given, else the source's own). `split` keeps training shards ("train"),
    validation shards ("val", named val-*.tar) or both ("all")."""
    if source.startswith("hf://"):
        from huggingface_hub import HfApi
        repo_id, own_revision, pattern = parse_hub_source(source)
        revision = revision or own_revision
        try:
            files = HfApi().list_repo_files(repo_id, repo_type="dataset", revision=revision)
        except Exception as e:
            raise DataError(f"cannot list the Hub dataset {repo_id}@{revision} ({type(e).__name__}); check the "
                            "repo id, your token (HF_TOKEN) and the network") from None
        shards = sorted(f for f in files if f.endswith(SHARD_SUFFIX) and fnmatch.fnmatch(f, pattern))
        kind = f"Hub dataset {repo_id}@{revision} (pattern {pattern})"
    elif os.path.isdir(source):
        shards = sorted(glob.glob(os.path.join(source, "**", "*" + SHARD_SUFFIX), recursive=True))
        kind = f"directory {source}"
    elif os.path.isfile(source) and not source.endswith(SHARD_SUFFIX):
        base = os.path.dirname(os.path.abspath(source))
        with open(source) as f:
            shards = [os.path.join(base, line.strip()) for line in f if line.strip() and not line.startswith("#")]
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise DataError(f"shard list {source} names {len(missing)} missing file(s), e.g. {missing[0]}")
        kind = f"shard list {source}"
    else:
        shards = sorted(glob.glob(source))
        kind = f"path or pattern {source}"
    kept = [s for s in shards if in_split(s, split)]
    if not kept:
        what = "validation (val-*) " if split == "val" else ""
        only_val = " (only validation shards, val-*.tar)" if shards and split == "train" else ""
        raise DataError(f"no {what}{SHARD_SUFFIX} shards found in {kind}{only_val}")
    return kept


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
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

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
    process_index: int = None  # default: jax.process_index()
    process_count: int = None  # default: jax.process_count()
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


def _rng(*parts):
    """A numpy Generator from a tuple of ints/strings: the same inputs give the same stream."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def shard_order(shards, seed, source_index, epoch):
    return [shards[i] for i in _rng("shards", seed, source_index, epoch).permutation(len(shards))]


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
            order = _rng("block", c.seed, self.index, s["epoch"], s["block"]).permutation(len(block))
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

        rng = _rng("interleave", self.config.seed, self.index, epoch, block)
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


class Pipeline:
    """Infinite, deterministic, resumable batches for this host. Iterate, or call next().

    With several sources, sample n comes from the source furthest behind its weight's share
    ((n + 1) * weight - samples taken), so the mix holds to within one sample at every point."""

    def __init__(self, config: DataConfig, state: dict = None):
        config.validate()
        if config.process_index is None or config.process_count is None:
            import jax
            config = dataclasses.replace(config, process_index=jax.process_index(),
                                         process_count=jax.process_count())
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
        scratch = config.scratch_dir or tempfile.mkdtemp(prefix=f"echo-shards-{config.process_index}-")
        self.streams, self.pins = [], []
        for i, (source, _) in enumerate(self.sources):
            pin, shards = self._pin(source, saved_pins[i] if saved_pins else None)
            if len(shards) < config.process_count:
                raise DataError(f"{len(shards)} shard(s) in {source} cannot feed {config.process_count} hosts: "
                                "every host needs at least one shard")
            self.pins.append(pin)
            self.streams.append(SourceStream(i, source, shards, config, os.path.join(scratch, str(i)) if
                                             len(self.sources) > 1 else scratch, pin["revision"]))
        fresh = {"epoch": 0, "slots": None, "next": 0, "block": 0, "emitted": 0, "taken": 0}
        self._state = state or {"seed": config.seed, "samples_seen": 0, "sources": [fresh] * len(self.sources)}
        self._delivered_counters = {source: {} for source, _ in self.sources}
        self._queue = queue.Queue(maxsize=config.prefetch_batches)
        self._stop = threading.Event()
        self._last_warning = 0.0
        self._thread = threading.Thread(target=self._produce, daemon=True)
        self._thread.start()

    def _pin(self, source, saved):
        """(pin, shards) of a source. The pin is the Hub commit and its shard names, or local shard
        names and sizes; a resume reads what it pinned, and a changed shard list stops it unless
        accept_data_change."""
        accept = self.config.accept_data_change
        revision = saved["revision"] if saved and saved.get("revision") else None
        if source.startswith("hf://") and revision is None:
            revision = hub_commit(source)
        try:
            shards = list_shards(source, self.config.split, revision)
        except DataError as e:
            if not (saved and saved.get("revision")):
                raise
            if not accept:
                raise DataError(f"{source}: this run is pinned to commit {revision}, which cannot be read now "
                                f"({e}); pass --accept_data_change to continue on today's revision") from None
            revision = hub_commit(source)
            log.warning("%s: pinned commit unreadable; continuing on %s", source, revision)
            shards = list_shards(source, self.config.split, revision)
        pin = dict(shard_fingerprint(source, shards, revision), source=source)
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
                         _rng("crop", c.seed, epoch, os.path.basename(shard), index), stream.counters)
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


# ----------------------------------------------------------------------------
# Tools for people: a learnable synthetic corpus, and a corpus inspector

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
}
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
        text = "".join(rng.choice(list(c.alphabet), size=target)) if c.alphabet else _pseudo_sentence(rng, target)
        if synthetic_held_out(text) == held_out:
            return text


@functools.lru_cache(maxsize=8)
def synthetic_tables(seed):
    """Per-byte vectors, per-speaker offsets and the silence frame of the synthetic corpus (shared:
    callers must not modify them)."""
    rng = _rng("synthetic-tables", seed)
    byte_vectors = rng.normal(0, 1.0, (256, LATENT_SIZE)).astype(np.float32)
    # Centred in blocks of 8 byte values, so that the mean frame of a text over many letters says
    # little about which letters: raw, the two seeds of six whose letters shared the largest mean
    # never aligned their primer, a text-blind model scoring too well there (README, "The demo").
    blocks = byte_vectors.reshape(32, 8, LATENT_SIZE)
    byte_vectors = (blocks - blocks.mean(axis=1, keepdims=True)).reshape(256, LATENT_SIZE)
    speaker_offsets = rng.normal(0, 0.5, (SYNTHETIC_SPEAKERS, LATENT_SIZE)).astype(np.float32)
    silence = rng.normal(0, 0.1, (LATENT_SIZE,)).astype(np.float32)
    return byte_vectors, speaker_offsets, silence


def synthetic_latent(text, speaker, seed, corpus="short"):
    """The ground truth of the synthetic corpus for a (raw) text: (N, 128) float16."""
    byte_vectors, speaker_offsets, _ = synthetic_tables(seed)
    raw = np.frombuffer(text.encode("utf-8"), np.uint8)
    frames = np.repeat(byte_vectors[raw], SYNTHETIC_CORPORA[corpus].frames_per_byte, axis=0) + speaker_offsets[speaker]
    return frames.astype(np.float16)


def synthetic_lengths(corpus="short"):
    """(max_latent_len, max_text_len, max_speaker_len) for a corpus: its canvas, the longest text's
    bytes plus BOS and normalize_text's "[S1] " prefix, and the canvas again for references."""
    c = SYNTHETIC_CORPORA[corpus]
    return c.canvas, c.max_bytes + 1 + len("[S1] "), -(-c.canvas // 4) * 4


def _add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def atomic_write(path, write):
    """write(tmp_path) for a temporary file beside `path`, then rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def make_synthetic(out_dir, shards, samples_per_shard, seed=0, corpus="short", held_out=False):
    """Write a learnable synthetic corpus in the real shard format, and its silence_latent.npy.
    Texts come from the training split, or with held_out=True from the held-out one (disjoint)."""
    if corpus not in SYNTHETIC_CORPORA:
        raise DataError(f"synthetic corpus must be one of {', '.join(SYNTHETIC_CORPORA)}, got {corpus!r}")
    os.makedirs(out_dir, exist_ok=True)
    rng = _rng("synthetic-corpus", seed, corpus, held_out)
    for shard in range(shards):
        path = os.path.join(out_dir, f"shard-{shard:05d}.tar")

        def write(tmp, shard=shard):
            with tarfile.open(tmp, "w") as tar:
                for i in range(samples_per_shard):
                    key = f"{shard:05d}-{i:06d}"
                    speaker = int(rng.integers(SYNTHETIC_SPEAKERS))
                    text = synthetic_text(rng, corpus, held_out)
                    ref_text = synthetic_text(rng, corpus, held_out)
                    _add_member(tar, key + ".npy", _npy_bytes(synthetic_latent(text, speaker, seed, corpus)))
                    _add_member(tar, key + ".ref.npy", _npy_bytes(synthetic_latent(ref_text, speaker, seed, corpus)))
                    meta = {"text": text, "speaker": speaker, "synthetic_seed": seed, "synthetic_corpus": corpus}
                    _add_member(tar, key + ".json", json.dumps(meta).encode())
        atomic_write(path, write)
    # Last: the trainer takes its presence for a complete corpus.
    _, _, silence = synthetic_tables(seed)
    atomic_write(os.path.join(out_dir, "silence_latent.npy"),
                 lambda tmp: _write_bytes(tmp, _npy_bytes(np.tile(silence, (750, 1)).astype(np.float16))))
    return out_dir


def inspect(source, config=None):
    """Read every sample of a source through the trainer's parsing code; counts and distributions."""
    config = config or DataConfig(source=source)
    config.validate()
    counters = Counter()
    fetcher = ShardFetcher(source, tempfile.mkdtemp(prefix="echo-inspect-"), config.retries)
    latent_lens, text_lens, ref_lens = [], [], []
    shards = list_shards(source, "all")
    splits = {split: {"shards": 0, "samples_ok": 0} for split in ("train", "val")}
    from tqdm import tqdm
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


# ----------------------------------------------------------------------------
# Corpus builder: a folder of recordings and transcripts -> training shards (python data.py build)

MANIFEST_COLUMNS = {"audio": ("audio", "audio_path", "path", "file", "wav"),
                    "text": ("text", "transcript", "transcription", "sentence"),
                    "speaker": ("speaker", "speaker_id", "spk")}
SILENT_PEAK = 1e-4  # a clip whose peak stays below this (-80 dBFS) is digital silence (inference.py too)
BUILD_STATE = ".build.json"  # what the directory was built from: a rerun must continue the same build
LATENT_CACHE = ".latents"  # every clip's latent (or why it was skipped) until the build completes


def read_manifest(path):
    """A CSV or JSON Lines manifest -> [row dict or (None, reason)], audio paths made absolute.

    Each row names an audio file, a transcript and a speaker (MANIFEST_COLUMNS lists the accepted
    column names); every other column is kept for the sample's JSON."""
    import csv

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
    import torch
    from tqdm import tqdm

    import dacvae

    def done(i, **info):
        atomic_write(os.path.join(cache, f"{i:08d}.json"),
                     lambda tmp: _write_bytes(tmp, json.dumps(info).encode()))

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
                elif float(np.max(np.abs(audio))) < SILENT_PEAK:
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
                        atomic_write(os.path.join(cache, f"{i:08d}.npy"),
                                     lambda tmp: _write_bytes(tmp, _npy_bytes(latent)))
                        done(i, duration=round(len(a) / dacvae.SAMPLE_RATE, 4))
                    encoded_seconds += len(a) / dacvae.SAMPLE_RATE
                bar.update(len(group))
                bar.set_postfix(audio_s_per_s=f"{encoded_seconds / (time.perf_counter() - start):.1f}")
    bar.close()


def _write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def split_clips(rows, usable, seed, val_fraction=0.01, val_min=8, val_speakers=0):
    """Shuffle the usable clips (seeded) and hold some out: (training clips, validation clips).

    --val_speakers N holds out every clip of N speakers (unseen voices); otherwise a fraction of
    the clips, at least val_min of them, at most a quarter of the corpus."""
    order = [usable[j] for j in _rng("build-order", seed).permutation(len(usable))]
    if val_speakers:
        speakers = sorted({rows[i]["speaker"] for i in usable})
        if val_speakers >= len(speakers):
            raise DataError(f"--val_speakers {val_speakers} leaves no speaker for training: the corpus has "
                            f"{len(speakers)}")
        held = {speakers[j] for j in _rng("val-speakers", seed).permutation(len(speakers))[:val_speakers]}
        return [i for i in order if rows[i]["speaker"] not in held], [i for i in order if rows[i]["speaker"] in held]
    count = min(max(math.ceil(val_fraction * len(order)), val_min), len(order) // 4) if val_fraction > 0 else 0
    return order[count:], order[:count]


def build_corpus(manifest, out_dir, dacvae_weights=None, shard_size=1000, max_seconds=30.7, batch_size=8, seed=0,
                 progress=True, val_fraction=0.01, val_min=8, val_speakers=0):
    """Encode a manifest's clips with DACVAE and write shuffled training shards (shard-XXXXX.tar) and
    validation shards (val-XXXXX.tar), resumably. Returns the report (also OUT_DIR/manifest.json)."""
    import dacvae

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
        atomic_write(state_path, lambda tmp: _write_bytes(tmp, json.dumps(plan).encode()))
    report_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(report_path):
        with open(report_path) as f:
            log.info("%s is complete already", out_dir)
            return json.load(f)

    codec = dacvae.DACVAE.load(dacvae_weights, flag="--dacvae_weights")
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
    in_train = set(train)
    by_speaker = {}
    for i in usable:
        by_speaker.setdefault(rows[i]["speaker"], []).append(i)

    def reference_of(i):
        # A training clip's reference is another training clip: no validation audio is ever trained on.
        others = [j for j in by_speaker[rows[i]["speaker"]] if j != i and (j in in_train or i not in in_train)]
        return others[int(_rng("reference", seed, i).integers(len(others)))] if others else None

    latent_path = lambda i: os.path.join(cache, f"{i:08d}.npy")
    written, no_reference = {"train": [], "val": []}, 0
    for split, clips, prefix in (("train", train, "shard-"), ("val", val, VAL_PREFIX)):
        for s in range(-(-len(clips) // shard_size)):
            members = clips[s * shard_size:(s + 1) * shard_size]
            no_reference += sum(reference_of(i) is None for i in members)
            name = f"{prefix}{s:05d}{SHARD_SUFFIX}"
            written[split].append({"name": name, "samples": len(members),
                                   "seconds": round(sum(info[i]["duration"] for i in members), 3)})
            if os.path.exists(os.path.join(out_dir, name)):
                continue  # written whole by an earlier run

            def write(tmp, members=members):
                with tarfile.open(tmp, "w") as tar:
                    for i in members:
                        row, key = rows[i], f"{i:08d}"
                        meta = {**row["extra"], "text": row["text"], "duration": info[i]["duration"],
                                "speaker": row["speaker"], "source": row["audio"]}
                        _add_member(tar, key + ".json", json.dumps(meta, ensure_ascii=False).encode())
                        with open(latent_path(i), "rb") as f:
                            _add_member(tar, key + ".npy", f.read())
                        ref = reference_of(i)
                        if ref is not None:
                            with open(latent_path(ref), "rb") as f:
                                _add_member(tar, key + ".ref.npy", f.read())
            atomic_write(os.path.join(out_dir, name), write)

    silence = dacvae.silence_latent(codec, 30.0)
    atomic_write(os.path.join(out_dir, "silence_latent.npy"), lambda tmp: _write_bytes(tmp, _npy_bytes(silence)))
    shards, val_shards = written["train"], written["val"]
    report = {"shards": shards, "samples": sum(s["samples"] for s in shards),
              "seconds": round(sum(s["seconds"] for s in shards), 3), "clips": len(rows),
              "skipped": dict(sorted(skipped.items())), "speakers": len(by_speaker),
              "val_shards": val_shards, "val_samples": len(val),
              "val_seconds": round(sum(s["seconds"] for s in val_shards), 3),
              "val_speakers": len({rows[i]["speaker"] for i in val}),
              "unseen_val_speakers": len({rows[i]["speaker"] for i in val} - {rows[i]["speaker"] for i in train}),
              "no_reference": no_reference, "codec": codec.kwargs, "max_seconds": max_seconds}
    atomic_write(report_path, lambda tmp: _write_bytes(tmp, json.dumps(report, indent=1).encode()))
    shutil.rmtree(cache)
    return report


def push_to_hub(out_dir, repo_id, shards_per_commit=20):
    """Upload a built corpus to a Hub dataset repo: files already there (same size) are skipped, the
    shards go up in commits of a few, the manifest last, so a rerun continues an interrupted push."""
    from huggingface_hub import CommitOperationAdd, HfApi

    report_path = os.path.join(out_dir, "manifest.json")
    if not os.path.exists(report_path):
        raise DataError(f"{out_dir} is not a complete build (no manifest.json); run data.py build first")
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
                   "words: 10-40-byte pseudo-sentences over ~40 characters")
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
            import dacvae
            try:
                report = build_corpus(args.manifest, args.out_dir, args.dacvae_weights, args.shard_size,
                                      args.max_seconds, args.batch_size, args.seed, val_fraction=args.val_fraction,
                                      val_min=args.val_min, val_speakers=args.val_speakers)
            except dacvae.DACVAEError as e:
                raise DataError(str(e)) from None
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
        else:
            config = DataConfig(source=args.source, max_latent_len=args.max_latent_len,
                                max_text_len=args.max_text_len, max_speaker_len=args.max_speaker_len,
                                batch_size=args.batch_size, seed=args.seed)
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
