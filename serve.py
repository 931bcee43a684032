"""Echo as an OpenAI-compatible speech server.

    python serve.py --checkpoint CKPT [--dacvae_weights PATH] [--host 127.0.0.1] [--port 8000]

POST /v1/audio/speech speaks `input` with `voice` (a stored voice, or `random`: a voice drawn from
the request's seed) and answers audio in `response_format` (mp3, the default as OpenAI's, opus, wav,
flac, or pcm: 16-bit little-endian mono at 24 kHz); Echo's sampler knobs go as extra JSON fields
under inference.py's flag names (seed, steps, cfg_scale, ..., duration). GET/POST
/v1/audio/voices and DELETE /v1/audio/voices/NAME keep voices (a recording's speaker latent,
encoded once) in --voices_dir. /health answers 200 once every program is compiled, /metrics in
Prometheus' format.

One scheduler thread owns the model and samples with inference.py's sampler, one step at a time
over a batch of rows: each row is one sentence of one request at its own step of its own
schedule, so a request joins at the next step boundary and leaves when its last step is done
while the others go on. The step is compiled at start for every batch size up to --max_batch (and
every canvas of --canvas_seconds), so no request waits for a compilation. A request's sentences
are sampled one after another, each decoded and sent as soon as it is done (a blockwise checkpoint's,
block by block: --blocks): pcm, wav and opus stream; flac and mp3 need the whole audio before their
first byte.

The HTTP side is Starlette on uvicorn: FastAPI's additions (pydantic models, generated docs) would
answer a bad field with its own 422 shape, while every error here must take OpenAI's shape, so each
field is checked by hand and FastAPI's foundation is all that is used.
"""
import argparse
import asyncio
import base64
import collections
import concurrent.futures
import dataclasses
import io
import json
import logging
import math
import os
import queue
import re
import signal
import socket
import struct
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import prometheus_client
import soundfile
import soxr
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import dacvae
import inference

log = logging.getLogger("serve")

SAMPLE_RATE = inference.SAMPLE_RATE
PCM_RATE = 24000  # OpenAI's pcm: 16-bit little-endian mono at 24 kHz
MEDIA_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "wav": "audio/wav", "flac": "audio/flac",
               "pcm": "audio/pcm"}
STREAMED_FORMATS = ("pcm", "wav", "opus")  # their bytes can be sent before the audio is whole
RANDOM_VOICE = "random"
VOICE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Echo's knobs a request may set, with their JSON types; the sampler's come from inference.py.
KNOB_FIELDS = {**{name: ("integer" if name in ("steps", "speaker_kv_max_layers") else "number")
                  for name in inference.SAMPLER_DEFAULTS},
               "seed": "integer", "duration": "number", "trim_tolerance": "number", "sampler_preset": "string"}
OPENAI_FIELDS = ("model", "input", "voice", "response_format", "speed", "stream_format", "instructions")
DEFAULT_SEED = 42
DEFAULT_DURATION = 15.0  # as inference.py's --duration
DEFAULT_BLOCKS = "24,48,rest"  # a blockwise checkpoint's first audio after 24 frames (0.96 s) of sampling
# The codec's output near a cut depends on the frames after it: a block's last frames are sent with
# the next block.
BLOCK_CONTEXT_FRAMES = 8


class ServeError(Exception):
    """A request the server refuses: HTTP `status` with OpenAI's error body."""

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self):
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ----------------------------------------------------------------------------
# Audio out

def wav_stream_header(sample_rate=SAMPLE_RATE):
    """A 16-bit mono WAV header whose sizes say "until the end", as streamed WAV is sent."""
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", 0xFFFFFFFF))


def pcm16(audio):
    return (np.clip(audio, -1, 1) * 32767).round().astype("<i2").tobytes()


