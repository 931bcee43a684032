"""Echo inference: text (and optionally a voice to clone) -> 48 kHz speech.

    python inference.py --checkpoint runs/echo/checkpoints \\
        --text "Hello, this is a test." --speaker_ref ref.mp3 --output out.wav
    python inference.py --checkpoint ckpt.pkl --text_file lines.txt --output outdir/      # one wav per line
    python inference.py --checkpoint ckpt.pkl --input_jsonl jobs.jsonl --output outdir/  # {"text", "speaker_ref", ...}

Text and speaker are encoded once per utterance (their per-layer keys/values too); every Euler
step is one jitted call over all guidance passes. Without --speaker_ref the model invents a
voice, and --seed decides which. The compilation cache is on, so a second run starts fast.
"""

import sys

sys.modules.setdefault("tensorflow", None)  # Hugging Face libraries must never pull TF in next to JAX

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from tqdm import tqdm  # noqa: E402

import checkpoint  # noqa: E402
import data  # noqa: E402
import model  # noqa: E402
import storage  # noqa: E402

log = logging.getLogger("inference")

FRAMES_PER_SECOND = 25
SAMPLE_RATE = 48000
DEFAULT_MAX_LEN = 768  # latent frames, text bytes and speaker frames of the original runs
MIN_REFERENCE_SECONDS = 0.5
TAIL_FRAMES = 5  # trailing silence kept after the speech: 0.2 s, within the promised 0.3 s
CROSSFADE_SECONDS = 0.05  # between the generations of a text split at sentence boundaries
CANVASES = ("trained", "duration")
DEFAULT_CANVAS = "duration"  # measured on the demo model: no worse than the trained canvas, and cheaper (README)


class InferenceError(Exception):
    """A user-fixable problem (bad flag, text, file); main() prints it as one sentence."""


# ----------------------------------------------------------------------------
# Model

@dataclasses.dataclass
class LoadedModel:
    module: object  # model.EchoDiT
    params: dict
    config: object  # model.EchoConfig
    max_latent_len: int
    max_text_len: int
    max_speaker_len: int
    silence_frame: np.ndarray  # (128,): what the model learned to end speech with; None if unknown
    step: int


def load_model(path, dtype="float32", weights=None):
    """A checkpoint (full or weights-only, ours or the reference layout) -> LoadedModel, with its
    EMA weights (weights="ema", or None where it has them) or its raw ones ("raw")."""
    payload = checkpoint.load_checkpoint(path)
    if weights == "ema" and "ema_params" not in payload:
        raise InferenceError(f"{path} holds no EMA weights (trained with --ema_decay 0); use --weights raw")
    key = "ema_params" if weights != "raw" and "ema_params" in payload else "params"
    if payload.pop("opt_state", None) is not None:
        weights_only = re.sub(r"\.pkl$", ".params.pkl", path)
        hint = f" ({os.path.basename(weights_only)} beside it)" if os.path.exists(weights_only) else ""
        log.info("full checkpoint: the weights-only .params.pkl%s loads faster", hint)
    config = dataclasses.replace(checkpoint.config_from_checkpoint(payload, path), dtype=dtype, remat="none",
                                 scan_layers=True, unroll_scan=False)
    params = checkpoint.params_from_checkpoint(payload, config, path, key=key)
    lengths = payload.get("max_lengths") or {}
    train_args = payload.get("train_args") or {}
    length = lambda name: int(lengths.get(name) or train_args.get(name) or DEFAULT_MAX_LEN)
    silence = payload.get("silence_latent")
    silence_frame = None
    if isinstance(silence, np.ndarray) and silence.ndim == 2 and silence.shape[1] == config.latent_size:
        silence_frame = np.median(silence.astype(np.float32), axis=0)
    return LoadedModel(model.EchoDiT(config), params, config, length("max_latent_len"), length("max_text_len"),
                       length("max_speaker_len"), silence_frame, int(payload.get("step") or 0))


# ----------------------------------------------------------------------------
# Text and speaker

_SPLITS = (r"(?<=[.!?])\s+", r"(?<=[,])\s+", r"\s+")  # sentences, then clauses, then words


def prepare_text(text, max_text_len=DEFAULT_MAX_LEN):
    """Text -> [(ids, mask)], int32 of length max_text_len each: one entry per generation.

    Text whose bytes do not fit is split at sentence boundaries (then clauses, then words),
    never cut: every word of the input is spoken.
    """
    if not isinstance(text, str) or not text.strip():
        raise InferenceError("the text is empty: pass the words to speak with --text")
    fits = lambda s: data.encode_text(s, max_text_len) is not None
    pieces = _split_to_fit(data.normalize_text(text), fits, _SPLITS, max_text_len)
    return [data.encode_text(piece, max_text_len) for piece in pieces]


def frames_for(duration, max_latent_len):
    """The most latent frames `duration` seconds of output may have: at least 1, at most the trained length."""
    return max(1, min(int(round(duration * FRAMES_PER_SECOND)), max_latent_len))


def sentences(text):
    """The text's sentences (normalized as the model reads text), in order."""
    return [s for s in re.split(_SPLITS[0], data.normalize_text(text)) if s]


def _split_to_fit(text, fits, separators, max_text_len):
    if fits(text):
        return [text]
    if not separators:
        raise InferenceError(f"the text holds a word too long to speak ({text[:40]!r}...): the model reads at "
                             f"most {max_text_len - 1} bytes at once")
    parts = [p for p in re.split(separators[0], text) if p]
    if len(parts) == 1:
        return _split_to_fit(text, fits, separators[1:], max_text_len)
    chunks, current = [], ""
    for part in parts:
        joined = f"{current} {part}" if current else part
        if fits(joined):
            current = joined
            continue
        if current:
            chunks.append(current)
        current = ""
        if fits(part):
            current = part
        else:
            chunks.extend(_split_to_fit(part, fits, separators[1:], max_text_len))
    if current:
        chunks.append(current)
    return chunks


