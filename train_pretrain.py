"""Pretrain Echo: multi-host FSDP flow matching on TPU pods (or CPU, for the tiny preset).

Every worker of a pod runs this same command (see launch.sh); roles come from
jax.process_index(). The embedded default trains the demo preset on a learnable synthetic corpus
in under 10 minutes on a 2-core CPU, and scores what it generates on held-out texts:

    python train_pretrain.py --data synthetic
    python train_pretrain.py --preset 1.3B --data hf://datasets/ORG/REPO --silence_latent silence.npy \\
        --checkpoint_dir /mnt/disk/ckpt --metrics_file /mnt/disk/ckpt/metrics.jsonl

Checkpoints (checkpoint.py) are orbax step directories in --checkpoint_dir (gs://BUCKET/PATH, or a
directory every host sees). Process 0 writes a weights-only `step_XXXXXXX.params.pkl` of the last
one (and of every --export_every-th) in the background, for inference.py. `--resume auto` (the
default) continues bit-identically from the newest readable one, taking the run's own flags.
SIGTERM or SIGHUP makes every host checkpoint at the same step and exit 0.

    python train_pretrain.py export CHECKPOINT_DIR OUT.pkl    # the seed's full pickle format

The file reads top-down: flags, the objective, setup (model, mesh, optimizer, state layout: one
bundle the loop and the AOT compile share), data, the starting state, metrics, evaluation, the
loop, the AOT compile, main.
"""

import sys

sys.modules.setdefault("tensorflow", None)  # Hugging Face libraries must never pull TF in next to JAX

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import flax.serialization  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from etils import epath  # noqa: E402
from flax.traverse_util import path_aware_map  # noqa: E402
from jax.experimental import multihost_utils, topologies  # noqa: E402
from jax.scipy.special import ndtri  # noqa: E402

import checkpoint  # noqa: E402
import corpus  # noqa: E402
import data  # noqa: E402
import inference  # noqa: E402
import model  # noqa: E402
import pod  # noqa: E402
import storage  # noqa: E402
# Scripts outside this repository (acceptance checks, users' pod launchers) ask
# `train_pretrain.coordinator_port()` for the pod's rendezvous port; pod.py owns it.
from pod import coordinator_port  # noqa: E402,F401

log = logging.getLogger("train")