class AudioEncoder:
    """48 kHz float audio handed over piece by piece -> the bytes of one `fmt` response, each as early
    as the format allows."""

    def __init__(self, fmt):
        self.fmt = fmt
        self.pending = []  # flac and mp3: the whole audio, written at the end
        if fmt == "pcm":
            self.resampler = soxr.ResampleStream(SAMPLE_RATE, PCM_RATE, 1, dtype="float32")
        elif fmt == "opus":
            self.buffer, self.sent = io.BytesIO(), 0
            self.file = soundfile.SoundFile(self.buffer, "w", SAMPLE_RATE, 1, format="OGG", subtype="OPUS")

    def start(self):
        return wav_stream_header() if self.fmt == "wav" else b""

    def feed(self, audio):
        audio = np.clip(audio, -1, 1)  # as every format holds it, before pcm's resampling
        if self.fmt == "pcm":
            return pcm16(self.resampler.resample_chunk(audio))
        if self.fmt == "wav":
            return pcm16(audio)
        if self.fmt == "opus":
            self.file.write(audio)
            return self._new_bytes()
        self.pending.append(audio)
        return b""

    def finish(self):
        if self.fmt == "pcm":
            return pcm16(self.resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        if self.fmt == "wav":
            return b""
        if self.fmt == "opus":
            self.file.close()
            return self._new_bytes()
        out = io.BytesIO()
        audio = np.concatenate(self.pending) if self.pending else np.zeros(0, np.float32)
        subtype = "PCM_16" if self.fmt == "flac" else "MPEG_LAYER_III"
        soundfile.write(out, np.clip(audio, -1, 1), SAMPLE_RATE, format=self.fmt.upper(), subtype=subtype)
        return out.getvalue()

    def _new_bytes(self):
        data = self.buffer.getvalue()
        new, self.sent = data[self.sent:], len(data)
        return new


class CrossfadeJoiner:
    """inference.crossfade_join, streamed: each segment's audio is given out as soon as no later
    crossfade can change it, and all of it together equals crossfade_join(segments)."""

    def __init__(self, sample_rate=SAMPLE_RATE, seconds=inference.CROSSFADE_SECONDS):
        self.fade = int(seconds * sample_rate)
        self.held = np.zeros(0, np.float32)  # the tail the next crossfade may still change
        self.total = 0  # samples joined so far, held ones included

    def add(self, segment):
        joined = segment
        if self.total:
            n = min(self.fade, self.total, len(segment))
            ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
            keep = len(self.held) - n
            joined = np.concatenate([self.held[:keep], self.held[keep:] * (1 - ramp) + segment[:n] * ramp,
                                     segment[n:]])
        return self._release(joined)

    def extend(self, piece):
        """More of the segment added last (its next block): joined without a crossfade."""
        return self._release(np.concatenate([self.held, piece]))

    def _release(self, joined):
        """`joined` (the held tail and what follows it) out, but for the tail a crossfade may change."""
        self.total += len(joined) - len(self.held)
        split = max(0, len(joined) - self.fade)
        out, self.held = joined[:split], joined[split:]
        return out

    def finish(self):
        out, self.held = self.held, np.zeros(0, np.float32)
        return out


# ----------------------------------------------------------------------------
# Voices

class Voices:
    """Named voices: each a speaker latent (frames, latent_size) float16 in `directory`/NAME.npy,
    encoded once from an uploaded recording; kept across restarts."""

    def __init__(self, directory, max_speaker_len, latent_size):
        self.directory, self.max_speaker_len, self.latent_size = directory, max_speaker_len, latent_size
        os.makedirs(directory, exist_ok=True)
        self.lock = threading.Lock()

    def path(self, name):
        return os.path.join(self.directory, name + ".npy")

    def names(self):
        return sorted(f[:-4] for f in os.listdir(self.directory) if f.endswith(".npy") and VOICE_NAME.fullmatch(f[:-4]))

    def describe(self):
        voices = [{"name": RANDOM_VOICE, "seconds": 0.0}]
        for name in self.names():
            frames = np.load(self.path(name), mmap_mode="r").shape[0]
            voices.append({"name": name, "seconds": round(frames / inference.FRAMES_PER_SECOND, 2)})
        return voices

    def reference(self, name):
        """(latent, mask) of voice `name`, as the sampler takes a reference; None for the random voice."""
        if name == RANDOM_VOICE:
            return None
        if not (isinstance(name, str) and VOICE_NAME.fullmatch(name) and os.path.exists(self.path(name))):
            known = ", ".join([RANDOM_VOICE] + self.names())
            raise ServeError(400, f"unknown voice {str(name)[:80]!r}; this server has: {known} (add one with "
                             "POST /v1/audio/voices)", "voice", "voice_not_found")
        return inference.reference_from_latent(self.path(name), self.max_speaker_len, self.latent_size)

    def add(self, name, recording, codec):
        """Encode `recording` (a file path) as voice `name`; returns its seconds of reference."""
        try:
            encoded = inference.encode_reference(recording, codec, self.max_speaker_len)
        except inference.InferenceError as e:
            raise ServeError(400, f"the uploaded file is not audio this server reads ({e})", "file",
                             "invalid_audio") from None
        if encoded is None:
            raise ServeError(400, f"the uploaded recording is shorter than {inference.MIN_REFERENCE_SECONDS} s or "
                             "digital silence: upload a few seconds of speech", "file", "invalid_audio")
        latent, mask = encoded
        frames = int(mask.sum())
        with self.lock:
            try:
                inference.save_latent(self.path(name), latent[:frames])
            except inference.InferenceError as e:
                raise ServeError(500, f"the voice could not be stored: {e}", "name", "storage_error") from None
        return round(frames / inference.FRAMES_PER_SECOND, 2)

    def remove(self, name):
        if not (VOICE_NAME.fullmatch(name) and os.path.exists(self.path(name))):
            raise ServeError(404, f"no voice named {name[:80]!r}", "name", "voice_not_found")
        with self.lock:
            os.remove(self.path(name))


# ----------------------------------------------------------------------------
# Requests

@dataclasses.dataclass
class Speech:
    """One /v1/audio/speech request, checked."""
    pieces: list  # [(text_ids, text_mask)]: one generation per sentence, in order
    reference: tuple  # (speaker latent, mask) or None: the random voice
    knobs: dict  # the sampler's, all of inference.SAMPLER_DEFAULTS
    seed: int
    frames: int  # the most frames of speech per sentence (the request's duration)
    trim_tolerance: float
    fmt: str
    sse: bool
    chars: int


def _typed(name, value):
    """A knob field's value if its JSON type is right, else ServeError."""
    kind = KNOB_FIELDS[name]
    ok = {"integer": isinstance(value, int) and not isinstance(value, bool),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool),
          "string": isinstance(value, str)}[kind]
    if not ok:
        raise ServeError(400, f"{name} must be a{'n' if kind == 'integer' else ''} {kind}, got {json.dumps(value)}",
                         name, "invalid_type")
    return value