def encode_reference(path, codec, max_speaker_len=DEFAULT_MAX_LEN):
    """Reference audio -> (latent (S, 128) float32, mask (S,) int32), S = max_speaker_len.

    A missing or unreadable file is an error (the user asked for that voice); one that is
    shorter than 0.5 s or digitally silent is warned about and gives None (no speaker).
    """
    import torch  # the codec's, imported where audio is: the trainer uses the sampler alone

    import dacvae  # with torch, where audio is: the trainer uses the sampler alone

    try:
        audio = dacvae.load_audio(path)
    except dacvae.DACVAEError as e:
        raise InferenceError(f"speaker reference: {e}") from None
    if len(audio) < MIN_REFERENCE_SECONDS * SAMPLE_RATE:
        log.warning("speaker reference %s is %.2f s long, under %.1f s: continuing without a reference voice",
                    path, len(audio) / SAMPLE_RATE, MIN_REFERENCE_SECONDS)
        return None
    if float(np.max(np.abs(audio))) < dacvae.SILENT_PEAK:
        log.warning("speaker reference %s is digital silence: continuing without a reference voice", path)
        return None
    audio = audio[:max_speaker_len * codec.hop]  # the model reads at most max_speaker_len frames
    latent = codec.encode(torch.from_numpy(audio)[None, None])[0].T.numpy()
    frames = min(len(latent), max_speaker_len)
    speaker_latent = np.zeros((max_speaker_len, latent.shape[1]), np.float32)
    speaker_latent[:frames] = latent[:frames]
    speaker_mask = np.zeros(max_speaker_len, np.int32)
    speaker_mask[:frames] = 1
    return speaker_latent, speaker_mask


def load_latent(path, flag, latent_size=128):
    """A latent .npy ((frames, latent_size) float) -> float32, every way it can be wrong one sentence."""
    try:
        latent = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InferenceError(f"{flag} {path}: not a readable .npy file ({e})") from None
    if latent.ndim != 2 or latent.shape[1] != latent_size or latent.shape[0] < 1:
        raise InferenceError(f"{flag} {path} has shape {latent.shape}; expected (frames, {latent_size})")
    if latent.dtype.kind != "f":
        raise InferenceError(f"{flag} {path} holds {latent.dtype}; expected float16 or float32 latents")
    if not np.isfinite(latent).all():
        raise InferenceError(f"{flag} {path} contains NaN or infinite values")
    return latent.astype(np.float32)


def reference_from_latent(path, max_speaker_len=DEFAULT_MAX_LEN, latent_size=128):
    """A precomputed reference latent (.npy, (N, latent_size) float, e.g. a shard's .ref.npy) ->
    (latent, mask) as encode_reference returns them, cropped to the first max_speaker_len frames."""
    latent = load_latent(path, "--speaker_latent", latent_size)
    frames = min(len(latent), max_speaker_len)
    speaker_latent = np.zeros((max_speaker_len, latent_size), np.float32)
    speaker_latent[:frames] = latent[:frames]
    return speaker_latent, (np.arange(max_speaker_len) < frames).astype(np.int32)


def continuation_prefix(path, codec, config):
    """--continue_from: a recording (any format soundfile reads) or its latent (.npy, (frames, 128))
    -> its frames (P, 128) float32, P cut down to a multiple of the patch size at the start (the
    end is where the continuation joins)."""
    patch = config.encoder_patch_size
    if path.endswith(".npy"):
        latent = load_latent(path, "--continue_from", config.latent_size)
    else:
        import torch  # the codec's, imported where audio is: the trainer uses the sampler alone

        import dacvae  # with torch, where audio is: the trainer uses the sampler alone
        try:
            audio = dacvae.load_audio(path)
        except dacvae.DACVAEError as e:
            raise InferenceError(f"--continue_from: {e}") from None
        latent = codec.encode(torch.from_numpy(audio)[None, None])[0].T.numpy().astype(np.float32)
    if len(latent) < patch:
        raise InferenceError(f"--continue_from {path} is {len(latent)} frames long; continuing needs at least "
                             f"{patch} ({patch / FRAMES_PER_SECOND:.2f} s)")
    return latent[len(latent) % patch:]


def block_frames(spec, canvas, patch=4):
    """--blocks "N1,N2,...[,rest]" -> the frames of each block on a canvas of `canvas` frames (None:
    only the form is checked): each a positive multiple of `patch`; the last may be 'rest', what the
    others leave of the canvas."""
    names = [part.strip() for part in str(spec).split(",")]
    frames = []
    for i, name in enumerate(names):
        if name == "rest" and i == len(names) - 1:
            break
        if not (name.isdigit() and int(name) > 0 and int(name) % patch == 0):
            raise InferenceError(f"--blocks {spec}: each block is a positive multiple of {patch} frames "
                                 f"({patch / FRAMES_PER_SECOND:.2f} s) and only the last may be 'rest'; got {name!r}")
        frames.append(int(name))
    if canvas is None:
        return frames
    if sum(frames) > canvas:
        raise InferenceError(f"--blocks {spec}: {sum(frames)} frames do not fit the canvas of {canvas} frames "
                             "(--duration, within the model's trained length)")
    if names[-1] == "rest" and sum(frames) == canvas:
        raise InferenceError(f"--blocks {spec}: the blocks before 'rest' fill the canvas of {canvas} frames, so "
                             "'rest' would be empty")
    return frames + [canvas - sum(frames)] if names[-1] == "rest" else frames


# ----------------------------------------------------------------------------
# Sampling

def _echo_preset(cfg_text, cfg_speaker, flat):
    return {"steps": 40, "cfg_text": cfg_text, "cfg_speaker": cfg_speaker, "cfg_min_t": 0.5, "cfg_max_t": 1.0,
            "truncation": 0.8 if flat else 1.0, "rescale_k": 1.2 if flat else 1.0, "rescale_sigma": 3.0,
            "t_scale": 0.999}


# Echo-TTS's named presets (echo-tts 0.1.4, resources/sampler_presets.json) in this file's names;
# Echo samples every one of them on the grid linspace(1, 0, steps + 1) * 0.999.
SAMPLER_PRESETS = {
    "Independent-High-Speaker-CFG": _echo_preset(3.0, 8.0, False),
    "Independent-High-Speaker-CFG-Flat": _echo_preset(3.0, 8.0, True),
    "Independent-High-CFG": _echo_preset(8.0, 8.0, False),
    "Independent-High-CFG-Flat": _echo_preset(8.0, 8.0, True),
    "Independent-Low-CFG": _echo_preset(3.0, 3.0, False),
    "Independent-Low-CFG-Flat": _echo_preset(3.0, 3.0, True),
}
# Every sampler knob and its default: a preset sets some, an explicit flag overrides both.
SAMPLER_DEFAULTS = {"steps": 32, "cfg_scale": 3.0, "cfg_text": None, "cfg_speaker": None, "cfg_min_t": 0.0,
                    "cfg_max_t": 1.0, "truncation": 1.0, "rescale_k": None, "rescale_sigma": None,
                    "speaker_kv_scale": None, "speaker_kv_min_t": 0.9, "speaker_kv_max_layers": None,
                    "t_scale": 1.0, "sway": None}