# Dense bf16 peak FLOP/s per chip, by device kind (jax.Device.device_kind); the first match wins.
PEAK_FLOPS = (("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
              ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("H100 PCIe", 756e12),
              ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
TIMESTEP_BUCKETS = 5
BLOCK_TO_END = 0.5  # blockwise training: the share of blocks that run to the canvas's end, as a last block does
PREFIX_STREAM = 1  # fold_in(step key, this): the prefix splits' randomness, apart from the step's own three
# The largest model a simulated pod compiles with unrolled scans: the demo sizes. Unrolled, the 840M
# step's temporaries grow from 4.0 to 8.8 GB per host, more than two hosts of a 24 GB machine hold.
UNROLL_MAX_PARAMS = 100_000_000


class TrainError(Exception):
    """A user-fixable problem (bad flag, bad data source, missing peer); main() prints one sentence."""


# ----------------------------------------------------------------------------
# Flags

def parse_args(argv=None):
    """The flags, with `explicit`: the names of those given on the command line (a resumed run takes
    every other flag from its checkpoint, see restore_flags)."""
    parser = build_parser()
    parser.error = refuse_command_line
    args = parser.parse_args(argv)
    args.explicit = sorted(vars(build_parser(suppress_defaults=True).parse_args(argv)))
    return args


def refuse_command_line(message):
    """argparse's error hook: one sentence through main(), which on a pod also stops the other hosts."""
    raise TrainError(f"{message} (python train_pretrain.py --help lists the flags)")


def build_parser(suppress_defaults=False):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def a(*names, **kw):
        p.add_argument(*names, **(dict(kw, default=argparse.SUPPRESS) if suppress_defaults else kw))
    a("--preset", default=None, help="model preset from model.PRESETS: 1.3B, 840M, demo or tiny (default: demo "
      "with --data synthetic, else tiny)")
    a("--data", default="synthetic", help="'synthetic' (generated in the run directory), a shard directory, "
      "glob, list file, or hf://datasets/ORG/REPO[@REV][/GLOB]; several mixed by weight as A:0.7,B:0.3")
    a("--synthetic_corpus", default="medium", help="with --data synthetic: 'medium' (4-12-byte strings over 16 "
      "letters, after 2-6-byte 'starter' strings for the first 70%% of the steps), 'short' (4-8 bytes over 8 "
      "letters), 'starter', 'words' (10-40-byte pseudo-sentences) or 'durations' (4-12 letters over 16, each "
      "lasting 1-6 frames by letter and speaker, as sounds do in speech)")
    a("--eval_data", default=None, help="held-out shards for val_loss (same forms as --data); default: the "
      "validation split of --data (val-*.tar, written by corpus.py build) where it has one; with --data "
      "synthetic, the corpus's held-out split")
    a("--accept_data_change", action="store_true", help="resume even though the shards of --data changed since "
      "the run started (the data order then changes); without it such a resume stops")
    a("--run_dir", default="runs/echo", help="directory for the synthetic corpus and default outputs")
    a("--steps", type=int, default=None, help="optimizer steps (default: 1,000,000; synthetic: 4000)")
    a("--global_batch_size", type=int, default=None, help="samples per step over all hosts (default 256; synthetic 32)")
    a("--grad_accum", type=int, default=1, help="split each step into this many micro-batches (same result)")
    a("--prefix_prob", type=float, default=0.0, help="blockwise presets (e.g. demo-blockwise): the fraction of "
      "samples cut to one block after a clean prefix of themselves, as blockwise generation cuts them (its start and "
      "end at random multiples of 4 frames; 0: none)")
    a("--lr", type=float, default=None, help="peak learning rate (default 1e-4; synthetic 2e-3)")
    a("--warmup_frac", type=float, default=0.05, help="linear warmup over this fraction of steps, then cosine to 0")
    a("--weight_decay", type=float, default=0.01, help="AdamW weight decay (not on biases, norms, AdaLN, gates)")
    a("--seed", type=int, default=0, help="seed for init, timesteps, noise, dropout and data order")
    a("--checkpoint_dir", default=None, help="where checkpoints go: gs://BUCKET/PATH, or a directory every host "
      "sees (default RUN_DIR/checkpoints)")
    a("--checkpoint_every", type=int, default=5000, help="steps between checkpoints (and one at the end)")
    a("--keep_checkpoints", type=int, default=3, help="keep only the newest N checkpoints (0: keep all)")
    a("--keep_period", type=int, default=0, help="also keep every checkpoint whose step is a multiple of this")
    a("--export_every", type=int, default=0, help="also write the weights-only step_XXXXXXX.params.pkl of every "
      "checkpoint whose step is a multiple of this (process 0, in the background; 0: only the last checkpoint "
      "of an invocation that ends normally)")
    a("--resume", default="auto", help="'auto' (the newest complete checkpoint in --checkpoint_dir), 'none', or "
      "a pickle of the seed's format (train_pretrain.py export writes one; a path every host reads, such as "
      "gs://...); checkpoints then go to --checkpoint_dir")
    a("--init_from", default=None, help="start from this checkpoint pickle's weights (its EMA weights where it "
      "has them) with a fresh optimizer at step 0; local or gs://")
    a("--metrics_file", default=None, help="JSON Lines metrics (default RUN_DIR/metrics.jsonl)")
    a("--log_every", type=int, default=1, help="steps between metrics lines")
    a("--eval_every", type=int, default=None, help="steps between validation (default 1000; synthetic 250)")
    a("--silence_latent", default=None, help=".npy silence latent that pads targets (python dacvae.py silence)")
    a("--max_latent_len", type=int, default=None, help="target frames per sample (default 768; synthetic 96)")
    a("--max_text_len", type=int, default=None, help="text bytes per sample incl. BOS (default 768; synthetic 64)")
    a("--max_speaker_len", type=int, default=None, help="speaker frames, multiple of 4 (default 768; synthetic 96)")
    a("--dtype", default=None, choices=("float32", "bfloat16"),
      help="compute dtype (default: bfloat16 on TPU, float32 elsewhere)")
    a("--remat", default=None, choices=("none", "full", "save_dots"),
      help="rematerialisation policy (default: save_dots, which fits 1.3B at batch 256 on a v4-64; synthetic: none)")
    a("--mesh_data", type=int, default=None, help="size of the 'data' mesh axis; the rest is 'fsdp' (default: "
      "FSDP over the most devices that split every width it shards, all of them at the presets' sizes)")
    a("--run_steps", type=int, default=None, help="stop this invocation after N steps, with a checkpoint (to fit "
      "a time slot); the schedule still follows --steps")
    a("--max_bad_steps", type=int, default=20, help="stop after this many non-finite steps in a row")
    a("--ema_decay", type=float, default=None, help="decay of the EMA weights, warmed up as min(decay, (1 + step) "
      "/ (10 + step)); 0 turns them off (default 0.9999; synthetic 0.99)")
    a("--eval_batches", type=int, default=4, help="global batches of held-out samples averaged into val_loss")
    a("--eval_samples", type=int, default=32, help="held-out texts sampled at each synthetic eval (0: val_loss only)")
    a("--full_eval_every", type=int, default=0, help="steps between full evals of a synthetic corpus (0: only at "
      "the run's end): --full_eval_samples held-out texts, 2 noise seeds, the sampler's defaults, and two controls "
      "(each text's letters shuffled; another sample's text)")
    a("--full_eval_samples", type=int, default=128, help="held-out texts of each full eval (0: no full eval)")
    a("--sample_steps", type=int, default=16, help="Euler steps when sampling at eval")
    a("--sample_cfg", type=float, default=2.0, help="joint guidance scale when sampling at eval")
    a("--sample_every", type=int, default=None, help="steps between audio samples of fixed prompts, generated "
      "with the EMA weights and decoded with --dacvae_weights (default 20000; synthetic 500; 0: never)")
    a("--sample_texts", default=None, help="text file, one prompt per line, for the audio samples (default: a few "
      "built-in sentences that fit --max_text_len, else the reference samples' own texts)")
    a("--dacvae_weights", default=os.environ.get("DACVAE_WEIGHTS"), help="DACVAE weights.pth (or Hub repo id) "
      "that decodes the audio samples (default $DACVAE_WEIGHTS); without it, no samples")
    a("--tensorboard_dir", default=None, help="also write every metric and the audio samples as TensorBoard events "
      "here (tensorboard --logdir DIR)")
    a("--profile_steps", default=None, metavar="A:B", help="write a jax.profiler trace of steps A to B (process 0) "
      "to --tensorboard_dir, else RUN_DIR/profile; open it in TensorBoard's profile plugin or xprof")
    a("--override", default=None, type=lambda v: [n.strip().lstrip("-") for n in v.split(",") if n.strip()],
      metavar="FLAG[,FLAG]", help="on resume, let these flags differ from the run's (e.g. steps,lr); each change "
      "is logged as an event")
    a("--aot_topology", default=None, help="compile for a TPU topology (e.g. v4-64, v4:2x2x1) and report memory")
    a("--compile_cache_dir", default=None, help="persistent compilation cache (default: beside a gs:// "
      "--checkpoint_dir, gs://.../jax_cache, which every host of a pod reads; else ~/.cache/echo_jax)")
    a("--distributed_timeout", type=int, default=pod.DISTRIBUTED_TIMEOUT_S,
      help="seconds to wait for all hosts to join")
    return p


# On resume, flags a run may change freely (logging, evals, checkpoints, outputs); per-invocation
# flags are never taken from the checkpoint; every other flag stays as the run started.
FREE_FLAGS = frozenset({"log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "keep_period",
                        "metrics_file",
                        "checkpoint_dir", "run_dir", "compile_cache_dir", "distributed_timeout", "tensorboard_dir",
                        "sample_every", "sample_texts", "dacvae_weights", "eval_data", "eval_batches", "eval_samples",
                        "full_eval_every", "full_eval_samples", "sample_steps", "sample_cfg", "max_bad_steps"})
PER_INVOCATION_FLAGS = frozenset({"run_steps", "resume", "init_from", "aot_topology", "profile_steps",
                                  "accept_data_change", "override"})
checkpoint.RUN_FLAGS_FILE = "run_flags.json"  # beside the checkpoints: the flags the run started with
METRICS_HISTORY_FILE = "metrics.jsonl"  # beside the checkpoints: a copy of the metrics at the last one


def run_flags(args):
    """The flags of a run as JSON (what restore_flags reads back)."""
    skip = PER_INVOCATION_FLAGS | {"explicit", "flag_changes", "profile_range"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def check_same_flags(args):
    """Every host must train the same run: a host started with other flags, or one that read another
    run_flags.json, stops the pod with one sentence (on every host at once)."""
    pinned = {k: v for k, v in run_flags(args).items() if k not in FREE_FLAGS}
    every = pod.gather_json(hashlib.sha256(json.dumps(pinned, sort_keys=True, default=str).encode()).hexdigest())
    differ = [str(i) for i, digest in enumerate(every) if digest != every[0]]
    if differ:
        raise TrainError(f"host(s) {', '.join(differ)} run with other flags than process 0 (started with another "
                         "command, or resuming from another run_flags.json); start every host with the same "
                         "command over a shared --checkpoint_dir")


def restore_flags(args):
    """Resume needs no flags: a run restarted with `--resume auto` (the default) over a checkpoint
    directory that holds a run takes every flag not given from it. A given flag that differs is
    refused unless it is free (FREE_FLAGS) or named in --override; overrides are kept in
    args.flag_changes and logged as events."""
    args.flag_changes = []
    if args.resume != "auto" or args.aot_topology:
        return args
    path = os.path.join(args.checkpoint_dir or os.path.join(args.run_dir, "checkpoints"), checkpoint.RUN_FLAGS_FILE)
    if not epath.Path(path).exists():
        return args  # a new run
    try:
        saved = storage.read_json(path)
        if not isinstance(saved, dict):
            raise ValueError
    except (OSError, ValueError):
        raise TrainError(f"{path} (the flags of the run to resume) is unreadable; restore it, or start a new run "
                         "in another --checkpoint_dir") from None
    overrides = set(args.override or [])
    unknown = overrides - set(saved) - set(vars(args))
    if unknown:
        raise TrainError(f"--override names unknown flag(s): {', '.join(sorted(unknown))}")
    for name, value in saved.items():
        if name in PER_INVOCATION_FLAGS or not hasattr(args, name):
            continue
        if name not in args.explicit:
            setattr(args, name, value)
            continue
        given = getattr(args, name)
        if given == value or name in FREE_FLAGS:
            continue
        if name not in overrides:
            raise TrainError(f"--{name} {given} contradicts this run's {value} (in {path}); drop --{name} to "
                             f"continue the run as it started, or add --override {name} to change it")
        args.flag_changes.append({"flag": name, "before": value, "after": given})
    log.info("resuming the run in %s with its own flags%s", os.path.dirname(path), "".join(
        f"; --{c['flag']} {c['before']} -> {c['after']}" for c in args.flag_changes))
    return args


def resolve_defaults(args):
    """Fill defaults that depend on --data synthetic; validate every flag before anything compiles."""
    synthetic = args.data == "synthetic" and not args.aot_topology  # AOT sizes the real run
    if args.synthetic_corpus not in corpus.SYNTHETIC_CORPORA:
        raise TrainError(f"--synthetic_corpus must be one of {', '.join(corpus.SYNTHETIC_CORPORA)}, "
                         f"got {args.synthetic_corpus!r}")
    defaults = dict(preset="tiny", steps=1_000_000, global_batch_size=256, lr=1e-4, eval_every=1000,
                    max_latent_len=768, max_text_len=768, max_speaker_len=768, remat="save_dots", ema_decay=0.9999,
                    sample_every=20000)
    if synthetic:
        latent_len, text_len, speaker_len = corpus.synthetic_lengths(args.synthetic_corpus)
        defaults.update(preset="demo", steps=4000, global_batch_size=32, lr=2e-3, eval_every=250,
                        max_latent_len=latent_len, max_text_len=text_len, max_speaker_len=speaker_len, remat="none",
                        ema_decay=0.99, sample_every=500)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.checkpoint_dir = args.checkpoint_dir or os.path.join(args.run_dir, "checkpoints")
    args.metrics_file = args.metrics_file or os.path.join(args.run_dir, "metrics.jsonl")
    if args.compile_cache_dir is None:
        # JAX writes cache entries from process 0 only (`_cache_write` in jax/_src/compiler.py): on a
        # worker's local disk the other hosts would never find one.
        args.compile_cache_dir = args.checkpoint_dir.rstrip("/").rsplit("/", 1)[0] + "/jax_cache" \
            if args.checkpoint_dir.startswith("gs://") else os.path.expanduser("~/.cache/echo_jax")
    if args.preset not in model.PRESETS:
        raise TrainError(f"--preset must be one of {', '.join(model.PRESETS)}, got {args.preset!r}")
    for name in ("steps", "global_batch_size", "grad_accum", "checkpoint_every", "log_every", "eval_every",
                 "eval_batches", "sample_steps", "max_latent_len", "max_text_len", "max_speaker_len",
                 "mesh_data", "max_bad_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise TrainError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_speaker_len % 4:
        raise TrainError(f"--max_speaker_len must be a multiple of 4, got {args.max_speaker_len}")
    check_prefix_training(args)
    if args.global_batch_size % args.grad_accum:
        raise TrainError(f"--global_batch_size {args.global_batch_size} must divide into --grad_accum "
                         f"{args.grad_accum} micro-batches")
    if not args.lr > 0 or not 0 <= args.warmup_frac < 1:
        raise TrainError("--lr must be positive and --warmup_frac in [0, 1)")
    if not args.weight_decay >= 0:
        raise TrainError(f"--weight_decay must not be negative, got {args.weight_decay}")
    if not 0 <= args.ema_decay < 1:
        raise TrainError(f"--ema_decay must lie in [0, 1) (0 turns EMA off), got {args.ema_decay}")
    for name in ("sample_every", "eval_samples", "full_eval_every", "full_eval_samples"):
        if getattr(args, name) < 0:
            raise TrainError(f"--{name} must not be negative, got {getattr(args, name)}")
    weights = args.dacvae_weights
    looks_local = weights and (weights.endswith((".pth", ".pt")) or weights.startswith((".", "/")))
    if looks_local and not os.path.exists(weights):
        raise TrainError(f"--dacvae_weights {weights}: no such file (give a weights.pth or a Hub repo id)")
    if args.sample_texts and not os.path.isfile(args.sample_texts):
        raise TrainError(f"--sample_texts {args.sample_texts}: no such file")
    args.profile_range = None
    if args.profile_steps:
        first, _, last = args.profile_steps.partition(":")
        try:
            args.profile_range = (int(first), int(last or first))
        except ValueError:
            args.profile_range = (0, 0)
        if not 1 <= args.profile_range[0] <= args.profile_range[1]:
            raise TrainError(f"--profile_steps takes A:B with 1 <= A <= B (steps to trace), got {args.profile_steps!r}")
    if args.resume not in ("auto", "none") and not checkpoint.checkpoint_file_exists(args.resume):
        raise TrainError(f"--resume {args.resume}: no such checkpoint file (a pickle of the seed's format; to "
                         "continue a run, give its --checkpoint_dir and --resume auto)")
    if args.keep_checkpoints < 0 or args.keep_period < 0:
        raise TrainError("--keep_checkpoints and --keep_period must not be negative (0: keep all, no period)")
    if args.init_from and not checkpoint.checkpoint_file_exists(args.init_from):
        raise TrainError(f"--init_from {args.init_from}: no such checkpoint file")
    if args.silence_latent and not os.path.isfile(args.silence_latent):
        raise TrainError(f"--silence_latent {args.silence_latent}: no such file")
    return args


def check_prefix_training(args):
    config = model.PRESETS[args.preset]
    if not 0 <= args.prefix_prob <= 1:
        raise TrainError(f"--prefix_prob must lie in [0, 1], got {args.prefix_prob}")
    if args.prefix_prob and not config.blockwise:
        raise TrainError(f"--prefix_prob trains the latent-prefix path, which --preset {args.preset} lacks: use "
                         f"--preset {args.preset}-blockwise (--init_from starts it from a checkpoint without it)")
    patch = config.encoder_patch_size
    if args.prefix_prob and (args.max_latent_len % patch or args.max_latent_len < 2 * patch):
        raise TrainError(f"--prefix_prob needs --max_latent_len a multiple of {patch} frames and at least "
                         f"{2 * patch} (a prefix and a block), got {args.max_latent_len}")


# ----------------------------------------------------------------------------
# The objective

def stratified_timesteps(rng, batch):
    """Stratified logit-normal t over the GLOBAL batch: one uniform u and one shift m."""
    ru, rm = jax.random.split(rng)
    u = jax.random.uniform(ru, ())
    m = jax.random.randint(rm, (), 0, batch)
    q = ((jnp.arange(batch) + m) % batch + u) / batch
    return jax.nn.sigmoid(ndtri(q))


def primer_steps(args):
    """How many first steps of a synthetic run train on its corpus's primer (0: none, or real data)."""
    if getattr(args, "data", None) != "synthetic" or getattr(args, "aot_topology", None):
        return 0
    chosen = corpus.SYNTHETIC_CORPORA[args.synthetic_corpus]
    return int(chosen.primer_fraction * args.steps) if chosen.primer else 0


def stage_lengths(args, which):
    """(max_latent_len, max_text_len, max_speaker_len) of the synthetic stage on corpus `which`: its
    own where the run keeps its corpus's lengths, else the run's for every stage."""
    run = (args.max_latent_len, args.max_text_len, args.max_speaker_len)
    return corpus.synthetic_lengths(which) if run == corpus.synthetic_lengths(args.synthetic_corpus) else run


def schedule_values(args):
    """The learning-rate schedule as numbers: [lr, primer steps, then for the primer's stage and for
    the rest: warm-up steps, decay steps, 1 / warm-up steps and pi / decay steps]. The train step
    takes them as values, not constants, so that runs of any length or learning rate share one
    compiled step."""
    primed = primer_steps(args)

    def stage(steps):
        warmup = max(int(args.warmup_frac * steps), 1)
        decay = max(steps, warmup + 1) - warmup
        return warmup, decay, 1 / np.float32(warmup), np.float32(np.pi) * (1 / np.float32(decay))
    return np.array([args.lr, primed, *stage(primed), *stage(args.steps - primed)], np.float32)


def learning_rate(count, values):
    """The learning rate at optimizer step `count` of the schedule `values` (schedule_values): a
    linear warm-up from 0 to lr, then a cosine decay to 0, over the primer's steps and again over the
    rest (a run without a primer has only the second)."""
    lr, primed, *stages = (values[i] for i in range(10))

    # optax.warmup_cosine_decay_schedule's operations as XLA compiles them when its numbers are
    # constants (a division by a constant becomes a product with its reciprocal, and products of
    # constants fold into one): the rates of the step as it was, to the bit, so a run trains exactly
    # as it did then.
    def warmup_cosine(count, warmup, decay, per_warmup, pi_per_decay):
        rising = (0.0 - lr) * (1 - jnp.clip(count, 0, warmup) * per_warmup) + lr
        falling = (1 + jnp.cos(jnp.minimum(count - warmup, decay) * pi_per_decay)) * (lr * 0.5)
        return jnp.where(count < warmup, rising, falling)
    count = jnp.asarray(count, jnp.float32)
    return jnp.where(count < primed, warmup_cosine(count, *stages[:4]), warmup_cosine(count - primed, *stages[4:]))


def make_optimizer(args, values=None):
    """AdamW under the learning_rate schedule of `values` (default: this run's schedule_values;
    the train step passes its traced ones). A run with a primer (data stages) restarts warm-up and
    decay at the switch, and restart_moments gives Adam fresh moments there."""
    values = schedule_values(args) if values is None else values

    def decay_mask(params):
        no_decay = re.compile(r"(bias|norm|adaln|cond_dense_global|wgate)")
        return path_aware_map(lambda path, _: not no_decay.search("/".join(path)), params)

    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(lambda count: learning_rate(count, values), b1=0.9, b2=0.99,
                                   weight_decay=args.weight_decay, mask=decay_mask))


def restart_moments(tx, opt_state, params):
    """The optimizer state of a new data stage: Adam's moments and step count as at the start (its
    bias correction starts over), while the schedule's count runs on into the stage's own warm-up."""
    kept = lambda node: isinstance(node, optax.ScaleByScheduleState)
    return jax.tree.map(lambda fresh, old: old if kept(fresh) else fresh, tx.init(params), opt_state, is_leaf=kept)


def flow_matching_pair(x0, noise, t):
    """The straight path from data (t = 0) to noise (t = 1): x_t and its velocity target."""
    t = t[:, None, None]
    return (1 - t) * x0 + t * noise, noise - x0


def cfg_dropout(rng, batch):
    """Which samples keep their text and their speaker: each dropped with probability 0.1, independently."""
    r_text, r_spk = jax.random.split(rng)
    keep_text = (jax.random.uniform(r_text, (batch,)) >= 0.1).astype(jnp.int32)
    keep_spk = (jax.random.uniform(r_spk, (batch,)) >= 0.1).astype(jnp.int32)
    return keep_text, keep_spk


def prefix_splits(rng, batch, frames, patch, prob):
    """(where each sample's block starts, where it ends) in frames: with probability 1 - prob the
    whole canvas (0, frames); else a block as blockwise sampling cuts them. Its start is uniform
    over the patch boundaries in [0, frames - patch] (0: a first block, with nothing before it); it
    runs to the canvas's end (a 'rest' block) with probability BLOCK_TO_END, else it ends at a
    boundary uniform over those after its start."""
    r_use, r_at, r_end, r_to_end = jax.random.split(rng, 4)
    patches = frames // patch
    at = jax.random.randint(r_at, (batch,), 0, patches)
    end = at + jax.random.randint(r_end, (batch,), 1, patches - at + 1)
    end = jnp.where(jax.random.uniform(r_to_end, (batch,)) < BLOCK_TO_END, patches, end)
    use = jax.random.uniform(r_use, (batch,)) < prob
    return jnp.where(use, at * patch, 0), jnp.where(use, end * patch, frames)


def continuation(x0, start, end):
    """Each row's frames [start, end) moved to the front: the block that follows its prefix, in a
    static shape so that one compiled step serves every block. The places after the block repeat
    the canvas's last frame; the mask (B, S) of the block's own frames keeps them out of the loss
    and out of the block's attention, as they do not exist when a block is sampled."""
    frames = x0.shape[1]
    index = jnp.arange(frames)[None, :] + start[:, None]
    block = jnp.take_along_axis(x0, jnp.minimum(index, frames - 1)[:, :, None], axis=1)
    return block, index < end[:, None]


def prefix_inputs(rng, x0, patch, prob):
    """Blockwise training (--prefix_prob): (the model's prefix inputs, the target frames). The
    inputs' frames_mask, the block's own frames, is also its loss weight. The prefix is the sample's own
    clean frames before its block (what generated blocks give at inference); the block's frames,
    at their own positions (start_pos), are the ones to generate. The prefix is kept in CFG's
    unconditional samples, as a sampler keeps it."""
    start, end = prefix_splits(rng, x0.shape[0], x0.shape[1], patch, prob)
    before = (jnp.arange(x0.shape[1])[None, :] < start[:, None])[:, :, None]
    block, frames_mask = continuation(x0, start, end)
    return {"prefix_latent": x0 * before, "start_pos": start, "frames_mask": frames_mask}, block


def run_values(args):
    """What the train step takes as values rather than constants (one compiled step serves runs
    that differ only in these): the seed, the learning-rate schedule, the EMA decay and the share of
    blockwise samples (whether there are EMA weights or blockwise samples at all shapes the step)."""
    return {"seed": np.asarray(args.seed, np.int32), "schedule": schedule_values(args),
            "ema_decay": np.asarray(args.ema_decay, np.float32),
            "prefix_prob": np.asarray(args.prefix_prob, np.float32)}


def build_train_step(module, args):
    """(state, batch, run_values) -> (state, metrics). state = {params, opt_state, step}; all
    randomness from fold_in(seed, step). Non-finite steps leave params and moments untouched."""
    accum = args.grad_accum

    def step_fn(state, batch, run):
        tx = make_optimizer(args, run["schedule"])
        rng = jax.random.fold_in(jax.random.key(run["seed"]), state["step"])
        r_t, r_noise, r_cfg = jax.random.split(rng, 3)
        x0 = batch["latent"]
        b = x0.shape[0]
        prefix, weight = {}, jnp.ones(x0.shape[:2], jnp.float32)
        if args.prefix_prob:
            prefix, x0 = prefix_inputs(jax.random.fold_in(rng, PREFIX_STREAM), x0, module.config.encoder_patch_size,
                                       run["prefix_prob"])
            weight = prefix["frames_mask"].astype(jnp.float32)
        t = stratified_timesteps(r_t, b)
        x_t, target = flow_matching_pair(x0, jax.random.normal(r_noise, x0.shape, jnp.float32), t)
        keep_text, keep_spk = cfg_dropout(r_cfg, b)
        inputs = dict(x=x_t, t=t, text_ids=batch["text_ids"], text_mask=batch["text_mask"] * keep_text[:, None],
                      speaker_latent=batch["speaker_latent"] * keep_spk[:, None, None].astype(jnp.float32),
                      speaker_mask=batch["speaker_mask"] * keep_spk[:, None], target=target, weight=weight, **prefix)
        valid_fraction = jnp.maximum(jnp.mean(batch["latent_mask"].astype(jnp.float32)), 1e-6)
        norm = x0.size * valid_fraction

        def micro_loss(params, micro):
            pred = module.apply({"params": params}, micro["x"], micro["t"], micro["text_ids"], micro["text_mask"],
                                micro["speaker_latent"], micro["speaker_mask"], micro.get("prefix_latent"),
                                micro.get("start_pos", 0), micro.get("frames_mask"))
            per_sample = jnp.sum(micro["weight"][:, :, None] * (pred - micro["target"]) ** 2, axis=(1, 2))
            return jnp.sum(per_sample) / norm, per_sample

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        if accum == 1:
            (loss, per_sample), grads = grad_fn(state["params"], inputs)
        else:
            micro = jax.tree.map(lambda a: a.reshape(accum, b // accum, *a.shape[1:]), inputs)

            def body(carry, mb):
                (l, ps), g = grad_fn(state["params"], mb)
                return jax.tree.map(jnp.add, carry, (l, g)), ps

            zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
            (loss, grads), per_sample = jax.lax.scan(body, zeros, micro, unroll=model.scan_unroll(module.config, accum))
            per_sample = per_sample.reshape(b)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {"params": keep(new_params, state["params"]), "opt_state": keep(new_opt, state["opt_state"]),
                     "step": state["step"] + 1}
        if "ema_params" in state:
            step = state["step"].astype(jnp.float32)
            decay = jnp.minimum(run["ema_decay"], (1 + step) / (10 + step))
            new_state["ema_params"] = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema_params"],
                                                   new_state["params"])
        # Loss by timestep bucket: per-sample MSE over frames normalised the same way as the loss.
        per_sample = per_sample / (x0[0].size * valid_fraction)
        bucket = jnp.clip((t * TIMESTEP_BUCKETS).astype(jnp.int32), 0, TIMESTEP_BUCKETS - 1)
        one_hot = jax.nn.one_hot(bucket, TIMESTEP_BUCKETS)
        bucket_loss = (one_hot * per_sample[:, None]).sum(0) / jnp.maximum(one_hot.sum(0), 1)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "bucket_loss": bucket_loss,
                   "bucket_count": one_hot.sum(0), "lr": learning_rate(state["step"], run["schedule"])}
        return new_state, metrics

    return step_fn


def build_eval_loss(module, args):
    """Loss on held-out batch `index` of --eval_batches, with fixed t (evenly spaced over all of
    them) and fixed noise: the same number for the same params, a meaningful curve."""

    def eval_fn(params, batch, index):
        x0 = batch["latent"]
        b = x0.shape[0]
        t = (index * b + jnp.arange(b) + 0.5) / (args.eval_batches * b)
        noise_key = jax.random.fold_in(jax.random.key(args.seed + 12345), index)
        noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
        x_t, target = flow_matching_pair(x0, noise, t)
        pred = module.apply({"params": params}, x_t, t, batch["text_ids"], batch["text_mask"],
                            batch["speaker_latent"], batch["speaker_mask"])
        valid_fraction = jnp.maximum(jnp.mean(batch["latent_mask"].astype(jnp.float32)), 1e-6)
        return jnp.mean((pred - target) ** 2) / valid_fraction

    return eval_fn


# ----------------------------------------------------------------------------
# Setup: the model, mesh, optimizer and state layout, one bundle shared by training and AOT compiles

def peak_flops(device_kind):
    """Peak FLOP/s of one chip of this kind, or None for a kind not in PEAK_FLOPS (then no MFU is
    reported rather than a wrong one)."""
    return next((peak for name, peak in PEAK_FLOPS if name.lower() in device_kind.lower()), None)


def model_config(args, backend):
    """The preset with the run's dtype (default bfloat16 on TPU) and remat. A simulated pod (several
    CPU processes, gloo) unrolls every loop that holds collectives (model.EchoConfig.unroll_scan),
    where that costs little memory."""
    dtype = args.dtype or ("bfloat16" if backend == "tpu" else "float32")
    config = dataclasses.replace(model.PRESETS[args.preset], dtype=dtype, remat=args.remat)
    if not pod.cpu_pod() or backend != "cpu":
        return config
    if model.count_params(config) <= UNROLL_MAX_PARAMS:
        log.info("simulated pod on CPU: layer scans unrolled, every collective in program order (see README, "
                 "'Training on a TPU pod')")
        return dataclasses.replace(config, unroll_scan=True)
    log.warning("simulated pod on CPU: the %s preset keeps its layer scans (unrolled, its step needs about twice the "
                "memory), and XLA:CPU may then call collectives in a different order on each host (see README, "
                "'Training on a TPU pod')", args.preset)
    return config


def fsdp_devices(config, devices):
    """The most devices, dividing `devices`, that split every parameter width FSDP shards ('embed')."""
    boxed = jax.tree.leaves(model.abstract_params(config), is_leaf=lambda x: isinstance(x, nn.Partitioned))
    widths = {size for leaf in boxed for size, name in zip(leaf.value.shape, leaf.names) if name == "embed"}
    return max(d for d in range(1, devices + 1) if devices % d == 0 and all(w % d == 0 for w in widths))


def make_mesh(mesh_data, config, devices):
    """The (data, fsdp) mesh over `devices`; --mesh_data None leaves FSDP as many as fsdp_devices()."""
    n = len(devices)
    mesh_data = mesh_data or n // fsdp_devices(config, n)
    if n % mesh_data:
        raise TrainError(f"--mesh_data {mesh_data} does not divide the {n} devices")
    return jax.make_mesh((mesh_data, n // mesh_data), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=devices)


def state_layout(config, tx, mesh, rules, ema):
    """(abstract train state, its shardings): params (and the float32 EMA weights) sharded by the
    model's logical axes, Adam moments like their params, counters replicated."""
    abstract = model.abstract_params(config)
    params = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_state = jax.eval_shape(tx.init, nn.unbox(abstract))
    shardings = {"params": params, "step": replicated,
                 "opt_state": optax.tree_map_params(tx, lambda _, s: s, opt_state, params,
                                                    transform_non_params=lambda _: replicated,
                                                    is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))}
    state = {"params": nn.unbox(abstract), "opt_state": opt_state, "step": jax.ShapeDtypeStruct((), np.int32)}
    if ema:
        shardings["ema_params"], state["ema_params"] = params, state["params"]
    return state, shardings


def batch_specs(args, sharding):
    """The global batch the step takes, as ShapeDtypeStructs (what the pipeline's arrays become)."""
    b, latent, text, speaker = args.global_batch_size, args.max_latent_len, args.max_text_len, args.max_speaker_len
    shapes = {"latent": ((b, latent, data.LATENT_SIZE), np.float32), "latent_mask": ((b, latent), np.int32),
              "text_ids": ((b, text), np.int32), "text_mask": ((b, text), np.int32),
              "speaker_latent": ((b, speaker, data.LATENT_SIZE), np.float32), "speaker_mask": ((b, speaker), np.int32)}
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}


@dataclasses.dataclass
class Setup:
    """What a run compiles: the model and its mesh, the optimizer, the train state's layout
    (`abstract_state`: ShapeDtypeStructs carrying their shardings) and the jitted step. Training
    calls `train_step` with `run_values` put on the devices; the AOT compile lowers the same one for
    a TPU topology."""
    config: model.EchoConfig
    module: model.EchoDiT
    mesh: jax.sharding.Mesh
    rules: tuple
    tx: optax.GradientTransformation
    run_values: dict
    abstract_state: dict
    state_shardings: dict
    batch_sharding: jax.sharding.NamedSharding
    train_step: object

    @property
    def replicated(self):
        return self.state_shardings["step"]

    @contextlib.contextmanager
    def sharding(self):
        """The mesh and the logical axis rules that every function of the model is traced under.
        Host-side work stays outside: under them, the reference-layout import of a pickle's numpy
        weights meets sharding constraints it cannot satisfy."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield


def setup_training(args, devices, backend):
    config = model_config(args, backend)
    mesh = make_mesh(args.mesh_data, config, devices)
    module, rules = model.EchoDiT(config), model.logical_axis_rules()
    tx = make_optimizer(args)
    abstract, shardings = state_layout(config, tx, mesh, rules, args.ema_decay > 0)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    replicated = shardings["step"]
    train_step = jax.jit(build_train_step(module, args), in_shardings=(shardings, batch_sharding, replicated),
                         out_shardings=(shardings, replicated), donate_argnums=(0,))
    return Setup(config, module, mesh, rules, tx, run_values(args), abstract, shardings, batch_sharding, train_step)


# ----------------------------------------------------------------------------
# Data: every host streams its own shards, in stages

@dataclasses.dataclass
class DataPlan:
    """The run's data: `stages` [(first step, data.DataConfig)] (a synthetic corpus with a primer
    trains on it first), the held-out source for val_loss (None: none) and the silence frames
    targets are padded with."""
    stages: list
    eval_source: str
    eval_split: str
    silence_latent: np.ndarray
    listings: dict  # source -> data.Listing: every source's shards, listed once, handed to every pipeline

    def stage(self, step):
        """The index of the stage that the batch of `step` (0-based) comes from."""
        return max(i for i, (first, _) in enumerate(self.stages) if first <= step)

    @property
    def config(self):
        """The main stage's data config (the last)."""
        return self.stages[-1][1]


def write_synthetic_corpora(args, process, processes):
    """The synthetic corpus of --data synthetic, its held-out split and its primer, written for this
    host under --run_dir (no shared disk needed) unless there already: (source, held-out, primer)."""
    chosen = corpus.SYNTHETIC_CORPORA[args.synthetic_corpus]
    name = lambda which: os.path.join(args.run_dir, f"synthetic-{which}-{args.seed}-{process}")
    source, held_out, primer = name(args.synthetic_corpus), name(args.synthetic_corpus) + "-held-out", None
    corpora = [(source, args.synthetic_corpus, False, max(chosen.shards, processes)),
               (held_out, args.synthetic_corpus, True, 1)]
    if primer_steps(args):
        primer = name(chosen.primer)
        corpora.append((primer, chosen.primer, False, max(corpus.SYNTHETIC_CORPORA[chosen.primer].shards,
                                                          processes)))
    for directory, which, is_held_out, shards in corpora:
        if not os.path.exists(os.path.join(directory, "silence_latent.npy")):
            corpus.make_synthetic(directory, shards=shards, samples_per_shard=512, seed=args.seed, corpus=which,
                                  held_out=is_held_out)
    return source, held_out, primer


def plan_data(args, process, processes):
    source, eval_source, eval_split, silence, primer = args.data, args.eval_data, "all", args.silence_latent, None
    if args.data == "synthetic":
        source, held_out, primer = write_synthetic_corpora(args, process, processes)
        eval_source, silence = eval_source or held_out, os.path.join(source, "silence_latent.npy")
    config = data.DataConfig(
        source=source, batch_size=args.global_batch_size // processes, seed=args.seed,
        max_latent_len=args.max_latent_len, max_text_len=args.max_text_len, max_speaker_len=args.max_speaker_len,
        silence_latent=silence, process_index=process, process_count=processes,
        accept_data_change=args.accept_data_change)
    stages = [(0, config)]
    if primer:
        latent_len, text_len, speaker_len = stage_lengths(args, corpus.SYNTHETIC_CORPORA[
            args.synthetic_corpus].primer)
        stages = [(0, dataclasses.replace(config, source=primer, max_latent_len=latent_len, max_text_len=text_len,
                                          max_speaker_len=speaker_len)), (primer_steps(args), config)]
    try:
        sources = data.parse_sources(source)
        listings = {each: data.list_source(each) for _, config in stages for each, _ in data.parse_sources(
            config.source)}
        for each, _ in sources:
            listings[each].split("train")
        if eval_source is None and args.data != "synthetic":
            with_val = [(s, w) for s, w in sources if listings[s].has("val")]
            if with_val:
                eval_source, eval_split = ",".join(f"{s}:{w}" for s, w in with_val), "val"
                log.info("val_loss on the validation split of %s", ", ".join(s for s, _ in with_val))
        silence_latent = data.load_silence(silence, min(args.max_latent_len, 250)).astype(np.float16)
    except data.DataError as e:
        raise TrainError(str(e)) from None
    return DataPlan(stages, eval_source, eval_split, silence_latent, listings)


def fixed_batches(plan, args, source, split, count, flag, listings, open_shards=None):
    """The first `count` global batches of a source, read alike on every host (validation sets,
    audio-sample references), from the shards `listings` pinned where they name the source."""
    config = dataclasses.replace(plan.config, source=source, batch_size=args.global_batch_size, process_index=0,
                                 process_count=1, split=split, open_shards=open_shards or plan.config.open_shards)
    try:
        pipeline = data.Pipeline(config, listings=listings)
    except data.DataError as e:
        raise TrainError(f"{flag}: {e}") from None
    try:
        batches = [next(pipeline) for _ in range(count)]
        return [{k: v for k, v in b.items() if isinstance(v, np.ndarray)} for b in batches]
    finally:
        pipeline.close()


def global_batch(setup, args, local):
    """This host's rows -> the global batch, sharded over the mesh (no host sees the others' rows)."""
    return {k: jax.make_array_from_process_local_data(setup.batch_sharding, v, (args.global_batch_size,) + v.shape[1:])
            for k, v in local.items() if isinstance(v, np.ndarray)}  # not the keys/sources lists


def data_position(data_states):
    """This host's data position among those a checkpoint holds (one per host that wrote it). On
    another number of hosts, every host continues at the start of the next epoch, on the same
    pinned data, and says so."""
    if not data_states:
        log.warning("the checkpoint holds no data position: every host's data stream starts from the beginning")
        return None
    if len(data_states) == jax.process_count():
        return data_states[jax.process_index()]
    position = data.start_of_next_epoch(data_states)
    epochs = sorted({source["epoch"] for source in position["sources"]})
    log.warning("the checkpoint holds the data positions of %d host(s), this run has %d: every host continues at the "
                "start of epoch %s on the same pinned data; the rest of the epoch before is skipped and samples "
                "seen in earlier epochs repeat as in any new epoch", len(data_states), jax.process_count(),
                "/".join(map(str, epochs)))
    return position


# ----------------------------------------------------------------------------
# The state a run starts from

def about(setup, plan, args):
    """What inference needs besides the weights, as JSON for a checkpoint's meta: the config, the
    trained lengths, and the silence the model learned to end speech with (trailing-silence trimming)."""
    return {"config": dataclasses.asdict(setup.config), "silence_latent": plan.silence_latent.tolist(),
            "max_lengths": {k: getattr(args, k) for k in ("max_latent_len", "max_text_len", "max_speaker_len")}}


def init_state(setup, seed):
    def init():
        params = nn.unbox(model.init_params(setup.config, jax.random.key(seed)))
        state = {"params": params, "opt_state": setup.tx.init(params), "step": jnp.zeros((), jnp.int32)}
        if "ema_params" in setup.abstract_state:
            state["ema_params"] = params
        return state

    with setup.sharding():
        return jax.jit(init, out_shardings=setup.state_shardings)()


def params_on_devices(setup, params, seed):
    """A host numpy tree of parameters -> sharded arrays, one at a time: each device receives only
    its shards. Parameters the tree lacks (the latent-prefix path of a blockwise model started from
    a checkpoint without it) start from their init with `seed`."""
    shardings, loaded = model.flatten(setup.state_shardings["params"]), model.flatten(params)
    fresh = {}
    if set(loaded) != set(shardings):
        with setup.sharding():
            fresh = model.flatten(jax.jit(lambda: nn.unbox(model.init_params(setup.config, jax.random.key(seed))),
                                          out_shardings=setup.state_shardings["params"])())
    return model.unflatten({path: put_on_devices(loaded[path], sharding) if path in loaded else fresh[path]
                            for path, sharding in shardings.items()})


def put_on_devices(array, sharding):
    return jax.make_array_from_callback(np.shape(array), sharding, lambda idx: np.asarray(array)[idx])


def state_from_numpy(setup, params, opt_state, step, ema_params=None, seed=0):
    """Host numpy trees -> the sharded train state (params_on_devices). A fresh optimizer where
    opt_state is None; EMA weights start from the params where none are given."""
    state = {"params": params_on_devices(setup, params, seed),
             "step": put_on_devices(np.asarray(step, np.int32), setup.replicated)}
    if opt_state is None:
        with setup.sharding():
            state["opt_state"] = jax.jit(setup.tx.init, out_shardings=setup.state_shardings["opt_state"])(
                state["params"])
    else:
        template = jax.eval_shape(setup.tx.init, params)
        state["opt_state"] = jax.tree.map(put_on_devices, flax.serialization.from_state_dict(template, opt_state),
                                          setup.state_shardings["opt_state"])
    if "ema_params" in setup.abstract_state:
        state["ema_params"] = params_on_devices(setup, params if ema_params is None else ema_params, seed)
    return state


def read_pickle(path):
    """A checkpoint pickle of the seed's format, read by every host (each keeps it in RAM only until
    its own shards are on its devices); any host that cannot read it stops them all."""
    try:
        payload, error = checkpoint.load_checkpoint_file(path), None
    except checkpoint.CheckpointError as e:
        payload, error = None, str(e)
    failed = pod.failed_hosts(error is None)
    if failed:
        raise TrainError(error or f"{path} is unreadable on host(s) {', '.join(map(str, failed))}: put it where "
                         "every host can read it")
    return payload


def start_state(args, setup, manager, metrics):
    """The train state a run starts from: the newest checkpoint in --checkpoint_dir (--resume auto),
    a pickle of the seed's format (--resume PATH), the weights of --init_from with a fresh optimizer,
    or a fresh init. Returns (state, the data positions of the hosts that wrote the checkpoint (None:
    a new stream), samples seen)."""
    if args.resume == "auto":
        restored = checkpoint.restore_newest(manager, setup.abstract_state)
        if restored is not None:
            state, meta = restored
            log.info("resumed from step %d in %s", meta["step"], args.checkpoint_dir)
            metrics.write(event="resumed", step=meta["step"])
            for change in args.flag_changes:
                metrics.write(event="flag_changed", step=meta["step"], **change)
            return state, meta.get("data_states") or [], meta["samples_seen"]
    elif args.resume != "none":
        payload = read_pickle(args.resume)
        params = checkpoint.params_from_checkpoint(payload, setup.config, args.resume)
        ema = checkpoint.params_from_checkpoint(payload, setup.config, args.resume, key="ema_params") \
            if "ema_params" in payload and args.ema_decay > 0 else None
        state = state_from_numpy(setup, params, payload.get("opt_state"), payload["step"], ema)
        log.info("resumed from step %d of %s; checkpoints go to %s", int(payload["step"]), args.resume,
                 args.checkpoint_dir)
        metrics.write(event="resumed", step=int(payload["step"]), path=args.resume)
        return state, payload.get("data_states") or [], payload.get("samples_seen", 0)
    if args.init_from:
        payload = read_pickle(args.init_from)
        key = "ema_params" if "ema_params" in payload else "params"
        params = checkpoint.params_from_checkpoint(payload, setup.config, args.init_from, key=key,
                                                   prefix_path_optional=True)
        log.info("starting from the %s weights of %s", "EMA" if key == "ema_params" else "raw", args.init_from)
        metrics.write(event="init_from", path=args.init_from, step=0)
        return state_from_numpy(setup, params, None, 0, seed=args.seed), None, 0
    return init_state(setup, args.seed), None, 0


# ----------------------------------------------------------------------------
# Metrics

class Metrics:
    """Append-only JSON Lines on process 0, flushed line by line (the source of truth), mirrored to
    TensorBoard events when a directory is given: step lines under train/, evals under eval/.
    A copy travels with the checkpoints (`history`: at each one, the lines since the last are
    appended to it): after a restart that puts process 0 on another worker, it replaces the shorter
    local file, so no history is lost."""

    def __init__(self, path, enabled, tensorboard_dir=None, history=None):
        if history and os.path.abspath(history) == os.path.abspath(path):
            history = None  # the metrics are written next to the checkpoints already
        self.file, self.tensorboard, self.path, self.history = None, None, path, history
        self.uploaded = 0  # bytes of the metrics file the history holds
        self.lock = threading.Lock()  # the audio-sample thread writes too
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if history:
                self.restore_history()
            self.file = open(path, "a", buffering=1)
            if tensorboard_dir:
                # torch's writer (torch comes with the codec), only for runs that ask for TensorBoard
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(tensorboard_dir)

    def write(self, **fields):
        if not self.file:
            return
        fields.setdefault("time", time.time())
        with self.lock:
            self.file.write(json.dumps(fields) + "\n")
            self.file.flush()
            event = fields.get("event")
            if self.tensorboard and "step" in fields and event in (None, "eval", "full_eval"):
                prefix = f"{event or 'train'}/"
                for tag, value in _numbers(fields, ("step", "time", "event")):
                    self.tensorboard.add_scalar(prefix + tag, value, fields["step"], walltime=fields["time"])

    def restore_history(self):
        saved = epath.Path(self.history)
        if not saved.exists():
            return
        local = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        self.uploaded = saved.stat().length
        if self.uploaded > local:
            log.info("metrics history restored from %s", self.history)
            with saved.open("rb") as history:
                storage.write_atomically(self.path, lambda f: shutil.copyfileobj(history, f, 1 << 20))

    def save_history(self):
        """Append the lines written since the last checkpoint to the history beside the checkpoints
        (process 0, after each checkpoint); the first time, copy the whole file."""
        if not (self.file and self.history):
            return
        with self.lock, open(self.path, "rb") as f:
            if not self.uploaded:
                storage.write_atomically(self.history, lambda out: shutil.copyfileobj(f, out, 1 << 20))
                self.uploaded = f.tell()
                return
            f.seek(self.uploaded)
            new = f.read()
        if new:
            storage.append_bytes(self.history, new)
            self.uploaded += len(new)

    def audio(self, tag, audio, step, sample_rate):
        if self.tensorboard:
            with self.lock:
                self.tensorboard.add_audio(tag, audio[None], step, sample_rate=sample_rate)

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()


def _numbers(fields, skip=(), prefix=""):
    """(tag, value) of every finite number in a metrics line, nested dicts as tag/subtag."""
    for key, value in fields.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            yield from _numbers(value, prefix=f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield prefix + key, value


# ----------------------------------------------------------------------------
# Audio samples: fixed prompts, generated on every host, decoded in the background on process 0

DEFAULT_SAMPLE_TEXTS = ("The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
                        "It is easy to tell the depth of a well.")
MAX_SAMPLE_PROMPTS = 8


def batch_texts(batch):
    """The (normalised) texts of a batch, from its byte ids."""
    return [bytes(ids[1:mask.sum()].astype(np.uint8)).decode("utf-8", "replace")
            for ids, mask in zip(batch["text_ids"], batch["text_mask"])]


def sample_prompts(args, reference):
    """The audio-sample prompts: texts (--sample_texts, else built-in sentences that fit, else the
    reference batch's own texts), each with a fixed speaker reference from `reference`."""
    if args.sample_texts:
        with open(args.sample_texts, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()][:MAX_SAMPLE_PROMPTS]
        too_long = [t for t in texts if data.encode_text(t, args.max_text_len) is None]
        if not texts or too_long:
            raise TrainError(f"--sample_texts {args.sample_texts}: " + (f"{len(too_long)} line(s) do not fit "
                             f"--max_text_len {args.max_text_len} bytes, e.g. {too_long[0][:40]!r}" if too_long
                                                                        else "holds no text"))
    else:
        texts = [t for t in DEFAULT_SAMPLE_TEXTS if data.encode_text(t, args.max_text_len) is not None]
        texts = texts or batch_texts(reference)[:3]
    encoded = [data.encode_text(t, args.max_text_len) for t in texts]
    rows = [i % len(reference["speaker_latent"]) for i in range(len(texts))]
    return texts, {"text_ids": np.stack([e[0] for e in encoded]), "text_mask": np.stack([e[1] for e in encoded]),
                   "speaker_latent": reference["speaker_latent"][rows], "speaker_mask": reference["speaker_mask"][rows]}


def write_spectrogram(path, audio, sample_rate):
    """A PNG of the audio's log-power spectrogram: 0-12 kHz, an 80 dB range, dark to bright."""
    from PIL import Image  # only where audio samples are written
    n_fft, hop = 1024, 256
    audio = np.pad(np.asarray(audio, np.float32), (0, max(0, n_fft - len(audio))))
    frames = np.lib.stride_tricks.sliding_window_view(audio, n_fft)[::hop] * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames, axis=1)[:, :n_fft * 12000 // sample_rate]) ** 2
    db = 10 * np.log10(power + 1e-12)
    level = np.clip((db - db.max() + 80) / 80, 0, 1).T[::-1]
    anchors = np.linspace(0, 1, 5)  # black, purple, red, orange, pale yellow
    colors = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)
    rgb = np.stack([np.interp(level, anchors, colors[:, c]) for c in range(3)], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb).resize((min(max(rgb.shape[1], 200), 800), 160))
    storage.write_atomically(path, lambda f: image.save(f, format="PNG"))


def samples_dir(run_dir, step):
    return os.path.join(run_dir, "samples", f"{step:07d}")


class AudioSamples:
    """Process 0's decoder of audio samples: a background thread turns generated latents into 48 kHz
    wavs, spectrogram PNGs and an index.json under RUN_DIR/samples/XXXXXXX (the step: a name no
    checkpoint has), then appends a {"event": "samples"} line naming the index (and the audio to
    TensorBoard)."""

    def __init__(self, args, metrics, texts, truth, silence_frame):
        import dacvae  # with torch: only process 0 of a run that writes audio samples needs the codec
        try:
            self.codec = dacvae.DACVAE.load(args.dacvae_weights, flag="--dacvae_weights")
        except dacvae.DACVAEError as e:
            raise TrainError(str(e)) from None
        self.save_audio = dacvae.save_audio
        self.run_dir = args.run_dir
        self.metrics, self.texts, self.truth, self.silence_frame = metrics, texts, truth, silence_frame
        self.truth_audio = None
        self.jobs = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def submit(self, step, latents, weights):
        self.jobs.put((step, latents, weights))

    def close(self):
        """Wait for the samples still being decoded."""
        self.jobs.put(None)
        self.thread.join()

    def _run(self):
        while (job := self.jobs.get()) is not None:
            try:
                self._write(*job)
            except Exception as e:  # a failed sample never stops training
                log.warning("audio samples of step %d failed: %s: %s", job[0], type(e).__name__, e)

    def _decode(self, latent):
        audio = self.codec.decode(np.asarray(latent, np.float32).T[None], progress=False)[0, 0].numpy()
        return np.clip(audio, -1, 1)  # as the wav holds it

    def _write(self, step, latents, weights):
        directory = samples_dir(self.run_dir, step)
        os.makedirs(directory, exist_ok=True)
        if self.truth_audio is None:
            self.truth_audio = self._decode(self.truth[1])
        clips = [(text, self._decode(inference.trim_trailing_silence(latent, self.silence_frame)), "generated")
                 for text, latent in zip(self.texts, latents)] + [(self.truth[0], self.truth_audio, "ground truth")]
        entries = []
        for i, (text, audio, kind) in enumerate(clips):
            name = f"{i:02d}-{'truth' if kind == 'ground truth' else 'generated'}"
            self.save_audio(os.path.join(directory, name + ".wav"), audio)
            write_spectrogram(os.path.join(directory, name + ".png"), audio, self.codec.sample_rate)
            entries.append({"text": text, "kind": kind, "wav": name + ".wav", "spectrogram": name + ".png",
                            "seconds": round(len(audio) / self.codec.sample_rate, 3)})
            self.metrics.audio(f"samples/{name}", audio, step, self.codec.sample_rate)
        index = os.path.join(directory, "index.json")
        storage.write_json(index, {"step": step, "weights": weights, "samples": entries})
        self.metrics.write(event="samples", step=step, index=os.path.abspath(index), weights=weights,
                           count=len(entries))


# ----------------------------------------------------------------------------
# Evaluation: val_loss on fixed held-out batches; for a synthetic corpus, what the sampler makes of
# held-out texts; audio samples of fixed prompts

def nmse(generated, truth, frames):
    """MSE of generated vs true latents over the valid frames, over that of the per-channel mean."""
    err, base = 0.0, 0.0
    for g, t, n in zip(generated, truth, frames):
        err += np.sum((g[:n] - t[:n]) ** 2)
        base += np.sum((t[:n] - t[:n].mean(axis=0)) ** 2)
    return float(err / max(base, 1e-12))


def recognition_scores(generated, texts, frames, seed, which):
    """synthetic_cer (edits over letters, all samples together) and synthetic_end_frames (mean
    |where the generated speech ends - where the true speech ends|): corpus.recognise on each whole
    generated canvas, against each sample's text as read in its true frames."""
    edits, letters, ends = 0, 0, []
    for g, text, n in zip(generated, texts, frames):
        said, end = corpus.recognise(g, seed, which)
        edits, letters = edits + corpus.edit_distance(said, text), letters + len(text)
        ends.append(abs(end - int(n)))
    return {"synthetic_cer": edits / max(letters, 1), "synthetic_end_frames": float(np.mean(ends))}


FULL_EVAL_SEEDS = 2  # noise seeds per text in a full eval
TEXT_START = 1 + len("[S1] ")  # a synthetic text's first letter in its ids: after BOS and the speaker tag


def text_controls(held_out, seed):
    """The controls of a full eval, as (text_ids, text_mask): each text's letters in a shuffled order
    (a seeded permutation), and the next sample's text (its own speaker)."""
    rng = np.random.default_rng(seed)
    shuffled = held_out["text_ids"].copy()
    for ids, length in zip(shuffled, held_out["text_mask"].sum(axis=1)):
        ids[TEXT_START:length] = rng.permutation(ids[TEXT_START:length])
    return {"_shuffled": (shuffled, held_out["text_mask"]),
            "_other_text": (np.roll(held_out["text_ids"], -1, axis=0), np.roll(held_out["text_mask"], -1, axis=0))}


class Evaluation:
    """The run's periodic looks at the model. Every host joins each (the weights are sharded over all
    of them); process 0 writes what they find."""

    def __init__(self, args, setup, plan, metrics, listings):
        self.args, self.setup, self.metrics = args, setup, metrics
        self.batches, self.held_out, self.full, self.prompts, self.audio = [], None, None, None, None
        eval_sets = []
        if plan.eval_source:
            samples = max(args.eval_samples, args.full_eval_samples) if args.data == "synthetic" else 0
            eval_sets = fixed_batches(plan, args, plan.eval_source, plan.eval_split,
                                      max(args.eval_batches, -(-samples // args.global_batch_size)), "--eval_data",
                                      listings)
            rows = slice(jax.process_index() * plan.config.batch_size, (jax.process_index() + 1) *
                         plan.config.batch_size)
            self.batches = [global_batch(setup, args, {k: v[rows] for k, v in b.items()})
                            for b in eval_sets[:args.eval_batches]]
            self.loss = jax.jit(build_eval_loss(setup.module, args), in_shardings=(
                setup.state_shardings["params"], setup.batch_sharding, setup.replicated))
        else:
            log.warning("no held-out data (--eval_data, or a synthetic corpus): no val_loss is reported")
        if args.data == "synthetic" and args.eval_samples:
            self.held_out = self.held_out_set(eval_sets, args.eval_samples)
        if args.data == "synthetic" and args.full_eval_samples:
            self.full = self.held_out_set(eval_sets, args.full_eval_samples)
        if args.sample_every and not args.dacvae_weights:
            log.warning("no --dacvae_weights (or $DACVAE_WEIGHTS): no audio samples are written")
        elif args.sample_every:
            if eval_sets:
                reference = eval_sets[0]
            else:
                log.warning("no held-out data: the audio samples take their speakers from training samples")
                reference = fixed_batches(plan, args, plan.config.source, "train", 1, "--data", listings,
                                          open_shards=1)[0]
            texts, self.prompts = sample_prompts(args, reference)
            if jax.process_index() == 0:
                frames = int(reference["latent_mask"][0].sum())
                truth = (batch_texts(reference)[0], reference["latent"][0, :frames])
                self.audio = AudioSamples(args, metrics, texts, truth,
                                          np.median(plan.silence_latent.astype(np.float32), axis=0))

    def due(self, step):
        """The looks at the model that fall on `step`, in order: eval, full eval, audio samples."""
        args = self.args
        return [look for look, falls in (
            (self.evaluate, self.batches and itstime(step, args.eval_every, args.steps)),
            (self.full_evaluate, self.full is not None and itstime(step, args.full_eval_every, args.steps)),
            (self.sample_audio, self.prompts is not None and itstime(step, args.sample_every))) if falls]

    def at(self, step, state):
        """Take the looks that fall on `step`. Returns the eval's fields, or None where none falls."""
        fields = None
        for look in self.due(step):
            result = look(step, state)
            if look == self.evaluate:
                fields = result
        return fields

    def evaluate(self, step, state):
        """val_loss (and val_loss_ema) on the held-out batches; where the corpus is synthetic,
        synthetic_nmse, synthetic_cer and synthetic_end_frames (and their _ema): one eval event.
        Returns its fields."""
        fields = {"step": step, "event": "eval"}
        with self.setup.sharding():
            for name, key in (("val_loss", "params"), ("val_loss_ema", "ema_params")):
                if key in state:
                    # Each loss is read before the next is dispatched: on CPU's fake devices, programs with
                    # collectives in flight at once are what the loop avoids (see the first step).
                    fields[name] = float(np.mean([float(self.loss(state[key], b, np.int32(i)))
                                                  for i, b in enumerate(self.batches)]))
            if self.held_out is not None:
                for suffix, key in (("", "params"), ("_ema", "ema_params")):
                    if key in state:
                        scores = self.synthetic_scores(state[key])
                        fields.update({name + suffix: value for name, value in scores.items()})
        self.metrics.write(**fields)
        return fields

    def held_out_set(self, eval_sets, count):
        """The first `count` held-out samples, their valid frames and their texts as the recogniser
        reads them in the true frames (read once here, not at every eval)."""
        held_out = {k: np.concatenate([b[k] for b in eval_sets])[:count] for k in eval_sets[0]}
        frames = held_out["latent_mask"].sum(axis=1)
        texts = [corpus.recognise(t[:n], self.args.seed, self.args.synthetic_corpus)[0]
                 for t, n in zip(held_out["latent"], frames)]
        return dict(held_out, frames=frames, texts=texts)

    def synthetic_scores(self, params):
        """Generate the held-out texts with inference.py's sampler and score them."""
        held_out, args = self.held_out, self.args
        generated = inference.sample_latents(
            self.setup.module, params, held_out["text_ids"], held_out["text_mask"], held_out["speaker_latent"],
            held_out["speaker_mask"], steps=args.sample_steps, cfg_scale=args.sample_cfg, seed=args.seed + 7,
            num_frames=args.max_latent_len, progress=False)
        return self.scores(generated, held_out)

    def scores(self, generated, held_out, copies=1):
        """synthetic_nmse, synthetic_cer and synthetic_end_frames of latents generated for `copies`
        passes over the held-out samples, one after the other."""
        tile = lambda a: np.concatenate([a] * copies)
        args = self.args
        return {"synthetic_nmse": nmse(generated, tile(held_out["latent"]), tile(held_out["frames"])),
                **recognition_scores(generated, held_out["texts"] * copies, tile(held_out["frames"]), args.seed,
                                     args.synthetic_corpus)}

    def full_evaluate(self, step, state):
        """The full eval: --full_eval_samples held-out texts, FULL_EVAL_SEEDS noise seeds, the
        sampler's defaults (inference.py's), the raw weights; and the same with the controls of
        text_controls, scored against each sample's own text and frames. A model that reads the text
        scores far worse under both. One full_eval event; returns its fields."""
        held_out, args = self.full, self.args
        variants = {"": (held_out["text_ids"], held_out["text_mask"]), **text_controls(held_out, args.seed + 17)}
        rows = len(held_out["frames"])
        speaker = [np.concatenate([held_out[k]] * len(variants)) for k in ("speaker_latent", "speaker_mask")]
        with self.setup.sharding():
            generated = [inference.sample_latents(
                self.setup.module, state["params"], np.concatenate([ids for ids, _ in variants.values()]),
                np.concatenate([mask for _, mask in variants.values()]), *speaker, seed=args.seed + 13 + k,
                num_frames=args.max_latent_len, progress=False) for k in range(FULL_EVAL_SEEDS)]
        fields = {"step": step, "event": "full_eval", "samples": rows, "seeds": FULL_EVAL_SEEDS}
        for i, suffix in enumerate(variants):
            latents = np.concatenate([g[i * rows:(i + 1) * rows] for g in generated])
            fields.update({name + suffix: value
                           for name, value in self.scores(latents, held_out, FULL_EVAL_SEEDS).items()})
        self.metrics.write(**fields)
        return fields

    def sample_audio(self, step, state):
        """Generate the fixed prompts (EMA weights where there are some); process 0 decodes them in
        the background."""
        weights = "ema_params" if "ema_params" in state else "params"
        with self.setup.sharding():
            latents = inference.sample_latents(self.setup.module, state[weights], **self.prompts,
                                               steps=self.args.sample_steps, cfg_scale=self.args.sample_cfg,
                                               seed=self.args.seed + 11, num_frames=self.args.max_latent_len,
                                               progress=False)
        if self.audio is not None:
            self.audio.submit(step, latents, "ema" if weights == "ema_params" else "raw")

    def close(self):
        if self.audio is not None:
            self.audio.close()


# ----------------------------------------------------------------------------
# Step time and step metrics

class Chrono:
    """Seconds per training step, as big_vision's chrono: the time between two finished steps, less
    what the loop spent in a pause() (evaluation, audio samples, checkpoints)."""

    def __init__(self):
        self.last, self.paused = time.perf_counter(), 0.0

    def lap(self):
        now = time.perf_counter()
        seconds, self.last, self.paused = now - self.last - self.paused, now, 0.0
        return seconds

    @contextlib.contextmanager
    def pause(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - started


class StepLog:
    """The metrics of each step, written one step late, as MaxText buffers them: a step's outputs
    are read once the next step is dispatched, so reading them waits for that step alone and never
    for the one in flight (no host waits on the hot path). Also stops the run after
    --max_bad_steps non-finite steps in a row."""

    def __init__(self, args, setup, metrics, flops_per_sample):
        self.args, self.setup, self.metrics = args, setup, metrics
        self.flops_per_sample = flops_per_sample
        self.peak = peak_flops(jax.devices()[0].device_kind)
        self.chrono, self.pending, self.bad_in_a_row = Chrono(), None, 0

    def start(self, step):
        """The run's start event: where it starts, on what."""
        args = self.args
        self.metrics.write(event="start", step=step, total_steps=args.steps, run=os.path.basename(os.path.abspath(
            args.run_dir)), preset=args.preset, global_batch_size=args.global_batch_size,
            processes=jax.process_count(), devices=jax.device_count(), device_kind=jax.devices()[0].device_kind,
            peak_flops_per_chip=self.peak)

    def dispatched(self, step, out, data_wait, local, pipeline, samples_seen):
        """Step `step` is in flight: finish the one before it, and keep this one's record."""
        self.flush()
        logged = step % self.args.log_every == 0 or step == self.args.steps
        several = "," in self.args.data
        self.pending = dict(step=step, out=out, data_wait=data_wait, frames=float(local["latent_mask"].sum()),
                            samples_seen=samples_seen, logged=logged,
                            skipped=pipeline.counters() if logged else None,
                            skipped_by_source=pipeline.source_counters() if logged and several else None)

    @contextlib.contextmanager
    def pause(self):
        """Finish the newest step now, then leave what follows out of step time."""
        self.flush()
        with self.chrono.pause():
            yield

    def flush(self):
        if self.pending is not None:
            self.finish(**self.pending)
            self.pending = None

    def finish(self, step, out, data_wait, frames, samples_seen, logged, skipped, skipped_by_source):
        args, step_time = self.args, self.chrono.lap()
        if not bool(out["finite"]):
            self.bad_in_a_row += 1
            self.metrics.write(event="nan_step", step=step, loss=float(out["loss"]))
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step, self.bad_in_a_row)
            if self.bad_in_a_row >= args.max_bad_steps:
                raise TrainError(f"{self.bad_in_a_row} non-finite steps in a row at step {step}: stopping; the last "
                                 f"checkpoint in {args.checkpoint_dir} is intact (lower --lr or check the data)")
        else:
            self.bad_in_a_row = 0
        if not logged:
            return
        counts = np.asarray(out["bucket_count"])
        line = dict(step=step, loss=float(out["loss"]), lr=float(out["lr"]),
                    grad_norm=float(out["grad_norm"]), step_time=round(step_time, 4), data_wait=round(data_wait, 4),
                    samples_per_sec=round(args.global_batch_size / step_time, 2),
                    latent_seconds_per_sec=round(frames * jax.process_count() / 25.0 / step_time, 2),
                    samples_seen=samples_seen,
                    skipped=skipped, **({"skipped_by_source": skipped_by_source} if "," in args.data else {}),
                    loss_by_t={f"{i / TIMESTEP_BUCKETS:.1f}-{(i + 1) / TIMESTEP_BUCKETS:.1f}": float(v)
                               for i, v in enumerate(np.asarray(out["bucket_loss"])) if counts[i]})
        if self.peak is not None:
            line["mfu"] = round(self.flops_per_sample * args.global_batch_size / step_time /
                                (self.peak * jax.device_count()), 4)
        memory = jax.local_devices()[0].memory_stats() or {}  # None on CPU
        if "bytes_in_use" in memory:
            line["device_bytes_in_use"] = int(memory["bytes_in_use"])
            line["device_peak_bytes"] = int(memory.get("peak_bytes_in_use", 0))
        self.metrics.write(**line)
        if jax.process_index() == 0:
            print(f"step {step}/{args.steps} loss {line['loss']:.4f} lr {line['lr']:.2e} "
                  f"gnorm {line['grad_norm']:.3f} {line['samples_per_sec']:.1f} samples/s", flush=True)


# ----------------------------------------------------------------------------
# The training loop

def itstime(step, every, last=None):
    """Whether a periodic action (every `every` steps, 0: never) falls on `step`; always on `last`."""
    return bool(every) and step % every == 0 or step == last


def check_hosts(args):
    """Before anything compiles: the batch splits over the hosts, and on a pod every host sees the
    same checkpoint directory and runs the same flags."""
    log.info("host %s is process %d of %d (%d local / %d global devices)", socket.gethostname(), jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    if jax.process_count() > 1:
        pod.check_shared_directory(args.checkpoint_dir)
        check_same_flags(args)
    if args.global_batch_size % jax.process_count():
        raise TrainError(f"--global_batch_size {args.global_batch_size} must split evenly over {jax.process_count()} "
                         "hosts")


def stage_flops(setup, config):
    """Training FLOPs per sample at a data stage's lengths."""
    return model.flops_per_sample(setup.config, config.max_latent_len, config.max_text_len, config.max_speaker_len)


class StopRequest:
    """Whether a stop signal arrived: a plain attribute that the handler sets. Not a threading.Event:
    its set() takes a lock, and a second signal arriving while the first handler holds it (a dropped
    session sends SIGHUP to every process, then launch.sh passes SIGTERM on) deadlocks the trainer."""

    def __init__(self):
        self.requested = False

    def set(self):
        self.requested = True

    def is_set(self):
        return self.requested


def stop_signals():
    """SIGTERM (a preemption, the machine's shutdown) and SIGHUP (a dropped ssh session) both end the
    run with a checkpoint at the next step. A single host sets the returned StopRequest; a pod learns
    of SIGTERM through JAX's preemption notifier, which agrees on the step with the other hosts, so
    SIGHUP is passed on to it as SIGTERM."""
    stop = StopRequest()
    if jax.process_count() == 1:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, lambda signum, frame: stop.set())
    else:
        signal.signal(signal.SIGHUP, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))
    return stop


class OutputThatMayClose:
    """sys.stdout or sys.stderr that turns into /dev/null once its reader is gone (a `tee` or an ssh
    session ended by the same shutdown that preempts the run), so that printing a step never stops
    the checkpoint that follows it."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
            self.stream = open(os.devnull, "w")
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            self.stream = open(os.devnull, "w")

    def __getattr__(self, name):
        return getattr(self.stream, name)


def train(args, on_eval=None):
    """The training loop. on_eval(step, fields), if given, sees every eval; returning True ends the
    run there (with a checkpoint), as --run_steps would."""
    check_hosts(args)
    setup = setup_training(args, jax.devices(), jax.default_backend())
    plan = plan_data(args, jax.process_index(), jax.process_count())
    metrics = Metrics(args.metrics_file, jax.process_index() == 0, args.tensorboard_dir,
                      history=os.path.join(args.checkpoint_dir, checkpoint.METRICS_HISTORY_FILE))
    sigterm = stop_signals()
    manager = checkpoint.manager(args.checkpoint_dir, args.keep_checkpoints, args.keep_period)
    state, data_states, samples_seen = start_state(args, setup, manager, metrics)
    # Finish building the state before the first step is dispatched: on CPU (gloo) two programs with
    # collectives in flight at once can interleave differently on each host and deadlock.
    jax.block_until_ready(state)
    step = start_step = int(state["step"])
    # A checkpoint's data position belongs to the stage of the last batch it trained.
    stage = plan.stage(max(step - 1, 0))
    pipeline = data.Pipeline(plan.stages[stage][1], state=None if data_states is None else
                             data_position(data_states), listings=plan.listings)
    evaluation = Evaluation(args, setup, plan, metrics, {**plan.listings, **pipeline.listings})  # its pins
    steps_log = StepLog(args, setup, metrics, stage_flops(setup, plan.stages[stage][1]))
    steps_log.start(start_step)
    profile = Profile(args)
    exporter = checkpoint.Exporter(args.checkpoint_dir)
    saving, finished, preempted, out = None, False, False, None
    run = jax.tree.map(lambda v: put_on_devices(v, setup.replicated), setup.run_values)
    try:
        while step < args.steps:
            profile.before(step)
            if plan.stage(step) != stage:
                stage, pipeline, state = next_stage(setup, plan, step, pipeline, state, metrics)
                steps_log.flops_per_sample = stage_flops(setup, plan.stages[stage][1])
            started = time.perf_counter()
            local = next(pipeline)
            data_wait, started = time.perf_counter() - started, time.perf_counter()
            state, out = setup.train_step(state, global_batch(setup, args, local), run)
            if step in (start_step, plan.stages[stage][0]):
                jax.block_until_ready(out["loss"])
                metrics.write(event="compiled", step=step, compile_s=round(time.perf_counter() - started, 2))
            step, samples_seen = step + 1, samples_seen + args.global_batch_size
            profile.after(step, out)
            steps_log.dispatched(step, out, data_wait, local, pipeline, samples_seen)
            slot_done = args.run_steps is not None and step - start_step >= args.run_steps
            if evaluation.due(step):  # a pause logs the step in flight: only when something falls here
                with steps_log.pause():
                    fields = evaluation.at(step, state)
                    if fields is not None and on_eval is not None:
                        slot_done = slot_done or bool(on_eval(step, fields))
            # On a pod every host reaches the agreed step, then all checkpoint there.
            preempted = multihost_utils.reached_preemption_sync_point(step) if jax.process_count() > 1 \
                else sigterm.is_set()
            saving = note_committed(manager, metrics, saving, exporter, args.export_every)
            if itstime(step, args.checkpoint_every, args.steps) or preempted or slot_done:
                with steps_log.pause():  # orbax finishes the previous save before it starts this one
                    note_committed(manager, metrics, saving, exporter, args.export_every, wait=True)
                    saving = save(manager, state, step, pipeline, samples_seen, setup, plan, args, metrics)
            if preempted:
                saving = note_committed(manager, metrics, saving, exporter, args.export_every, wait=True)
                metrics.write(event="preempted", step=step)
                log.info("preempted: checkpoint written at step %d, exiting", step)
            if preempted or slot_done:
                break
        steps_log.flush()
        profile.after(None, out)
        note_committed(manager, metrics, saving, exporter, args.export_every, wait=True)
        if not preempted and step in manager.all_steps():  # a preempted host has ~30 s: only the sharded save
            exporter.submit(step)
        finished = True
    finally:
        # A save under way still commits when the loop fails; on a pod only when every host got this
        # far (orbax's commit waits for all of them).
        if finished or jax.process_count() == 1:
            manager.close()
    evaluation.close()
    metrics.close()
    pipeline.close()
    pod.part()
    exporter.finish()
    return state


def next_stage(setup, plan, step, pipeline, state, metrics):
    """Switch to the data stage that starts at `step`: its pipeline, and the EMA weights with fresh
    Adam moments, as a new run would start. Returns (stage, pipeline, state)."""
    stage = plan.stage(step)
    config = plan.stages[stage][1]
    pipeline.close()
    restart = jax.jit(lambda s: {**s, "params": s.get("ema_params", s["params"]),
                                 "opt_state": restart_moments(setup.tx, s["opt_state"], s["params"])},
                      out_shardings=setup.state_shardings, donate_argnums=(0,))
    metrics.write(event="data_stage", step=step, source=config.source)
    log.info("step %d: training on %s from here (EMA weights, fresh Adam moments)", step, config.source)
    with setup.sharding():
        state = restart(state)
    return stage, data.Pipeline(config, listings=plan.listings), state


def save(manager, state, step, pipeline, samples_seen, setup, plan, args, metrics):
    """A checkpoint at `step` (every host joins), its event, and the metrics history beside it.
    Returns (step, start time) of the save now writing in the background."""
    started = time.perf_counter()
    meta = {"samples_seen": samples_seen, "flags": run_flags(args), **about(setup, plan, args)}
    blocking = checkpoint.save(manager, state, step, pipeline.state(), meta)
    metrics.write(event="checkpoint", step=step, path=checkpoint.step_path(args.checkpoint_dir, step),
                  blocking_s=round(blocking, 3))
    metrics.save_history()
    return step, started


def note_committed(manager, metrics, saving, exporter, export_every, wait=False):
    """Log when the background write of the checkpoint `saving` (step, start time) has committed
    (`wait`: wait for it), and ask for its weights-only export on every export_every-th step;
    returns what is still being written (None when nothing)."""
    if saving and (wait or not manager.is_saving_in_progress()):
        checkpoint.wait_committed(manager, saving[0])
        metrics.write(event="checkpoint_committed", step=saving[0], save_s=round(time.perf_counter() - saving[1], 3))
        if itstime(saving[0], export_every):
            exporter.submit(saving[0])
        return None
    return saving


class Profile:
    """--profile_steps A:B: a jax.profiler trace of steps A to B on process 0."""

    def __init__(self, args):
        self.range = args.profile_range if jax.process_index() == 0 else None
        self.directory = args.tensorboard_dir or os.path.join(args.run_dir, "profile")
        self.tracing = False

    def before(self, step):
        if self.range and step + 1 == self.range[0]:
            jax.profiler.start_trace(self.directory)
            self.tracing = True

    def after(self, step, out):
        """After `step` was dispatched (None: the loop ended), stop a trace whose last step it is."""
        if self.tracing and (step is None or step == self.range[1]):
            jax.block_until_ready(out["loss"])
            jax.profiler.stop_trace()
            self.tracing = False
            log.info("profile written to %s (tensorboard --logdir %s, Profile tab; or xprof)", self.directory,
                     self.directory)


# ----------------------------------------------------------------------------
# Ahead-of-time compile for a TPU pod (no TPU, no data needed)

TPU_TOPOLOGIES = {"v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:4x4x2",
                  "v4-128": "v4:4x4x4"}
V4_HBM_BYTES = 32 * 2 ** 30


def aot_compile(args):
    """Compile the run's own train step (setup_training's) for a TPU topology with libtpu; report
    per-chip memory."""
    # Compile-only use: several processes may hold libtpu at once (no chip is touched).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    name = TPU_TOPOLOGIES.get(args.aot_topology, args.aot_topology)
    if not re.fullmatch(r"v4:\d+x\d+x\d+", name):
        raise TrainError(f"--aot_topology must be one of {', '.join(TPU_TOPOLOGIES)} or v4:AxBxC, got "
                         f"{args.aot_topology!r}")
    try:
        topology = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name="megacore",
                                                chips_per_host_bounds=(2, 2, 1))
    except Exception as e:
        raise TrainError(f"cannot build TPU topology {name} ({type(e).__name__}: {e}); install "
                         "requirements-tpu.txt (libtpu)") from None
    chips = len(topology.devices)
    if args.global_batch_size % chips:
        raise TrainError(f"--global_batch_size {args.global_batch_size} must split over the {chips} chips")
    setup = setup_training(args, topology.devices, "tpu")
    b = args.global_batch_size
    result = {"topology": name, "chips": chips, "preset": args.preset, "global_batch_size": b, "remat": args.remat,
              "dtype": setup.config.dtype, "hbm_bytes": V4_HBM_BYTES,
              "flops_per_step": model.flops_per_sample(setup.config, args.max_latent_len, args.max_text_len,
                                                       args.max_speaker_len) * b}
    start = time.perf_counter()
    with setup.sharding():
        lowered = setup.train_step.lower(setup.abstract_state, batch_specs(args, setup.batch_sharding),
                                         setup.run_values)
        try:
            memory = lowered.compile().memory_analysis()
            per_chip = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                        - memory.alias_size_in_bytes)
            result.update(per_chip_bytes=int(per_chip), fits=bool(per_chip <= V4_HBM_BYTES),
                          temp_bytes=int(memory.temp_size_in_bytes), argument_bytes=int(memory.argument_size_in_bytes))
        except Exception as e:  # the compiler refuses a program that does not fit in HBM
            used = (re.search(r"\(([\d.]+)([MGK])\) exceeds available HBM", str(e))
                    or re.search(r"[Uu]sed ([\d.]+)([MGK]) of [\d.]+[MGK] hbm", str(e)))
            if not used:
                raise
            scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}
            result.update(per_chip_bytes=int(float(used.group(1)) * scale[used.group(2)]), fits=False)
    result["compile_s"] = round(time.perf_counter() - start, 1)
    result["headroom"] = round(1 - result["per_chip_bytes"] / V4_HBM_BYTES, 3)
    return result


def print_aot(result):
    gib = result["per_chip_bytes"] / 2 ** 30
    verdict = "fits" if result["fits"] else "does NOT fit"
    print(f"{result['preset']} on {result['topology']} ({result['chips']} chips), global batch "
          f"{result['global_batch_size']}, remat {result['remat']}, {result['dtype']}: {gib:.2f} GiB per chip of "
          f"{result['hbm_bytes'] / 2 ** 30:.0f} GiB -> {verdict} ({100 * result['headroom']:.0f}% headroom); "
          f"{result['flops_per_step'] / 1e15:.2f} PFLOP per step; compiled in {result['compile_s']} s")
    if not result["fits"] or result["headroom"] < 0.1:
        print("suggestion: --remat save_dots keeps the weight matmuls and recomputes the rest; --remat full "
              "recomputes everything and needs the least memory")
    print(json.dumps(result))


# ----------------------------------------------------------------------------
# Commands

def export_checkpoint(source, out):
    """`python train_pretrain.py export CHECKPOINT OUT.pkl`: a training checkpoint as one pickle of
    the seed's full format (checkpoint.export_full), which --resume and --init_from read."""
    def abstract_state(meta, ema):
        config = model.EchoConfig(**meta["config"])
        mesh = jax.make_mesh((1, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                             devices=jax.devices()[:1])
        tx = make_optimizer(argparse.Namespace(**meta["flags"]))
        return state_layout(config, tx, mesh, model.logical_axis_rules(), ema)[0]

    directory, step = checkpoint.export_full(source, out, abstract_state)
    print(f"wrote step {step} of {directory} to {out}")


def main(argv=None):
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax narrates every file of every save at INFO
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        if len(argv) != 3:
            print("usage: python train_pretrain.py export CHECKPOINT OUT.pkl", file=sys.stderr)
            return 2
        try:
            export_checkpoint(argv[1], argv[2])
        except checkpoint.CheckpointError as e:
            print(f"train_pretrain.py: error: {e}", file=sys.stderr)
            return 2
        return 0
    joined = False
    try:
        try:
            args, refused = resolve_defaults(restore_flags(parse_args(argv))), None
        except TrainError as e:
            args, refused = None, e
        if args is None or not args.aot_topology:
            # A host with a bad flag still joins the pod, so that its sentence stops the others at once
            # instead of leaving them waiting for it until --distributed_timeout.
            joined = pod.init_distributed(args.distributed_timeout if args else pod.DISTRIBUTED_TIMEOUT_S)
        if refused is not None:
            raise refused
        if os.environ.get("ECHO_COORDINATOR"):
            # The simulated pod (XLA:CPU, gloo): JAX keys cache entries per process and writes only
            # process 0's, so after a restart process 0 would run its cached step function while the
            # others compile theirs, and gloo then meets collectives of different sizes at the same
            # point ("Received data size doesn't match expected size"). TPU pods keep the cache.
            jax.config.update("jax_enable_compilation_cache", False)
            log.info("simulated pod on CPU: the persistent compilation cache is off (see README, 'Training on a TPU "
                     "pod')")
        else:
            jax.config.update("jax_compilation_cache_dir", args.compile_cache_dir)
        if args.aot_topology:
            print_aot(aot_compile(args))
            return 0
        train(args)
    except (TrainError, data.DataError, pod.PodError, checkpoint.CheckpointError) as e:
        if joined:
            pod.leave_pod(str(e), tell_others=True)
        print(f"train_pretrain.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        if joined and any(sign in str(e) for sign in pod.PEER_LOST_SIGNS):
            pod.leave_pod("lost contact with another host in the middle of a collective (it stopped or died: see its "
                          "log); rerun the same command to resume from the last checkpoint", tell_others=True)
        if joined:  # a defect: its traceback here, one sentence everywhere
            pod.leave_pod(f"{type(e).__name__}: {str(e)[:300]} (the traceback is in that host's log)",
                          tell_others=True, with_traceback=True)
        raise
    return 0


if __name__ == "__main__":
    sys.stdout, sys.stderr = OutputThatMayClose(sys.stdout), OutputThatMayClose(sys.stderr)
    # force: importing orbax logged through absl, which gave the root logger a default handler already
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    sys.exit(main())