def parse_speech(body, settings, voices, loaded, presets):
    """The JSON body of POST /v1/audio/speech -> Speech; every refusal is a ServeError naming the field."""
    if not isinstance(body, dict):
        raise ServeError(400, "the body must be a JSON object with model, input and voice", None, "invalid_json")
    unknown = sorted(set(body) - set(OPENAI_FIELDS) - set(KNOB_FIELDS))
    if unknown:
        raise ServeError(400, f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; this server "
                         f"reads {', '.join(OPENAI_FIELDS)} and Echo's {', '.join(KNOB_FIELDS)}", unknown[0],
                         "unknown_parameter")
    if body.get("model") != settings.model_name:
        raise ServeError(404, f"the model {json.dumps(body.get('model'))} is not served here; this server serves "
                         f"{settings.model_name!r}", "model", "model_not_found")
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise ServeError(400, "input must be a non-empty string: the words to speak", "input", "invalid_input")
    if len(text) > settings.max_input_chars:
        raise ServeError(400, f"input is {len(text)} characters, over this server's limit of "
                         f"{settings.max_input_chars}: split it into several requests", "input", "input_too_long")
    if "voice" not in body:
        raise ServeError(400, f"voice is required: {RANDOM_VOICE!r} or a voice of GET /v1/audio/voices", "voice",
                         "missing_voice")
    reference = voices.reference(body["voice"])
    fmt = body.get("response_format", "mp3")
    if fmt not in MEDIA_TYPES:
        raise ServeError(400, f"response_format {json.dumps(fmt)} is not served; choose one of "
                         f"{', '.join(MEDIA_TYPES)}", "response_format", "unsupported_format")
    if body.get("speed", 1.0) != 1.0:
        raise ServeError(400, f"speed {json.dumps(body['speed'])} is not supported: Echo has no control of its "
                         "speaking rate; leave speed at 1.0", "speed", "unsupported_value")
    if body.get("instructions"):
        raise ServeError(400, "instructions are not supported: Echo takes its style from the voice's recording",
                         "instructions", "unsupported_value")
    stream_format = body.get("stream_format", "audio")
    if stream_format not in ("audio", "sse"):
        raise ServeError(400, f"stream_format {json.dumps(stream_format)} is not served; choose audio or sse",
                         "stream_format", "unsupported_value")
    given = {name: _typed(name, body[name]) for name in KNOB_FIELDS if body.get(name) is not None}
    field = lambda name: name
    try:
        knobs = inference.resolve_knobs(given.get("sampler_preset"), presets,
                                        {k: v for k, v in given.items() if k in inference.SAMPLER_DEFAULTS}, field)
        duration = given.get("duration", DEFAULT_DURATION)
        trim_tolerance = given.get("trim_tolerance", 0.5)
        inference.check_knobs(knobs, duration, trim_tolerance, field)
        pieces = [piece for sentence in inference.sentences(text)
                  for piece in inference.prepare_text(sentence, loaded.max_text_len)]
    except inference.InferenceError as e:
        param = next((name for name in KNOB_FIELDS if str(e).startswith(name)), None)
        raise ServeError(400, str(e), param or "input", "invalid_value") from None
    if knobs["steps"] > settings.max_steps:
        raise ServeError(400, f"steps {knobs['steps']} is over this server's limit of {settings.max_steps}",
                         "steps", "invalid_value")
    if knobs["speaker_kv_max_layers"] is not None and knobs["speaker_kv_max_layers"] > loaded.config.num_layers:
        raise ServeError(400, f"speaker_kv_max_layers {knobs['speaker_kv_max_layers']} exceeds the model's "
                         f"{loaded.config.num_layers} decoder layers", "speaker_kv_max_layers", "invalid_value")
    seed = given.get("seed", DEFAULT_SEED)
    if not 0 <= seed < 2 ** 31:
        raise ServeError(400, f"seed must be in [0, 2^31), got {seed}", "seed", "invalid_value")
    frames = inference.frames_for(duration, loaded.max_latent_len)
    return Speech(pieces, reference, knobs, seed, frames, trim_tolerance, fmt, stream_format == "sse", len(text))


# ----------------------------------------------------------------------------
# The scheduler: continuous batching over the sampler's step

@dataclasses.dataclass(eq=False)
class Row:
    """One generation (a sentence of a request) in the scheduler."""
    inputs: tuple  # (text_ids, text_mask, speaker_latent, speaker_mask), one row each
    mode: str  # the guidance mode of its knobs
    schedule: object  # inference.RowSchedule
    seed: int
    truncation: float
    canvas: int
    deliver: object  # called once from the scheduler's thread: the (canvas, latent_size) latent, or a ServeError
    cancelled: threading.Event
    start: int = 0  # the position of its first frame in its sentence (a block of a blockwise checkpoint)
    prefix: np.ndarray = None  # blockwise: (1, prefix frames, latent_size), its sentence's frames before start
    cond: dict = None  # its keys and values, encoded when it joins
    forced_cond: dict = None  # the same with its speaker force applied, where it has one
    x: object = None  # (1, canvas, latent_size) until it joins a batch
    k: int = 0  # steps done


def batch_sizes(max_batch):
    """The batch sizes compiled: powers of two below max_batch, and max_batch."""
    return sorted({2 ** i for i in range(max_batch.bit_length()) if 2 ** i < max_batch} | {max_batch})


class Lane:
    """The rows of one canvas length and one guidance mode (joint: 2 passes per row, independent: 3),
    stepped together as one batch (padded to a compiled size)."""

    def __init__(self, canvas, mode):
        self.canvas, self.mode = canvas, mode
        self.rows = []
        self.members = []  # the rows that x and cond below hold, in order
        self.batch = []  # the same, padded to a compiled size (padding repeats the first row)
        self.forced = []  # per member: whether its conditions in cond are the speaker-forced ones
        self.x = self.cond = self.step = None