# Echo's own key names in a presets file.
_PRESET_ALIASES = {"num_steps": "steps", "cfg_scale_text": "cfg_text", "cfg_scale_speaker": "cfg_speaker",
                   "truncation_factor": "truncation"}


def load_sampler_presets(path):
    """A JSON file of {name: {knob: value}} (this file's or Echo's key names; numbers or strings)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise InferenceError(f"--sampler_presets {path}: not a readable JSON file ({e})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise InferenceError(f"--sampler_presets {path} must map each preset name to an object of settings")
    presets = {}
    for name, settings in raw.items():
        preset = {}
        for key, value in settings.items():
            knob = _PRESET_ALIASES.get(key, key)
            if knob not in SAMPLER_DEFAULTS:
                raise InferenceError(f"--sampler_presets {path}: preset {name!r} sets unknown knob {key!r} (known: "
                                     f"{', '.join(SAMPLER_DEFAULTS)})")
            try:
                number = float(value)
                preset[knob] = int(number) if knob in ("steps", "speaker_kv_max_layers") else number
            except (TypeError, ValueError):
                raise InferenceError(f"--sampler_presets {path}: preset {name!r} sets {key} to {value!r}, "
                                     "not a number") from None
        presets[name] = preset
    return presets


def timestep_grid(steps, t_scale=1.0, sway=None):
    """t from 1 (noise) towards 0, steps + 1 points, times t_scale. Uniform, or F5-TTS's sway
    schedule u + s (cos(pi u / 2) - 1 + u) over its time u (0 = noise): s < 0 puts steps near noise."""
    if sway is None:
        return np.linspace(1.0, 0.0, steps + 1, dtype=np.float32) * np.float32(t_scale)
    u = np.linspace(0.0, 1.0, steps + 1)
    u = u + sway * (np.cos(np.pi / 2 * u) - 1 + u)
    return ((1.0 - u) * t_scale).astype(np.float32)


def temporal_score_rescale(v, x, t, k, sigma):
    """Temporal score rescaling (arXiv 2510.01184), as Echo applies it for t < 1."""
    snr = (1 - t) ** 2 / t ** 2
    ratio = (snr * sigma ** 2 + 1) / (snr * sigma ** 2 / k + 1)
    return (ratio * ((1 - t) * v + x) - x) / (1 - t)


_COMPILED = {}
# The conditions each guidance pass sees: the first pass is conditional, each later one drops a part.
GUIDANCE_PASSES = {"joint": ("all", "none"), "independent": ("all", "speaker", "text")}


def _guidance(cfg_scale, cfg_text, cfg_speaker):
    """('joint', (s,)) or ('independent', (s_text, s_speaker)); a missing scale takes --cfg_scale."""
    if cfg_text is None and cfg_speaker is None:
        return "joint", (float(cfg_scale),)
    return "independent", (float(cfg_scale if cfg_text is None else cfg_text),
                           float(cfg_scale if cfg_speaker is None else cfg_speaker))


def _replicated(params):
    """A replicated sharding on the mesh that sharded params live on (the trainer's eval), else None."""
    sharding = next((getattr(a, "sharding", None) for a in jax.tree.leaves(params)), None)
    if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return None


def _build_encode(module, mode, replicated=None):
    """encode runs once per utterance: the text and speaker keys/values of each guidance pass."""

    def encode(params, text_ids, text_mask, speaker_latent, speaker_mask):
        cond = module.apply({"params": params}, text_ids, text_mask, speaker_latent, speaker_mask,
                            method=model.EchoDiT.encode_conditions)
        # Zeroing part of the key mask is exactly CFG dropout of that condition, so every
        # guidance pass shares the keys and values computed here.
        is_speaker = jnp.arange(cond["mask"].shape[1]) >= text_ids.shape[1]
        seen = {"all": cond["mask"], "none": jnp.zeros_like(cond["mask"]), "speaker": cond["mask"] & is_speaker,
                "text": cond["mask"] & ~is_speaker}
        masks = [seen[part] for part in GUIDANCE_PASSES[mode]]
        passes = len(masks)
        return {"k": jnp.concatenate([cond["k"]] * passes, axis=1),
                "v": jnp.concatenate([cond["v"]] * passes, axis=1), "mask": jnp.concatenate(masks, axis=0)}

    return jax.jit(encode, out_shardings=replicated)


def _build_step(module, replicated=None):
    """step runs once per Euler step over B rows, each at its own place in a schedule of its own:
    t and t_next (B,); guidance weights (B, passes - 1) and whether guidance applies (B,); temporal
    score rescaling's k and sigma (B, 2) and whether it applies (B,); the frame position of each
    row's first frame (B,) int32 (a block of a blockwise model; others ignore it). The conditions'
    rows go pass by pass (B rows of each pass)."""

    def step(params, x, step_cond, t, t_next, weights, guided, rescale, rescale_on, start_pos):
        b = x.shape[0]
        passes = step_cond["mask"].shape[0] // b
        blockwise = module.config.blockwise

        def guided_velocity():
            v = module.apply({"params": params}, jnp.concatenate([x] * passes), jnp.concatenate([t] * passes),
                             step_cond, jnp.concatenate([start_pos] * passes) if blockwise else 0,
                             method=model.EchoDiT.decode).reshape((passes,) + x.shape)
            mixed = v[0] + sum(weights[:, i, None, None] * (v[0] - v[i + 1]) for i in range(passes - 1))
            return jnp.where(guided[:, None, None], mixed, v[0])

        def conditional_velocity():
            first = {"k": step_cond["k"][:, :b], "v": step_cond["v"][:, :b], "mask": step_cond["mask"][:b]}
            return module.apply({"params": params}, x, t, first, start_pos if blockwise else 0,
                                method=model.EchoDiT.decode)

        v = jax.lax.cond(guided.any(), guided_velocity, conditional_velocity)
        column = lambda a: a[:, None, None]
        # Off (the default), v passes through untouched: the output is bit-identical to no rescaling.
        v = jnp.where(column(rescale_on & (t < 1)),
                      temporal_score_rescale(v, x, column(t), column(rescale[:, 0]), column(rescale[:, 1])), v)
        return x + column(t_next - t) * v

    return jax.jit(step, out_shardings=replicated, donate_argnums=(1,))


def compiled_encode(module, mode, params, inputs):
    """encode (above) AOT-compiled for these inputs' shapes, once per process."""
    replicated = _replicated(params)
    key = ("encode", module, mode, tuple(a.shape for a in inputs), replicated)
    if key not in _COMPILED:
        _COMPILED[key] = _build_encode(module, mode, replicated).lower(params, *inputs).compile()
    return _COMPILED[key]


@functools.partial(jax.jit, static_argnums=(2, 3))
def scale_speaker_kv(cond, scale, max_layers, text_len):
    """Echo's speaker "force": the speaker keys and values of the first max_layers layers times scale."""
    layers, _, length = cond["k"].shape[:3]
    hit = (jnp.arange(layers) < max_layers)[:, None, None, None, None] & \
        (jnp.arange(length) >= text_len)[None, None, :, None, None]
    factor = jnp.where(hit, scale, 1.0).astype(cond["k"].dtype)
    return {"k": cond["k"] * factor, "v": cond["v"] * factor, "mask": cond["mask"]}


def compiled_step(module, params, rows, num_frames, cond):
    """step (above) AOT-compiled for `rows` rows of num_frames frames whose conditions are shaped like
    `cond` (arrays or shapes: k and v (layers, passes * rows, ...), mask (passes * rows, length)),
    once per process."""
    replicated = _replicated(params)
    abstract = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
    cond = jax.tree.map(lambda a: abstract(a.shape, a.dtype), cond)
    passes = cond["mask"].shape[0] // rows
    key = ("step", module, rows, num_frames, tuple((k, a.shape, a.dtype) for k, a in sorted(cond.items())), replicated)
    if key not in _COMPILED:
        per_row = lambda *shape, dtype=jnp.float32: abstract((rows,) + shape, dtype)
        flags = per_row(dtype=jnp.bool_)
        _COMPILED[key] = _build_step(module, replicated).lower(
            params, per_row(num_frames, module.config.latent_size), cond, per_row(), per_row(),
            per_row(passes - 1), flags, per_row(2), flags, per_row(dtype=jnp.int32)).compile()
    return _COMPILED[key]


@dataclasses.dataclass
class RowSchedule:
    """One row's sampler knobs as the step reads them at each of its steps."""
    grid: np.ndarray  # steps + 1 times, from noise towards 0
    weights: tuple  # guidance weights, one per guidance pass after the first
    cfg_min_t: float
    cfg_max_t: float
    rescale: tuple  # (k, sigma), or None: off
    force: tuple  # the speaker force: (scale, from t, layers), or None: off

    @classmethod
    def from_knobs(cls, knobs, num_layers):
        """From SAMPLER_DEFAULTS' knobs -> (guidance mode, RowSchedule)."""
        mode, weights = _guidance(knobs["cfg_scale"], knobs["cfg_text"], knobs["cfg_speaker"])
        rescale = None
        if knobs["rescale_k"] is not None and knobs["rescale_sigma"] is not None:
            rescale = (float(knobs["rescale_k"]), float(knobs["rescale_sigma"]))
        layers = num_layers if knobs["speaker_kv_max_layers"] is None else knobs["speaker_kv_max_layers"]
        force = None if knobs["speaker_kv_scale"] is None else \
            (float(knobs["speaker_kv_scale"]), float(knobs["speaker_kv_min_t"]), int(layers))
        return mode, cls(timestep_grid(knobs["steps"], knobs["t_scale"], knobs["sway"]), weights,
                         float(knobs["cfg_min_t"]), float(knobs["cfg_max_t"]), rescale, force)

    @property
    def steps(self):
        return len(self.grid) - 1

    def at(self, k):
        """(t, t_next, weights, guided, rescale, rescale_on) of step k, as numpy values."""
        t = self.grid[k]
        guided = any(w != 0 for w in self.weights) and self.cfg_min_t <= t <= self.cfg_max_t
        return (t, self.grid[k + 1], np.asarray(self.weights, np.float32), np.bool_(guided),
                np.asarray(self.rescale or (1.0, 1.0), np.float32), np.bool_(self.rescale is not None))

    def forced(self, k):
        """Whether step k reads the speaker-forced conditions."""
        return self.force is not None and self.grid[k] >= self.force[1]

    def forced_cond(self, cond, text_len):
        """`cond` with the speaker force applied (computed once, read by the steps it falls on)."""
        scale, _, layers = self.force
        return scale_speaker_kv(cond, jnp.float32(scale), layers, text_len)


def step_inputs(schedules, ks):
    """The step's per-row inputs for rows at steps `ks` of their `schedules`, stacked."""
    columns = zip(*(schedule.at(k) for schedule, k in zip(schedules, ks)))
    return tuple(np.stack(column) for column in columns)


def initial_noise(seed, rows, num_frames, latent_size, truncation=1.0):
    x = jax.random.normal(jax.random.key(seed), (rows, num_frames, latent_size), jnp.float32)
    return x * truncation if truncation != 1.0 else x


@functools.partial(jax.jit, static_argnums=(0,))
def join_prefix(module, params, cond, canvas, start_pos):
    """The conditions (every guidance pass) with the keys/values of the frames before start_pos:
    `canvas` (B, S, 128) holds them, zeros after (the latent encoder is causal). Computed once per
    block; the prefix stays in every guidance pass, as training keeps it (train_pretrain.prefix_inputs)."""
    kv = module.apply({"params": params}, canvas, method=model.EchoDiT.encode_prefix)
    passes = cond["mask"].shape[0] // canvas.shape[0]
    kv = {name: jnp.concatenate([a] * passes, axis=1) for name, a in kv.items()}
    return model.with_prefix(cond, kv, start_pos, module.config.encoder_patch_size)


def sample_latents(module, params, text_ids, text_mask, speaker_latent, speaker_mask, *, num_frames=375,
                   blocks=None, prefix=None, **sampler):
    """Euler from t=1 to 0 with classifier-free guidance -> (B, frames, 128) float32 numpy: one
    canvas of num_frames, or, for a blockwise model, `blocks` after `prefix` (sample_blocks)."""
    parts = list(sample_blocks(module, params, text_ids, text_mask, speaker_latent, speaker_mask,
                               blocks=blocks or [num_frames], prefix=prefix, **sampler))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def sample_blocks(module, params, text_ids, text_mask, speaker_latent, speaker_mask, *, blocks, prefix=None,
                  steps=32, cfg_scale=3.0, cfg_text=None, cfg_speaker=None, cfg_min_t=0.0, cfg_max_t=1.0, seed=42,
                  truncation=1.0, rescale_k=None, rescale_sigma=None, speaker_kv_scale=None, speaker_kv_min_t=0.9,
                  speaker_kv_max_layers=None, t_scale=1.0, sway=None, timings=None, progress=True):
    """Yields the generated frames block by block, (B, frames, 128) float32 numpy each: `blocks`
    lists each block's frames. One block is one canvas (any model); several, or a `prefix` (B, P,
    128) to continue, need a blockwise model: every block but the last, and P, a multiple of the
    patch size, each block conditioned on every frame before it. A block starting at frame s
    samples the last frames of the noise of a canvas of s + its frames (serve.py draws it so too).

    --cfg_scale alone is joint guidance (v_c + s (v_c - v_uncond)); --cfg_text / --cfg_speaker make
    it independent (three passes batched as one). Guidance applies for t in [cfg_min_t, cfg_max_t].
    Echo's knobs: the initial noise times `truncation`; temporal score rescaling (`rescale_k`,
    `rescale_sigma`); speaker keys/values of the first `speaker_kv_max_layers` layers (default all)
    times `speaker_kv_scale` while t >= `speaker_kv_min_t`; the grid times `t_scale`; `sway`.
    """
    timings = {} if timings is None else timings
    knobs = {k: v for k, v in locals().items() if k in SAMPLER_DEFAULTS}
    config = module.config
    mode, schedule = RowSchedule.from_knobs(knobs, config.num_layers)
    inputs = tuple(jnp.asarray(a) for a in (np.asarray(text_ids, np.int32), np.asarray(text_mask, np.int32),
                                            np.asarray(speaker_latent, np.float32),
                                            np.asarray(speaker_mask, np.int32)))
    rows = inputs[0].shape[0]
    done = 0 if prefix is None else prefix.shape[1]
    canvas = None  # every frame so far, for the prefix of the next block
    if prefix is not None or len(blocks) > 1:
        patch = config.encoder_patch_size
        if not config.blockwise or done % patch or any(frames % patch for frames in blocks[:-1]):
            raise ValueError(f"several blocks, or a prefix, need a blockwise model, and the prefix and every block "
                             f"but the last a multiple of {patch} frames (check_prefix_path, block_frames)")
        canvas = np.zeros((rows, -(-(done + sum(blocks)) // patch) * patch, config.latent_size), np.float32)
        if prefix is not None:
            canvas[:, :done] = prefix
    t0 = time.perf_counter()
    encode = compiled_encode(module, mode, params, inputs)
    cond = encode(params, *inputs)
    forced = schedule.forced_cond(cond, inputs[0].shape[1]) if schedule.force is not None else None
    timings["compile"] = timings.get("compile", 0.0) + time.perf_counter() - t0
    replicated = _replicated(params)
    for frames in blocks:
        t0 = time.perf_counter()
        block_cond, block_forced = cond, forced
        if canvas is not None and done:  # the first block of a canvas has nothing before it to attend
            start = np.int32(done)
            block_cond = join_prefix(module, params, cond, canvas, start)
            block_forced = None if forced is None else join_prefix(module, params, forced, canvas, start)
        step = compiled_step(module, params, rows, frames, block_cond)
        t1 = time.perf_counter()
        timings["compile"] = timings.get("compile", 0.0) + t1 - t0
        x = initial_noise(seed, rows, done + frames, config.latent_size, truncation)[:, done:]
        if replicated is not None:  # the same noise on every host, as one replicated global array
            local = np.asarray(x)
            x = jax.make_array_from_callback(local.shape, replicated, lambda index: local[index])
        start_pos = np.full(rows, done, np.int32)
        for k in tqdm(range(steps), desc="sampling", unit="step", disable=not progress, leave=False):
            x = step(params, x, block_forced if schedule.forced(k) else block_cond,
                     *step_inputs([schedule] * rows, [k] * rows), start_pos)
        if not x.is_fully_addressable:  # params sharded over several hosts (the trainer's eval)
            x = multihost_utils.process_allgather(x, tiled=True)
        x = np.array(x)  # a writable copy on the host
        timings["sampling"] = timings.get("sampling", 0.0) + time.perf_counter() - t1
        if canvas is not None:
            canvas[:, done:done + frames] = x
        done += frames
        yield x


def trim_trailing_silence(latent, silence_frame, tolerance=0.5, tail_frames=TAIL_FRAMES):
    """Cut the silence frames the model ends speech with: keep `tail_frames` after the last frame
    whose RMS distance to `silence_frame` is at least `tolerance`. Never cuts into speech."""
    if silence_frame is None or tolerance <= 0:
        return latent
    distance = np.sqrt(np.mean((latent - silence_frame[None]) ** 2, axis=1))
    speech = np.flatnonzero(distance >= tolerance)
    end = (speech[-1] + 1 + tail_frames) if len(speech) else tail_frames
    return latent[:min(len(latent), end)]


def crossfade_join(segments, sample_rate=SAMPLE_RATE, seconds=CROSSFADE_SECONDS):
    """Join waveforms with a short linear crossfade."""
    out = segments[0]
    for seg in segments[1:]:
        n = min(int(seconds * sample_rate), len(out), len(seg))
        fade = np.linspace(0.0, 1.0, n, dtype=np.float32)
        out = np.concatenate([out[:len(out) - n], out[len(out) - n:] * (1 - fade) + seg[:n] * fade, seg[n:]])
    return out


def check_prefix_path(loaded, blocks, continue_from):
    if (blocks is not None or continue_from is not None) and not loaded.config.blockwise:
        raise InferenceError("this checkpoint has no latent-prefix path (its preset is not -blockwise), so it "
                             "samples one canvas: drop --blocks and --continue_from")


def synthesize(loaded, codec, text, *, speaker_ref=None, reference=None, seed=42, duration=30.0, trim_tolerance=0.5,
               canvas=DEFAULT_CANVAS, blocks=None, continue_from=None, timings=None, progress=True,
               return_latent=False, **sampler):
    """Text (+ a reference audio path, or an already encoded `reference`) -> 48 kHz float32 waveform,
    or (waveform, latent) with return_latent: the generated latent, trimmed, before decoding.

    canvas "trained" samples the model's trained number of frames (what it always saw, padded
    with silence) and cuts the result to `duration`; "duration" samples only `duration` frames.
    A blockwise checkpoint samples the canvas block by block with `blocks` (block_frames' form,
    e.g. "24,24,rest"), and continues `continue_from` (frames (P, 128), continuation_prefix'):
    the result then holds those frames and their continuation (a long text's later chunks start
    afresh). `sampler` takes any knob of SAMPLER_DEFAULTS (steps, cfg_scale, ..., sway)."""
    import torch  # the codec's, imported where audio is: the trainer uses the sampler alone

    unknown = set(sampler) - set(SAMPLER_DEFAULTS)
    if unknown:
        raise TypeError(f"synthesize() got unknown sampler settings {sorted(unknown)}")
    timings = {} if timings is None else timings
    chunks = prepare_text(text, loaded.max_text_len)
    if reference is None and speaker_ref is not None:
        reference = encode_reference(speaker_ref, codec, loaded.max_speaker_len)
    if reference is None:
        reference = (np.zeros((loaded.max_speaker_len, loaded.config.latent_size), np.float32),
                     np.zeros(loaded.max_speaker_len, np.int32))
    if canvas not in CANVASES:
        raise InferenceError(f"canvas must be one of {', '.join(CANVASES)}, got {canvas!r}")
    check_prefix_path(loaded, blocks, continue_from)
    # The model continues from the recording's last frames, at most half its trained length, so the
    # continuation has room within the positions it was trained on.
    patch = loaded.config.encoder_patch_size
    context = 0 if continue_from is None else min(len(continue_from), loaded.max_latent_len // 2 // patch * patch)
    cap = frames_for(duration, loaded.max_latent_len - context)
    num_frames = loaded.max_latent_len - context if canvas == "trained" else cap
    frames = [num_frames] if blocks is None else block_frames(blocks, num_frames, patch)
    silence = loaded.silence_frame
    if silence is None:
        silence = codec_silence_frame(codec)
    segments, latents = [], []
    for i, (ids, mask) in enumerate(chunks):
        given = continue_from if i == 0 and continue_from is not None else np.zeros((0, loaded.config.latent_size))
        latent = sample_latents(loaded.module, loaded.params, ids[None], mask[None], reference[0][None],
                                reference[1][None], seed=seed + i, blocks=frames, timings=timings,
                                prefix=given[None, len(given) - context:] if len(given) else None, progress=progress,
                                **sampler)[0]
        latent = np.concatenate([given.astype(np.float32), latent])
        latent = trim_trailing_silence(latent, silence, trim_tolerance)[:len(given) + cap]
        latents.append(latent)
        t0 = time.perf_counter()
        wave = codec.decode(torch.from_numpy(np.ascontiguousarray(latent.T))[None])[0, 0].numpy()
        timings["decoding"] = timings.get("decoding", 0.0) + time.perf_counter() - t0
        segments.append(wave)
    wave = crossfade_join(segments)
    return (wave, np.concatenate(latents)) if return_latent else wave


@functools.lru_cache(maxsize=4)
def codec_silence_frame(codec):
    """The codec's own silence latent frame (median over 2 s of digital silence)."""
    import dacvae  # with torch, where audio is: the trainer uses the sampler alone
    return np.median(dacvae.silence_latent(codec, 2.0).astype(np.float32), axis=0)


# ----------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", help="a training checkpoint directory (its newest step) or one of its step_XXXXXXX "
      "directories, a weights-only step_XXXXXXX.params.pkl, or a full pickle (train_pretrain.py export)")
    a("--weights", choices=("ema", "raw"), default=None, help="the checkpoint's EMA weights or its raw ones "
      "(default: EMA where it has them)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="the words to speak")
    src.add_argument("--text_file", help="a text file: one utterance per non-empty line, one wav each")
    src.add_argument("--input_jsonl", help='JSON Lines: {"text": ..., optional "speaker_ref" (relative to the '
                     'file), "seed", "output"}')
    voice = p.add_mutually_exclusive_group()
    voice.add_argument("--speaker_ref", default=None, help="reference audio of the voice to clone (any format "
                       "soundfile reads)")
    voice.add_argument("--speaker_latent", default=None, help="a precomputed reference latent instead: .npy of "
                       "shape (frames, 128), e.g. a shard's KEY.ref.npy")
    a("--output", default="output.wav", help="output wav; with --text_file/--input_jsonl, an output directory")
    a("--save_latent", default=None, help="also write the generated latent (trimmed, before decoding) as .npy "
      "(frames, 128) float16, the shards' format; with batch input, a directory: one NAME.npy per NAME.wav")
    # Sampler knobs: None means "not given", so a --sampler_preset value or the default applies.
    a("--sampler_preset", default=None, help=f"named settings: {', '.join(SAMPLER_PRESETS)} (Echo's), or one of "
      "--sampler_presets FILE; flags given explicitly override it")
    a("--sampler_presets", default=None, help="JSON file of more presets: {NAME: {knob: value}} (Echo's "
      "sampler_presets.json works as it is)")
    a("--list_presets", action="store_true", help="print every preset and its settings, then exit")
    a("--cfg_scale", type=float, default=None, help="joint guidance scale, text and speaker together (default 3.0)")
    a("--cfg_text", type=float, default=None, help="independent text guidance scale (the other defaults to "
      "--cfg_scale)")
    a("--cfg_speaker", type=float, default=None, help="independent speaker guidance scale (the other defaults to "
      "--cfg_scale)")
    a("--cfg_min_t", type=float, default=None, help="guidance applies for t >= this (t=1 is noise; default 0)")
    a("--cfg_max_t", type=float, default=None, help="guidance applies for t <= this (default 1)")
    a("--steps", type=int, default=None, help="Euler steps (default 32)")
    a("--truncation", type=float, default=None, help="initial noise times this (Echo's -Flat presets: 0.8; "
      "default 1)")
    a("--rescale_k", type=float, default=None, help="temporal score rescaling k (with --rescale_sigma; off by "
      "default)")
    a("--rescale_sigma", type=float, default=None, help="temporal score rescaling sigma (with --rescale_k)")
    a("--speaker_kv_scale", type=float, default=None, help="speaker 'force': scale the speaker keys/values "
      "(off by default)")
    a("--speaker_kv_min_t", type=float, default=None, help="... while t >= this (default 0.9)")
    a("--speaker_kv_max_layers", type=int, default=None, help="... in the first N decoder layers (default all)")
    a("--t_scale", type=float, default=None, help="timestep grid scale: linspace(1, 0, steps + 1) * this "
      "(default 1.0; Echo's presets 0.999)")
    a("--sway", type=float, default=None, help="F5-TTS sway sampling coefficient (e.g. -1: more steps near "
      "noise; off by default)")
    a("--duration", type=float, default=15.0, help="maximum seconds of output (25 latent frames per second), "
      "capped at the model's trained length")
    a("--canvas", default=DEFAULT_CANVAS, choices=CANVASES, help="frames to sample: only --duration's (default; "
      "see README) or the model's trained length, then cut to --duration")
    a("--blocks", default=None, help="blockwise checkpoints (a -blockwise preset): sample the canvas block by block, "
      "each block conditioned on every frame before it, so the first audio exists after the first block: frames "
      "per block, each a multiple of 4 (0.16 s), the last may be 'rest' (e.g. 24,48,rest)")
    a("--continue_from", default=None, help="blockwise checkpoints: continue this recording (audio, or its latent "
      ".npy of shape (frames, 128)); --text is then the whole utterance's text, the recording's words included, and "
      "the output holds the recording (through the codec) and its continuation")
    a("--seed", type=int, default=42, help="noise seed: the same seed gives bit-identical output on one machine")
    a("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    a("--dacvae_weights", default=None, help="local DACVAE weights.pth or Hub repo id (default $DACVAE_WEIGHTS, "
      "else facebook/dacvae-watermarked)")
    a("--trim_tolerance", type=float, default=0.5, help="RMS latent distance under which a trailing frame counts "
      "as silence (0: no trimming)")
    a("--compile_cache_dir", default=os.path.expanduser("~/.cache/echo_jax"), help="persistent compilation cache "
      "('' to disable)")
    return p.parse_args(argv)


def sampler_presets(args):
    presets = dict(SAMPLER_PRESETS)
    if args.sampler_presets:
        presets.update(load_sampler_presets(args.sampler_presets))
    return presets


def resolve_sampler(args):
    """The sampler knobs: defaults, then the preset's values, then the flags given explicitly."""
    explicit = {k: getattr(args, k) for k in SAMPLER_DEFAULTS if getattr(args, k) is not None}
    return resolve_knobs(args.sampler_preset, sampler_presets(args), explicit)


def resolve_knobs(preset_name, presets, explicit, flag=lambda name: f"--{name}"):
    """SAMPLER_DEFAULTS, then preset `preset_name`'s values (None: none), then the `explicit` knobs.
    `flag` spells a knob's name in an error (serve.py's are JSON fields, not flags)."""
    preset = {}
    if preset_name is not None:
        if preset_name not in presets:
            raise InferenceError(f"unknown {flag('sampler_preset')} {preset_name!r}; known presets: "
                                 f"{', '.join(presets)}")
        preset = presets[preset_name]
    return {**SAMPLER_DEFAULTS, **preset, **explicit}


def check_knobs(sampler, duration, trim_tolerance, flag=lambda name: f"--{name}"):
    """Every sampler knob (and the output's duration and trim tolerance) in range, else InferenceError."""
    if sampler["steps"] < 1:
        raise InferenceError(f"{flag('steps')} must be at least 1, got {sampler['steps']}")
    checked = [(k, sampler[k]) for k in SAMPLER_DEFAULTS] + [("duration", duration), ("trim_tolerance", trim_tolerance)]
    for name, value in checked:
        if value is not None and not np.isfinite(value):
            raise InferenceError(f"{flag(name)} must be a finite number, got {value}")
    if not duration > 0:
        raise InferenceError(f"{flag('duration')} must be positive, got {duration}")
    if not 0 <= sampler["cfg_min_t"] <= sampler["cfg_max_t"] <= 1:
        raise InferenceError(f"{flag('cfg_min_t')} {sampler['cfg_min_t']} and {flag('cfg_max_t')} "
                             f"{sampler['cfg_max_t']} must satisfy 0 <= min <= max <= 1")
    if (sampler["rescale_k"] is None) != (sampler["rescale_sigma"] is None):
        raise InferenceError(f"{flag('rescale_k')} and {flag('rescale_sigma')} go together: give both, or neither")
    if sampler["rescale_k"] is not None and not (sampler["rescale_k"] > 0 and sampler["rescale_sigma"] > 0):
        raise InferenceError(f"{flag('rescale_k')} and {flag('rescale_sigma')} must be positive")
    if not 0 < sampler["truncation"] or not 0 < sampler["t_scale"] <= 1:
        raise InferenceError(f"{flag('truncation')} must be positive and {flag('t_scale')} in (0, 1]")
    if sampler["speaker_kv_scale"] is not None and not sampler["speaker_kv_scale"] > 0:
        raise InferenceError(f"{flag('speaker_kv_scale')} must be positive, got {sampler['speaker_kv_scale']}")
    if sampler["speaker_kv_max_layers"] is not None and sampler["speaker_kv_max_layers"] < 1:
        raise InferenceError(f"{flag('speaker_kv_max_layers')} must be at least 1, got "
                             f"{sampler['speaker_kv_max_layers']}")
    if sampler["sway"] is not None and not -1 <= sampler["sway"] <= 1:
        raise InferenceError(f"{flag('sway')} must be in [-1, 1] (F5-TTS uses -1), got {sampler['sway']}")


def validate(args):
    """Every flag checked before anything heavy loads; returns the resolved sampler knobs."""
    if args.checkpoint is None:
        raise InferenceError("--checkpoint is required: a training checkpoint directory or a .pkl file")
    if args.text is None and args.text_file is None and args.input_jsonl is None:
        raise InferenceError("say what to speak: --text, --text_file or --input_jsonl")
    sampler = resolve_sampler(args)
    check_knobs(sampler, args.duration, args.trim_tolerance)
    if "://" not in args.checkpoint and not os.path.exists(args.checkpoint):  # gs:// is looked up when loaded
        raise InferenceError(f"checkpoint {args.checkpoint} does not exist")
    if args.blocks is not None:
        block_frames(args.blocks, None)
    for flag in ("speaker_ref", "speaker_latent", "continue_from"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            raise InferenceError(f"--{flag} {path} does not exist")
    if args.text is not None:
        _check_writable(args.output)
        if args.save_latent:
            _check_writable(args.save_latent, "--save_latent", ".npy")
        if not args.text.strip():
            raise InferenceError("the text is empty: pass the words to speak with --text")
    return sampler


def _check_writable(path, flag="--output", suffix=".wav"):
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InferenceError(f"{flag} {path} is a directory; name the {suffix} file to write")
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise InferenceError(f"cannot write {path}: directory {directory} does not exist or is not writable")


def read_jobs(args):
    """[(text, speaker_ref, seed, output_path)] for --text, --text_file or --input_jsonl."""
    if args.text is not None:
        return [(args.text, args.speaker_ref, args.seed, args.output)]
    path = args.text_file or args.input_jsonl
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise InferenceError(f"cannot read {path} ({getattr(e, 'strerror', None) or e})") from None
    if not lines:
        raise InferenceError(f"{path} holds no utterances")
    for flag, directory in (("--output", args.output), ("--save_latent", args.save_latent)):
        if directory is None:
            continue
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise InferenceError(f"{flag} {directory} must be a directory for batch input")
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise InferenceError(f"cannot create the {flag} directory {directory} ({e.strerror})") from None
    jobs = []
    for i, line in enumerate(lines, 1):
        name = f"{i:04d}.wav"
        text, ref, seed = line, args.speaker_ref, args.seed
        if args.input_jsonl:
            try:
                job = json.loads(line)
                if not isinstance(job, dict):
                    raise ValueError("not an object")
            except ValueError:
                raise InferenceError(f"{path} line {i} is not a JSON object") from None
            text, ref = job.get("text"), job.get("speaker_ref", ref)
            if isinstance(ref, str) and "speaker_ref" in job:  # a path in the file is relative to the file
                ref = os.path.join(os.path.dirname(os.path.abspath(path)), ref)
            seed = int(job["seed"]) if isinstance(job.get("seed"), int) else seed
            if isinstance(job.get("output"), str) and job["output"].strip():
                # A name only: a line of the input never writes outside the output directory.
                name = os.path.basename(job["output"].strip()) or name
                name = name if name.lower().endswith(".wav") else name + ".wav"
        jobs.append((text, ref, seed, os.path.join(args.output, name)))
    return jobs


def latent_path(args, output):
    """Where --save_latent writes the latent of the job whose wav is `output` (None: not asked)."""
    if not args.save_latent:
        return None
    if args.text is not None:
        return args.save_latent
    return os.path.join(args.save_latent, os.path.splitext(os.path.basename(output))[0] + ".npy")


def save_latent(path, latent):
    """(frames, 128) float16, written atomically: the shards' target format."""
    try:
        storage.write_atomically(path, lambda f: np.save(f, latent.astype(np.float16), allow_pickle=False))
    except OSError as e:
        raise InferenceError(f"cannot write {path} ({e.strerror or e})") from None


def list_presets(args):
    for name, preset in sampler_presets(args).items():
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in preset.items()))


def run(args):
    import dacvae  # with torch, where audio is: the trainer uses the sampler alone

    sampler = validate(args)
    if args.compile_cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jobs = read_jobs(args)
    t0 = time.perf_counter()
    try:
        loaded = load_model(args.checkpoint, args.dtype, args.weights)
        codec = dacvae.DACVAE.load(args.dacvae_weights, flag="--dacvae_weights")
    except (checkpoint.CheckpointError, dacvae.DACVAEError) as e:
        raise InferenceError(str(e)) from None
    if codec.codebook_dim != loaded.config.latent_size:
        raise InferenceError(f"the codec's {codec.codebook_dim}-dim latents do not fit the model's "
                             f"{loaded.config.latent_size}-dim latents")
    if sampler["speaker_kv_max_layers"] is not None and sampler["speaker_kv_max_layers"] > loaded.config.num_layers:
        raise InferenceError(f"--speaker_kv_max_layers {sampler['speaker_kv_max_layers']} exceeds the model's "
                             f"{loaded.config.num_layers} decoder layers")
    latent_reference = None
    if args.speaker_latent:
        latent_reference = reference_from_latent(args.speaker_latent, loaded.max_speaker_len,
                                                 loaded.config.latent_size)
    check_prefix_path(loaded, args.blocks, args.continue_from)
    continue_from = None
    if args.continue_from:
        continue_from = continuation_prefix(args.continue_from, codec, loaded.config)
    timings = {"load": time.perf_counter() - t0}
    requested = int(round(args.duration * FRAMES_PER_SECOND))
    if requested > loaded.max_latent_len:
        log.warning("--duration %.1f s is longer than the model was trained for: capped at %.1f s", args.duration,
                    loaded.max_latent_len / FRAMES_PER_SECOND)
    references, summary = {}, []
    for text, ref, seed, output in jobs:
        entry = {"output": output, "text": text, "speaker_ref": ref, "seed": seed}
        try:
            if ref is not None and ref not in references:
                references[ref] = encode_reference(ref, codec, loaded.max_speaker_len)
            reference = references.get(ref) if ref is not None else latent_reference
            wave, latent = synthesize(loaded, codec, text, reference=reference, seed=seed, duration=args.duration,
                                      trim_tolerance=args.trim_tolerance, canvas=args.canvas, blocks=args.blocks,
                                      continue_from=continue_from, timings=timings,
                                      progress=True, return_latent=True, **sampler)
            dacvae.save_audio(output, wave, SAMPLE_RATE)
            entry.update(ok=True, seconds=round(len(wave) / SAMPLE_RATE, 3))
            path = latent_path(args, output)
            if path:
                save_latent(path, latent)
                entry["latent"] = path
        except (InferenceError, dacvae.DACVAEError) as e:
            if len(jobs) == 1:
                raise InferenceError(str(e)) from None
            entry.update(ok=False, error=str(e))
            log.error("%s: %s", output, e)
        summary.append(entry)
    audio_seconds = sum(e.get("seconds", 0) for e in summary)  # what was written, crossfades included
    rtf = (timings.get("sampling", 0) + timings.get("decoding", 0)) / max(audio_seconds, 1e-9)
    print(f"load {timings['load']:.2f}s, compile {timings.get('compile', 0):.2f}s, sampling "
          f"{timings.get('sampling', 0):.2f}s, decoding {timings.get('decoding', 0):.2f}s, "
          f"{audio_seconds:.2f}s of audio, real-time factor {rtf:.3f}", flush=True)
    if len(jobs) > 1 or args.text is None:
        ok = sum(e["ok"] for e in summary)
        storage.write_json(os.path.join(args.output, "summary.json"), summary)
        print(f"{ok} of {len(summary)} utterances written to {args.output} (summary.json)", flush=True)
        if ok < len(summary):
            raise InferenceError(f"{len(summary) - ok} of {len(summary)} utterances failed; see "
                                 f"{os.path.join(args.output, 'summary.json')}")
    return summary


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.list_presets:
            list_presets(args)
            return 0
        run(args)
    except InferenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # force: importing orbax (through checkpoint.py) logged through absl, which gave the root logger a
    # default handler already
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)
    sys.exit(main())