class Scheduler:
    """Owns the model: compiles every program at start (`warm`), then `run`s forever in its own
    thread, taking one step over each lane's batch per turn. Rows join from `submit` at the next
    step boundary and leave when their last step is done (or their request is cancelled)."""

    def __init__(self, loaded, canvases, max_batch, metrics, prefix_frames=0):
        self.loaded, self.canvases, self.max_batch, self.metrics = loaded, sorted(canvases), max_batch, metrics
        self.prefix_frames = prefix_frames  # blockwise: every row's conditions hold a prefix this long
        self.sizes = batch_sizes(max_batch)
        self.lanes = {(canvas, mode): Lane(canvas, mode) for canvas in self.canvases
                      for mode in inference.GUIDANCE_PASSES}
        self.waiting = collections.deque()
        self.wakeup = threading.Condition()
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.encoders = {}

    def canvas_for(self, frames):
        """The smallest compiled canvas that holds `frames`, else the largest."""
        return next((c for c in self.canvases if c >= frames), self.canvases[-1])

    def warm(self):
        """Compile and run every program once, so that no request waits for a compilation."""
        loaded = self.loaded
        silent = (np.zeros((1, loaded.max_text_len), np.int32), np.zeros((1, loaded.max_text_len), np.int32),
                  np.zeros((1, loaded.max_speaker_len, loaded.config.latent_size), np.float32),
                  np.zeros((1, loaded.max_speaker_len), np.int32))
        inputs = tuple(jnp.asarray(a) for a in silent)
        for mode in inference.GUIDANCE_PASSES:
            self.encoders[mode] = inference.compiled_encode(loaded.module, mode, loaded.params, inputs)
            cond = self.encoders[mode](loaded.params, *inputs)
            if self.prefix_frames:
                cond = self.with_prefix(cond, np.zeros((1, self.prefix_frames, loaded.config.latent_size),
                                                       np.float32), 0)
            knobs = dict(inference.SAMPLER_DEFAULTS, cfg_text=3.0 if mode == "independent" else None)
            _, schedule = inference.RowSchedule.from_knobs(knobs, loaded.config.num_layers)
            for canvas in self.canvases:
                for size in self.sizes:
                    started = time.perf_counter()
                    step = self.compiled_step(size, canvas, cond)
                    x = jnp.zeros((size, canvas, loaded.config.latent_size), jnp.float32)
                    jax.block_until_ready(step(loaded.params, x, stack_conds([cond] * size),
                                               *inference.step_inputs([schedule] * size, [0] * size),
                                               np.zeros(size, np.int32)))
                    log.info("compiled the %s-guidance step for %d rows of %d frames in %.1f s", mode, size, canvas,
                             time.perf_counter() - started)
        self.ready.set()

    def with_prefix(self, cond, prefix, start):
        return inference.join_prefix(self.loaded.module, self.loaded.params, cond, prefix, np.int32(start))

    def compiled_step(self, size, canvas, cond):
        return inference.compiled_step(self.loaded.module, self.loaded.params, size, canvas,
                                       stack_conds([cond] * size, shapes_only=True))

    def submit(self, row):
        with self.wakeup:
            self.waiting.append(row)
            self.wakeup.notify()

    def busy_rows(self):
        return sum(len(lane.rows) for lane in self.lanes.values())

    def stop(self):
        with self.wakeup:
            self.stopping.set()
            self.wakeup.notify()

    def run(self):
        while not self.stopping.is_set():
            with self.wakeup:
                while not self.waiting and not self.busy_rows() and not self.stopping.is_set():
                    self.wakeup.wait()
                arrivals = []
                while self.waiting and self.busy_rows() + len(arrivals) < self.max_batch * len(self.canvases):
                    row = self.waiting.popleft()
                    if row.cancelled.is_set():
                        row.deliver(ServeError(499, "the request was cancelled", None, "cancelled"))
                    else:
                        arrivals.append(row)
            deferred = [row for row in arrivals if not self.join(row)]
            with self.wakeup:
                self.waiting.extendleft(reversed(deferred))
                self.metrics["queue"].set(len(self.waiting))
            for lane in self.lanes.values():
                for row in lane.rows:
                    if row.cancelled.is_set():
                        row.deliver(ServeError(499, "the request was cancelled", None, "cancelled"))
                lane.rows = [row for row in lane.rows if not row.cancelled.is_set()]
                if lane.rows:
                    self.advance(lane)
            self.metrics["rows"].set(self.busy_rows())

    def join(self, row):
        """Encode the row's conditions and draw its noise; it steps from the next turn on. Returns
        False where its lane is full (it waits for a later turn)."""
        loaded, lane = self.loaded, self.lanes[row.canvas, row.mode]
        if len(lane.rows) >= self.max_batch:
            return False
        try:
            inputs = tuple(jnp.asarray(a) for a in row.inputs)
            row.cond = self.encoders[row.mode](loaded.params, *inputs)
            if row.schedule.force is not None:
                row.forced_cond = row.schedule.forced_cond(row.cond, loaded.max_text_len)
            if row.prefix is not None:
                row.cond = self.with_prefix(row.cond, row.prefix, row.start)
                if row.forced_cond is not None:
                    row.forced_cond = self.with_prefix(row.forced_cond, row.prefix, row.start)
            # As inference.sample_blocks draws it (a block: the last frames of a canvas that ends with it).
            row.x = inference.initial_noise(row.seed, 1, row.start + row.canvas, loaded.config.latent_size,
                                            row.truncation)[:, row.start:]
            lane.rows.append(row)
        except Exception as e:  # one request's failure never stops the others
            log.exception("a request could not start")
            row.deliver(ServeError(500, f"the request could not start ({type(e).__name__})"))
        return True

    def advance(self, lane):
        """One step over the lane's rows; the rows it finishes are delivered and leave."""
        loaded = self.loaded
        try:
            forced = [row.schedule.forced(row.k) for row in lane.rows]
            if lane.rows != lane.members or forced != lane.forced:
                self.regroup(lane, forced)
            lane.x = lane.step(loaded.params, lane.x, lane.cond,
                               *inference.step_inputs([r.schedule for r in lane.batch], [r.k for r in lane.batch]),
                               np.asarray([r.start for r in lane.batch], np.int32))
            self.metrics["step_rows"].observe(len(lane.rows))
            for row in lane.rows:
                row.k += 1
            for i, row in enumerate(lane.rows):
                if row.k == row.schedule.steps:
                    latent = np.asarray(lane.x[i])
                    if np.isfinite(latent).all():
                        row.deliver(latent)
                    else:
                        row.deliver(ServeError(500, "the model produced non-finite values for this request; "
                                               "another seed may work", None, "non_finite_output"))
            lane.rows = [row for row in lane.rows if row.k < row.schedule.steps]
        except Exception as e:
            log.exception("a step over %d rows failed", len(lane.rows))
            for row in lane.rows:
                row.deliver(ServeError(500, f"sampling failed ({type(e).__name__})"))
            lane.rows, lane.members, lane.batch, lane.forced = [], [], [], []

    def size_for(self, rows):
        return next(size for size in self.sizes if size >= rows)

    def regroup(self, lane, forced):
        """Rebuild the lane's batch for its current rows, each with its conditions as its next step
        reads them (`forced`: the speaker force's, per row); rows that stay keep their place in x."""
        place = {id(row): i for i, row in enumerate(lane.members)}
        rows = lane.rows
        size = self.size_for(len(rows))
        xs = [lane.x[place[id(row)]][None] if id(row) in place else row.x for row in rows]
        for row in rows:
            row.x = None
        batch = rows + [rows[0]] * (size - len(rows))
        lane.x = jnp.concatenate(xs + [xs[0]] * (size - len(rows)))
        conds = [row.forced_cond if force else row.cond for row, force in zip(rows, forced)]
        lane.cond = stack_conds(conds + [conds[0]] * (size - len(rows)))
        lane.step = self.compiled_step(size, lane.canvas, rows[0].cond)
        lane.members, lane.batch, lane.forced = list(rows), batch, forced


def stack_conds(conds, shapes_only=False):
    """One-row conditions (k, v: (layers, passes, ...), mask: (passes, length)) -> the batch's, rows of
    each pass together (as the step reads them); with shapes_only, their shapes."""
    rows = len(conds)
    if shapes_only:
        grow = lambda a, axis: jax.ShapeDtypeStruct(a.shape[:axis] + (a.shape[axis] * rows,) + a.shape[axis + 1:],
                                                    a.dtype)
        return {"k": grow(conds[0]["k"], 1), "v": grow(conds[0]["v"], 1), "mask": grow(conds[0]["mask"], 0)}
    stack = lambda key, axis: jnp.stack([c[key] for c in conds], axis=axis + 1).reshape(
        conds[0][key].shape[:axis] + (-1,) + conds[0][key].shape[axis + 1:])
    return {"k": stack("k", 1), "v": stack("v", 1), "mask": stack("mask", 0)}


# ----------------------------------------------------------------------------
# The HTTP side

class BatchDecoder:
    """The codec in a thread of its own. Latents that wait together are decoded as one batch, those of
    one length each (no padding: each gets the audio it would get alone, to float rounding), which
    spreads the codec's fixed cost per call over the requests served together."""

    def __init__(self, codec):
        self.codec = codec
        self.jobs = queue.Queue()
        threading.Thread(target=self.run, name="decode", daemon=True).start()

    def submit(self, latent):
        """A (frames, latent_size) latent -> a concurrent.futures.Future of its waveform."""
        future = concurrent.futures.Future()
        self.jobs.put((latent, future))
        return future

    def run(self):
        import torch  # the codec's
        while True:
            jobs = [self.jobs.get()]
            while not self.jobs.empty():
                jobs.append(self.jobs.get_nowait())
            by_length = collections.defaultdict(list)
            for latent, future in jobs:
                if future.set_running_or_notify_cancel():  # False: its request is gone
                    by_length[len(latent)].append((latent, future))
            for group in by_length.values():
                try:
                    batch = torch.from_numpy(np.stack([latent.T for latent, _ in group]).astype(np.float32))
                    waves = self.codec.decode(batch, progress=False)[:, 0].numpy()
                except Exception as e:  # one batch's failure fails its requests alone
                    log.exception("decoding %d latents failed", len(group))
                    waves = [ServeError(500, f"decoding failed ({type(e).__name__})")] * len(group)
                for (_, future), wave in zip(group, waves):
                    if isinstance(wave, Exception):
                        future.set_exception(wave)
                    else:
                        future.set_result(wave)


def make_metrics():
    """The server's Prometheus metrics, in a registry of their own."""
    registry = prometheus_client.CollectorRegistry()
    seconds = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 40, 80)
    return {"registry": registry,
            "requests": prometheus_client.Counter("echo_requests", "Speech requests answered, by HTTP status",
                                                  ["status"], registry=registry),
            "first_audio": prometheus_client.Histogram("echo_time_to_first_audio_seconds", "From a speech request's "
                                                       "arrival to its first audio byte", buckets=seconds,
                                                       registry=registry),
            "latency": prometheus_client.Histogram("echo_request_seconds", "From a speech request's arrival to its "
                                                   "last byte", buckets=seconds, registry=registry),
            "queue": prometheus_client.Gauge("echo_queue_depth", "Generations waiting for a row", registry=registry),
            "rows": prometheus_client.Gauge("echo_rows_busy", "Rows of the batch in use", registry=registry),
            "step_rows": prometheus_client.Histogram("echo_step_rows", "Rows sampled by one step", registry=registry,
                                                     buckets=(1, 2, 4, 8, 16, 32, 64)),
            "audio": prometheus_client.Counter("echo_audio_seconds", "Seconds of audio sent", registry=registry)}


class Server:
    """What the routes share: the settings, model, codec, voices, scheduler and metrics."""

    def __init__(self, settings, loaded, codec, presets):
        self.settings, self.loaded, self.codec, self.presets = settings, loaded, codec, presets
        self.silence = loaded.silence_frame if loaded.silence_frame is not None else \
            inference.codec_silence_frame(codec)
        self.voices = Voices(settings.voices_dir, loaded.max_speaker_len, loaded.config.latent_size)
        self.metrics = make_metrics()
        config = loaded.config
        # A blockwise checkpoint streams each sentence block by block; every block's prefix holds
        # the sentence's frames so far, in a canvas as long as the trained one.
        self.blocks = inference.block_frames(settings.blocks or DEFAULT_BLOCKS, None) if config.blockwise else []
        patch = config.encoder_patch_size
        prefix_frames = -(-loaded.max_latent_len // patch) * patch if config.blockwise else 0
        canvases = {size for seconds in settings.canvas_seconds
                    for size in self.block_plan(inference.frames_for(seconds, loaded.max_latent_len))}
        self.scheduler = Scheduler(loaded, canvases, settings.max_batch, self.metrics, prefix_frames)
        self.decoder = BatchDecoder(codec)
        self.voice_work = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="voices")
        self.active = 0  # speech requests being answered

    def start(self):
        """Compile in the background (/health answers 503 until then), then schedule."""
        def compile_then_run():
            try:
                self.scheduler.warm()
            except Exception as e:  # nothing can be served: end the process as SIGTERM would
                log.error("the programs could not be compiled (%s: %s); stopping", type(e).__name__, e)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            log.info("ready: %s on http://%s:%d", self.settings.model_name, self.settings.host, self.settings.port)
            self.scheduler.run()
        threading.Thread(target=compile_then_run, name="scheduler", daemon=True).start()

    def check_key(self, request):
        key = self.settings.api_key
        if key and request.headers.get("authorization", "") != f"Bearer {key}":
            raise ServeError(401, "a valid API key is required: send Authorization: Bearer KEY", None,
                             "invalid_api_key")

    def block_plan(self, frames):
        """A sentence's blocks: the --blocks sizes that leave a patch or more after them, then the rest
        (one block, the whole sentence, for a checkpoint without the latent-prefix path)."""
        plan, patch = [], self.loaded.config.encoder_patch_size
        for size in self.blocks:
            if sum(plan) + size + patch > frames:
                break
            plan.append(size)
        return plan + [frames - sum(plan)]

    async def decode(self, latent, speech, emitted=0, last=True):
        """A sentence's latent so far -> the 48 kHz audio of its frames from `emitted` on, and where
        that audio ends (in frames). The last block's audio runs to the end, trimmed as
        inference.synthesize trims it; an earlier block's stops BLOCK_CONTEXT_FRAMES short. Each piece
        is decoded from the sentence's start: the codec's convolutions see a few frames either side
        and its watermark LSTMs run forward, so the audio before the held frames is the audio of
        the whole sentence decoded at once."""
        if last:
            with np.errstate(over="ignore", invalid="ignore"):  # a latent out of range is refused below
                latent = inference.trim_trailing_silence(latent, self.silence, speech.trim_tolerance)[:speech.frames]
        end = len(latent) if last else len(latent) - BLOCK_CONTEXT_FRAMES
        if end <= emitted:
            return np.zeros(0, np.float32), emitted
        wave = await asyncio.wrap_future(self.decoder.submit(latent))
        if not np.isfinite(wave).all():
            raise ServeError(500, "the model produced non-finite audio for this request; another seed or smaller "
                             "knobs may work", None, "non_finite_output")
        hop = self.codec.hop
        return wave[emitted * hop:None if last else end * hop], end

    def generate(self, speech, index, loop, cancelled, start=0, frames=None, prefix=None):
        """Submit sentence `index` of `speech` (or, blockwise, its block of `frames` from `start`, after
        the frames in `prefix`); returns a future of its latent."""
        future = loop.create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # a request that left never reads it

        def deliver(result):
            settle = future.set_exception if isinstance(result, Exception) else future.set_result
            loop.call_soon_threadsafe(lambda: future.done() or settle(result))

        loaded = self.loaded
        reference = speech.reference or (np.zeros((loaded.max_speaker_len, loaded.config.latent_size), np.float32),
                                         np.zeros(loaded.max_speaker_len, np.int32))
        ids, mask = speech.pieces[index]
        mode, schedule = inference.RowSchedule.from_knobs(speech.knobs, loaded.config.num_layers)
        self.scheduler.submit(Row((ids[None], mask[None], reference[0][None], reference[1][None]), mode, schedule,
                                  speech.seed + index, speech.knobs["truncation"],
                                  self.scheduler.canvas_for(frames or speech.frames), deliver, cancelled, start,
                                  prefix))
        return future

    async def audio(self, speech, cancelled, deadline):
        """The response's bytes, piece by piece: each sentence (each block of it, for a blockwise
        checkpoint) is sampled, the next submitted as soon as it is done, then decoded and sent."""
        loop = asyncio.get_running_loop()
        encoder, joiner = AudioEncoder(speech.fmt), CrossfadeJoiner()
        yield encoder.start()
        jobs = [(index, start, frames) for index in range(len(speech.pieces))
                for start, frames in self.block_starts(speech.frames)]
        prefix = np.zeros((1, self.scheduler.prefix_frames, self.loaded.config.latent_size), np.float32)

        def submit(job):
            index, start, frames = job
            return self.generate(speech, index, loop, cancelled, start, frames,
                                 prefix.copy() if self.scheduler.prefix_frames else None)

        upcoming, sentence, emitted = submit(jobs[0]), None, 0
        for n, (index, start, frames) in enumerate(jobs):
            block = (await asyncio.wait_for(upcoming, max(0.0, deadline - time.monotonic())))[:frames]
            sentence = block if start == 0 else np.concatenate([sentence, block])
            last = n + 1 == len(jobs) or jobs[n + 1][0] != index
            if self.scheduler.prefix_frames:
                prefix[:] = 0
                if not last:
                    prefix[0, :len(sentence)] = sentence
            if n + 1 < len(jobs):
                upcoming = submit(jobs[n + 1])
            piece, emitted = await self.decode(sentence, speech, 0 if start == 0 else emitted, last)
            self.metrics["audio"].inc(len(piece) / SAMPLE_RATE)
            yield encoder.feed(joiner.add(piece) if start == 0 else joiner.extend(piece))
        yield encoder.feed(joiner.finish()) + encoder.finish()

    def block_starts(self, frames):
        """[(start, frames)] of a sentence's blocks."""
        plan = self.block_plan(frames)
        return [(sum(plan[:i]), size) for i, size in enumerate(plan)]


def sse_event(payload):
    return f"data: {json.dumps(payload)}\n\n".encode()


class Answer:
    """One speech request from its arrival to its last byte (or its client's leaving): counted once
    in the metrics and the log, whichever way it ends."""

    def __init__(self, server):
        self.server, self.arrived = server, time.monotonic()
        self.cancelled = threading.Event()  # its rows leave the batch at the next step
        self.admitted, self.ended, self.watcher, self.speech, self.first_audio = False, False, None, None, None

    async def admit(self, request):
        """The request's Speech once it is allowed in; ServeError if it is not."""
        server = self.server
        server.check_key(request)
        if not server.scheduler.ready.is_set():
            raise ServeError(503, "the server is still compiling its programs; retry when /health answers 200",
                             None, "not_ready", {"Retry-After": "5"})
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise ServeError(400, "the body is not valid JSON", None, "invalid_json") from None
        self.speech = parse_speech(body, server.settings, server.voices, server.loaded, server.presets)
        if server.active >= server.settings.max_requests:
            raise ServeError(429, f"the server is answering {server.active} requests, its limit; retry shortly",
                             None, "rate_limit_exceeded", {"Retry-After": "1"})
        server.active += 1
        self.admitted = True
        self.watcher = asyncio.create_task(self.watch(request))
        return self.speech

    async def watch(self, request):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.end(499)  # the client went away

    async def start(self, chunks):
        """The response's first bytes: the first sentence, or all of them for a format that needs the
        whole audio; waited for here, so that their failure is still an HTTP status."""
        try:
            if self.speech.fmt in STREAMED_FORMATS:
                head = await chunks.__anext__() + await chunks.__anext__()
            else:
                head = b"".join([chunk async for chunk in chunks])
        except BaseException:
            await chunks.aclose()
            raise
        self.first_audio = time.monotonic() - self.arrived
        self.server.metrics["first_audio"].observe(self.first_audio)
        return head

    async def rest(self, head, chunks):
        """The response body: `head`, then each sentence as it is decoded (as SSE events if asked)."""
        sse = self.speech.sse
        wrap = (lambda data: sse_event({"type": "speech.audio.delta", "audio": b64(data)})) if sse else bytes
        status = 200
        try:
            yield wrap(head)
            async for chunk in chunks:
                if chunk:
                    yield wrap(chunk)
            if sse:
                yield sse_event({"type": "speech.audio.done"})
        except asyncio.TimeoutError:
            status = 504
            log.warning("a streamed request passed %g s and was cut", self.server.settings.request_timeout)
        except ServeError as e:
            status = e.status
        except (asyncio.CancelledError, GeneratorExit):
            status = 499
            raise
        finally:
            self.end(status)

    def end(self, status):
        if self.ended:
            return
        self.ended = True
        self.cancelled.set()
        server, seconds = self.server, time.monotonic() - self.arrived
        server.metrics["requests"].labels(str(status)).inc()
        if not self.admitted:
            return
        server.active -= 1
        self.watcher.cancel()
        server.metrics["latency"].observe(seconds)
        first = "no audio" if self.first_audio is None else f"first audio {self.first_audio:.2f} s"
        log.info("%d chars, %d sentences, %s: %s, done %.2f s (%d)", self.speech.chars, len(self.speech.pieces),
                 self.speech.fmt, first, seconds, status)


async def speech_route(request):
    server = request.app.state.server
    answer = Answer(server)
    try:
        speech = await answer.admit(request)
        chunks = server.audio(speech, answer.cancelled, answer.arrived + server.settings.request_timeout)
        head = await answer.start(chunks)
    except ServeError as e:
        answer.end(e.status)
        return e.response()
    except asyncio.TimeoutError:
        answer.end(504)
        return ServeError(504, f"the request took longer than {server.settings.request_timeout:g} s and was "
                          "cancelled", None, "timeout").response()
    except asyncio.CancelledError:
        answer.end(499)
        raise
    media = "text/event-stream" if speech.sse else MEDIA_TYPES[speech.fmt]
    return StreamingResponse(answer.rest(head, chunks), media_type=media)


def b64(data):
    return base64.b64encode(data).decode()


async def voices_route(request):
    server = request.app.state.server
    try:
        server.check_key(request)
        if request.method == "GET":
            return JSONResponse({"voices": server.voices.describe()})
        return await add_voice(server, request)
    except ServeError as e:
        return e.response()


async def add_voice(server, request):
    """POST /v1/audio/voices: a multipart form with `name` and `file` (a recording)."""
    if int(request.headers.get("content-length") or 0) > server.settings.max_upload_mb * 2 ** 20:
        raise ServeError(413, f"the upload is over {server.settings.max_upload_mb} MB", "file", "file_too_large")
    try:
        form = await request.form(max_files=1, max_fields=4, max_part_size=server.settings.max_upload_mb * 2 ** 20)
    except Exception as e:  # the multipart parser's own errors: a malformed body
        raise ServeError(400, f"the body is not a multipart form with name and file ({e})", None,
                         "invalid_form") from None
    name, upload = form.get("name"), form.get("file")
    if not isinstance(name, str) or not VOICE_NAME.fullmatch(name) or name == RANDOM_VOICE:
        raise ServeError(400, f"name must be 1-64 letters, digits, '_', '-' or '.', and not {RANDOM_VOICE!r}",
                         "name", "invalid_value")
    if upload is None or isinstance(upload, str):
        raise ServeError(400, "file is required: the recording of the voice", "file", "missing_file")
    data = await upload.read()
    suffix = os.path.splitext(upload.filename or "")[1][:10]
    with tempfile.NamedTemporaryFile(suffix=suffix) as recording:
        recording.write(data)
        recording.flush()
        loop = asyncio.get_running_loop()
        seconds = await loop.run_in_executor(server.voice_work, server.voices.add, name, recording.name,
                                             server.codec)
    log.info("voice %s added: %.1f s of reference", name, seconds)
    return JSONResponse({"name": name, "seconds": seconds}, status_code=201)


async def voice_route(request):
    server = request.app.state.server
    try:
        server.check_key(request)
        name = request.path_params["name"]
        server.voices.remove(name)
        return JSONResponse({"name": name, "deleted": True})
    except ServeError as e:
        return e.response()


async def health_route(request):
    server = request.app.state.server
    if server.scheduler.ready.is_set():
        return JSONResponse({"status": "ready", "model": server.settings.model_name,
                             "rows_busy": server.scheduler.busy_rows()})
    return JSONResponse({"status": "compiling"}, status_code=503)


async def metrics_route(request):
    registry = request.app.state.server.metrics["registry"]
    return Response(prometheus_client.generate_latest(registry), media_type=prometheus_client.CONTENT_TYPE_LATEST)


async def not_found(request, exc):
    status = getattr(exc, "status_code", 404)
    return ServeError(status, f"{request.method} {request.url.path} is not a route of this server", None,
                      "not_found" if status == 404 else "method_not_allowed").response()


def make_app(server):
    app = Starlette(routes=[
        Route("/v1/audio/speech", speech_route, methods=["POST"]),
        Route("/v1/audio/voices", voices_route, methods=["GET", "POST"]),
        Route("/v1/audio/voices/{name}", voice_route, methods=["DELETE"]),
        Route("/health", health_route), Route("/metrics", metrics_route)],
        exception_handlers={404: not_found, 405: not_found})
    app.state.server = server
    return app


# ----------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", required=True, help="what inference.py --checkpoint takes: a training checkpoint directory, "
      "a step, or a .pkl")
    a("--weights", choices=("ema", "raw"), default=None, help="EMA weights or raw ones (default: EMA where present)")
    a("--dacvae_weights", default=None, help="local DACVAE weights.pth or Hub repo id (default $DACVAE_WEIGHTS, "
      "else facebook/dacvae-watermarked)")
    a("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    a("--port", type=int, default=8000)
    a("--model_name", default="echo", help="the `model` requests must name")
    a("--api_key", default=os.environ.get("ECHO_API_KEY"), help="require Authorization: Bearer KEY on the speech "
      "and voice routes (/health and /metrics stay open; default $ECHO_API_KEY; none: open)")
    a("--voices_dir", default="voices", help="where uploaded voices are kept (their speaker latents)")
    a("--max_batch", type=int, default=16, help="rows sampled together; the step is compiled for every power of "
      "two up to it, for each guidance mode")
    a("--canvas_seconds", default="15", help="comma-separated canvas lengths compiled at start (capped at the "
      "model's trained length); a request samples the smallest that holds its duration")
    a("--blocks", default=None, help="blockwise checkpoints: frames per block of each sentence, streamed as each "
      f"block is done, each a multiple of 4 (0.16 s), the last 'rest' (default {DEFAULT_BLOCKS})")
    a("--max_requests", type=int, default=64, help="speech requests answered at once; beyond, 429")
    a("--request_timeout", type=float, default=300.0, help="seconds before a request is cancelled (504)")
    a("--max_input_chars", type=int, default=4096, help="longest input (OpenAI's limit)")
    a("--max_steps", type=int, default=200, help="most sampler steps a request may ask for")
    a("--max_upload_mb", type=float, default=20.0, help="largest voice recording accepted")
    a("--shutdown_grace", type=float, default=30.0, help="seconds SIGTERM waits for requests under way")
    a("--sampler_presets", default=None, help="JSON file of more sampler presets (as inference.py's)")
    a("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    a("--compile_cache_dir", default=os.path.expanduser("~/.cache/echo_jax"), help="persistent compilation cache "
      "('' to disable)")
    args = p.parse_args(argv)
    try:
        args.canvas_seconds = [float(s) for s in args.canvas_seconds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--canvas_seconds takes comma-separated seconds, got {args.canvas_seconds!r}")
    if not args.canvas_seconds or min(args.canvas_seconds) <= 0 or not all(map(math.isfinite, args.canvas_seconds)):
        p.error("--canvas_seconds must be positive seconds")
    for flag in ("max_batch", "max_requests", "max_input_chars", "max_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if not 0 < args.port < 65536:
        p.error(f"--port must be in 1-65535, got {args.port}")
    if args.blocks is not None:
        try:
            inference.block_frames(args.blocks, None)
        except inference.InferenceError as e:
            p.error(str(e))
    return args


def load(args):
    """The model, codec and presets, or InferenceError naming what is wrong."""
    if args.compile_cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if "://" not in args.checkpoint and not os.path.exists(args.checkpoint):
        raise inference.InferenceError(f"checkpoint {args.checkpoint} does not exist")
    presets = dict(inference.SAMPLER_PRESETS)
    if args.sampler_presets:
        presets.update(inference.load_sampler_presets(args.sampler_presets))
    try:
        loaded = inference.load_model(args.checkpoint, args.dtype, args.weights)
        codec = dacvae.DACVAE.load(args.dacvae_weights, flag="--dacvae_weights")
    except (inference.checkpoint.CheckpointError, dacvae.DACVAEError) as e:
        raise inference.InferenceError(str(e)) from None
    if codec.codebook_dim != loaded.config.latent_size:
        raise inference.InferenceError(f"the codec's {codec.codebook_dim}-dim latents do not fit the model's "
                                       f"{loaded.config.latent_size}-dim latents")
    if args.blocks is not None and not loaded.config.blockwise:
        raise inference.InferenceError(f"{args.checkpoint} has no latent-prefix path (its preset is not -blockwise), "
                                       "so it samples each sentence in one canvas: drop --blocks")
    try:
        os.makedirs(args.voices_dir, exist_ok=True)
    except OSError as e:
        raise inference.InferenceError(f"cannot create --voices_dir {args.voices_dir} ({e.strerror})") from None
    return loaded, codec, presets


def build(args):
    """(Server, uvicorn.Server) for the parsed flags; the scheduler starts compiling at once.
    Raises InferenceError for a checkpoint, codec or flag that cannot be served."""
    server = Server(args, *load(args))
    server.start()
    config = uvicorn.Config(make_app(server), host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.shutdown_grace)
    return server, uvicorn.Server(config)


def listen(host, port):
    """The server's socket, bound before anything heavy loads: a taken port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise inference.InferenceError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def main(argv=None):
    args = parse_args(argv)
    sock = None
    try:
        sock = listen(args.host, args.port)
        server, http = build(args)
    except inference.InferenceError as e:
        if sock is not None:
            sock.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        http.run(sockets=[sock])
    finally:
        server.scheduler.stop()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)
    sys.exit(main())
