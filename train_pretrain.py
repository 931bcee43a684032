"""Pretrain Echo: multi-host FSDP flow matching on TPU pods (or CPU, for the tiny preset).

Every worker of a pod runs this same command (see launch.sh); roles come from
jax.process_index(). The embedded default trains the demo preset on a learnable synthetic corpus
in under 10 minutes on a 2-core CPU, and scores what it generates on held-out texts:

    python train_pretrain.py --data synthetic
    python train_pretrain.py --preset 1.3B --data hf://datasets/ORG/REPO --silence_latent silence.npy \\
        --checkpoint_dir /mnt/disk/ckpt --metrics_file /mnt/disk/ckpt/metrics.jsonl

Checkpoints are orbax step directories in --checkpoint_dir (gs://BUCKET/PATH, or a directory every
host sees): every host writes its own shards of params, Adam moments and EMA weights in the
background, with every host's data position, the config and the flags; a weights-only
`step_XXXXXXX.params.pkl` beside each is what inference.py loads. `--resume auto` (the default)
continues bit-identically from the newest readable one, taking the run's own flags. SIGTERM makes
every host checkpoint at the same step and exit 0.

    python train_pretrain.py export CHECKPOINT_DIR OUT.pkl    # the seed's full pickle format
"""

import sys

sys.modules.setdefault("tensorflow", None)  # Hugging Face libraries must never pull TF in next to JAX

import argparse  # noqa: E402
import atexit  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import queue  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

import data  # noqa: E402

log = logging.getLogger("train")

# Dense bf16 peak FLOP/s per chip, by device kind (jax.Device.device_kind); the first match wins.
PEAK_FLOPS = (("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
              ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("H100 PCIe", 756e12),
              ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
TIMESTEP_BUCKETS = 5
DISTRIBUTED_TIMEOUT_S = 300  # default seconds for every host to join
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
      "letters), 'starter' or 'words' (10-40-byte pseudo-sentences)")
    a("--eval_data", default=None, help="held-out shards for val_loss (same forms as --data); default: the "
      "validation split of --data (val-*.tar, written by data.py build) where it has one; with --data "
      "synthetic, the corpus's held-out split")
    a("--accept_data_change", action="store_true", help="resume even though the shards of --data changed since "
      "the run started (the data order then changes); without it such a resume stops")
    a("--run_dir", default="runs/echo", help="directory for the synthetic corpus and default outputs")
    a("--steps", type=int, default=None, help="optimizer steps (default: 1,000,000; synthetic: 4000)")
    a("--global_batch_size", type=int, default=None, help="samples per step over all hosts (default 256; synthetic 32)")
    a("--grad_accum", type=int, default=1, help="split each step into this many micro-batches (same result)")
    a("--lr", type=float, default=None, help="peak learning rate (default 1e-4; synthetic 2e-3)")
    a("--warmup_frac", type=float, default=0.05, help="linear warmup over this fraction of steps, then cosine to 0")
    a("--weight_decay", type=float, default=0.01, help="AdamW weight decay (not on biases, norms, AdaLN, gates)")
    a("--seed", type=int, default=0, help="seed for init, timesteps, noise, dropout and data order")
    a("--checkpoint_dir", default=None, help="where checkpoints go: gs://BUCKET/PATH, or a directory every host "
      "sees (default RUN_DIR/checkpoints)")
    a("--checkpoint_every", type=int, default=5000, help="steps between checkpoints (and one at the end)")
    a("--keep_checkpoints", type=int, default=3, help="keep only the newest N checkpoints (0: keep all)")
    a("--keep_period", type=int, default=0, help="also keep every checkpoint whose step is a multiple of this")
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
    a("--eval_samples", type=int, default=32, help="held-out texts sampled at each synthetic eval")
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
    a("--compile_cache_dir", default=os.path.expanduser("~/.cache/echo_jax"), help="persistent compilation cache")
    a("--distributed_timeout", type=int, default=DISTRIBUTED_TIMEOUT_S, help="seconds to wait for all hosts to join")
    return p


# On resume, flags a run may change freely (logging, evals, checkpoints, outputs); per-invocation
# flags are never taken from the checkpoint; every other flag stays as the run started.
FREE_FLAGS = frozenset({"log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "keep_period",
                        "metrics_file",
                        "checkpoint_dir", "run_dir", "compile_cache_dir", "distributed_timeout", "tensorboard_dir",
                        "sample_every", "sample_texts", "dacvae_weights", "eval_data", "eval_batches", "eval_samples",
                        "sample_steps", "sample_cfg", "max_bad_steps"})
PER_INVOCATION_FLAGS = frozenset({"run_steps", "resume", "init_from", "aot_topology", "profile_steps",
                                  "accept_data_change", "override"})
RUN_FLAGS_FILE = "run_flags.json"  # beside the checkpoints: the flags the run started with
METRICS_HISTORY_FILE = "metrics.jsonl"  # beside the checkpoints: a copy of the metrics at the last one


def run_flags(args):
    """The flags of a run as JSON (what restore_flags reads back)."""
    skip = PER_INVOCATION_FLAGS | {"explicit", "flag_changes", "profile_range"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def check_same_flags(args):
    """Every host must train the same run: a host started with other flags, or one that read another
    run_flags.json, stops the pod with one sentence (on every host at once)."""
    pinned = {k: v for k, v in run_flags(args).items() if k not in FREE_FLAGS}
    every = gather_json(hashlib.sha256(json.dumps(pinned, sort_keys=True, default=str).encode()).hexdigest())
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
    from etils import epath
    path = os.path.join(args.checkpoint_dir or os.path.join(args.run_dir, "checkpoints"), RUN_FLAGS_FILE)
    if not epath.Path(path).exists():
        return args  # a new run
    try:
        saved = read_json(path)
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
    if args.synthetic_corpus not in data.SYNTHETIC_CORPORA:
        raise TrainError(f"--synthetic_corpus must be one of {', '.join(data.SYNTHETIC_CORPORA)}, "
                         f"got {args.synthetic_corpus!r}")
    defaults = dict(preset="tiny", steps=1_000_000, global_batch_size=256, lr=1e-4, eval_every=1000,
                    max_latent_len=768, max_text_len=768, max_speaker_len=768, remat="save_dots", ema_decay=0.9999,
                    sample_every=20000)
    if synthetic:
        latent_len, text_len, speaker_len = data.synthetic_lengths(args.synthetic_corpus)
        defaults.update(preset="demo", steps=4000, global_batch_size=32, lr=2e-3, eval_every=250,
                        max_latent_len=latent_len, max_text_len=text_len, max_speaker_len=speaker_len, remat="none",
                        ema_decay=0.99, sample_every=500)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.checkpoint_dir = args.checkpoint_dir or os.path.join(args.run_dir, "checkpoints")
    args.metrics_file = args.metrics_file or os.path.join(args.run_dir, "metrics.jsonl")
    import model
    if args.preset not in model.PRESETS:
        raise TrainError(f"--preset must be one of {', '.join(model.PRESETS)}, got {args.preset!r}")
    for name in ("steps", "global_batch_size", "grad_accum", "checkpoint_every", "log_every", "eval_every",
                 "eval_batches", "eval_samples", "sample_steps", "max_latent_len", "max_text_len", "max_speaker_len",
                 "mesh_data", "max_bad_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise TrainError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_speaker_len % 4:
        raise TrainError(f"--max_speaker_len must be a multiple of 4, got {args.max_speaker_len}")
    if args.global_batch_size % args.grad_accum:
        raise TrainError(f"--global_batch_size {args.global_batch_size} must divide into --grad_accum "
                         f"{args.grad_accum} micro-batches")
    if not args.lr > 0 or not 0 <= args.warmup_frac < 1:
        raise TrainError("--lr must be positive and --warmup_frac in [0, 1)")
    if not args.weight_decay >= 0:
        raise TrainError(f"--weight_decay must not be negative, got {args.weight_decay}")
    if not 0 <= args.ema_decay < 1:
        raise TrainError(f"--ema_decay must lie in [0, 1) (0 turns EMA off), got {args.ema_decay}")
    if args.sample_every < 0:
        raise TrainError(f"--sample_every must not be negative (0: no audio samples), got {args.sample_every}")
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
    if args.resume not in ("auto", "none") and not model.checkpoint_file_exists(args.resume):
        raise TrainError(f"--resume {args.resume}: no such checkpoint file (a pickle of the seed's format; to "
                         "continue a run, give its --checkpoint_dir and --resume auto)")
    if args.keep_checkpoints < 0 or args.keep_period < 0:
        raise TrainError("--keep_checkpoints and --keep_period must not be negative (0: keep all, no period)")
    if args.init_from and not model.checkpoint_file_exists(args.init_from):
        raise TrainError(f"--init_from {args.init_from}: no such checkpoint file")
    if args.silence_latent and not os.path.isfile(args.silence_latent):
        raise TrainError(f"--silence_latent {args.silence_latent}: no such file")
    return args


# ----------------------------------------------------------------------------
# Distributed setup

HEARTBEAT_TIMEOUT_S = 45  # a host silent this long is lost: JAX stops the others (within 90 s in all)


def init_distributed(timeout):
    """Join the other hosts: a local simulated pod (ECHO_COORDINATOR, ECHO_NUM_PROCESSES,
    ECHO_PROCESS_ID), or a TPU pod, which JAX's cluster detection finds (launch.sh sets ECHO_TPU_POD
    on every worker; GKE sets TPU_WORKER_HOSTNAMES), then watch the others for errors (watch_peers).
    Single-host runs skip this. Returns whether this host joined a pod."""
    import jax
    coordinator = os.environ.get("ECHO_COORDINATOR")
    tpu_pod = os.environ.get("ECHO_TPU_POD") == "1" or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if not coordinator and not tpu_pod:
        return False
    if coordinator:
        # JAX aborts the process when a peer never shows up; meet on the next port first, with a
        # deadline, so that a missing host is one clear sentence.
        rendezvous(coordinator, int(os.environ["ECHO_NUM_PROCESSES"]), int(os.environ["ECHO_PROCESS_ID"]), timeout)
    try:
        if coordinator:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(coordinator, int(os.environ["ECHO_NUM_PROCESSES"]),
                                       int(os.environ["ECHO_PROCESS_ID"]), initialization_timeout=timeout,
                                       heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
        else:
            jax.distributed.initialize(initialization_timeout=timeout, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    except Exception as e:
        raise TrainError(f"could not join the other hosts within {timeout} s ({type(e).__name__}); check that "
                         "every worker started and can reach the coordinator") from None
    watch_peers()
    return True


PEER_FAILURE_KEY = "echo/failed"  # key-value store entry: the sentence of the first host that met an error
PEER_SEEN_KEY = "echo/failure_seen/"  # + process index: that host has printed the sentence and is stopping
# What a collective raises when a peer's connection drops (gloo on the simulated pod): a lost host,
# not a defect of this one.
PEER_LOST_SIGNS = ("Connection reset by peer", "Connection closed by peer")
leaving_pod = threading.Lock()  # held by the thread (main or watch_peers) that ends this host after an error


def watch_peers():
    """On a pod, end this host the moment another one reports an error (leave_pod), instead of leaving
    it in a collective until the heartbeat timeout: a bad flag, a full disk or a damaged shard on one
    host stops every host within seconds, each with the same sentence."""
    from orbax.checkpoint import multihost
    client, done = multihost.get_jax_distributed_client(), threading.Event()

    def watch():
        while not done.is_set():
            try:
                sentence = client.blocking_key_value_get(PEER_FAILURE_KEY, 1000)
            except Exception as e:  # the 1 s wait ran out (look again), or the client is shutting down
                if "DEADLINE_EXCEEDED" in str(e):
                    continue
                return
            leave_pod(sentence)

    thread = threading.Thread(target=watch, name="watch-peers", daemon=True)
    thread.start()
    # Stop the watcher before JAX shuts the client down at exit (registered later, so it runs first):
    # a thread left waiting in the client then aborts the process.
    atexit.register(lambda: (done.set(), thread.join()))


def leave_pod(sentence, tell_others=False, with_traceback=False):
    """End this host of a pod after an error: print the sentence, tell the other hosts (tell_others:
    this host met it), wait (10 s at most) until every host has printed it, and exit without JAX's
    shutdown barrier, which would wait for hosts that are gone. Never returns. Process 0 leaves
    last: the coordination service lives in it, and the others' JAX clients abort them the moment
    it goes."""
    import jax
    from orbax.checkpoint import multihost
    if not leaving_pod.acquire(blocking=False):
        time.sleep(60)  # this host's other thread is ending the process already (os._exit)
    process = jax.process_index()
    if with_traceback:
        traceback.print_exc()
    print(f"train_pretrain.py: error: {sentence}", file=sys.stderr, flush=True)
    client = multihost.get_jax_distributed_client()
    for key, value in (((PEER_FAILURE_KEY, f"host {process} stopped the run: {sentence}"),) if tell_others else ()) \
            + ((PEER_SEEN_KEY + str(process), "1"),):
        try:
            client.key_value_set(key, value)
        except Exception:  # another host reported first: its sentence reaches the others
            pass
    deadline = time.monotonic() + 10
    for other in range(jax.process_count()):
        try:
            client.blocking_key_value_get(PEER_SEEN_KEY + str(other),
                                          max(1, int((deadline - time.monotonic()) * 1000)))
        except Exception:  # that host is gone already
            pass
    sys.stdout.flush()
    if process == 0:
        time.sleep(2)
    os._exit(2)


def cpu_pod():
    """Whether this run is several processes on XLA:CPU (a simulated pod), whose programs must keep
    every collective out of loops (model.EchoConfig.unroll_scan)."""
    import jax
    return jax.process_count() > 1 and jax.default_backend() == "cpu"


def coordinator_port():
    """A port P for a simulated pod's ECHO_COORDINATOR whose rendezvous port P + 1 is free too, below
    Linux's ephemeral range: the kernel hands P + 1 of an ephemeral P to outgoing connections."""
    import random
    while True:
        port = random.randrange(20000, 32000, 2)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


def rendezvous(coordinator, processes, index, timeout):
    """Every process checks in with process 0 on the coordinator's port + 1 before `timeout` s."""
    host, port = coordinator.rsplit(":", 1)
    address, deadline = (host, int(port) + 1), time.monotonic() + timeout
    missing = lambda joined: f"only {joined} of {processes} hosts joined within {timeout} s; check that every " \
                             "worker started and can reach the coordinator"
    if index == 0:
        with socket.socket() as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                server.bind(address)
            except OSError as e:
                raise TrainError(f"cannot listen on {host}:{address[1]}, the port after ECHO_COORDINATOR's, where the "
                                 f"hosts meet first ({e.strerror}); choose a coordinator port whose next port is free") \
                    from None
            server.listen(processes)
            server.settimeout(0.5)
            joined = set()
            while len(joined) < processes - 1:
                if time.monotonic() > deadline:
                    raise TrainError(missing(len(joined) + 1))
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    continue
                with conn:
                    joined.add(conn.recv(16))
                    conn.sendall(b"ok")
        return
    while True:
        try:
            with socket.create_connection(address, timeout=2) as conn:
                conn.sendall(str(index).encode())
                if conn.recv(2) == b"ok":
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TrainError(missing("fewer than all"))
        time.sleep(0.5)


def peak_flops(device_kind):
    """Peak FLOP/s of one chip of this kind, or None for a kind not in PEAK_FLOPS (then no MFU is
    reported rather than a wrong one)."""
    return next((peak for name, peak in PEAK_FLOPS if name.lower() in device_kind.lower()), None)


def fsdp_devices(config, devices):
    """The most devices, dividing `devices`, that split every parameter width FSDP shards ('embed')."""
    import flax.linen as nn
    import jax

    import model as echo
    boxed = jax.tree.leaves(echo.abstract_params(config), is_leaf=lambda x: isinstance(x, nn.Partitioned))
    widths = {size for leaf in boxed for size, name in zip(leaf.value.shape, leaf.names) if name == "embed"}
    return max(d for d in range(1, devices + 1) if devices % d == 0 and all(w % d == 0 for w in widths))


def make_mesh(mesh_data, config):
    """The (data, fsdp) mesh over every device; --mesh_data None leaves FSDP as many as fsdp_devices()."""
    import jax
    n = jax.device_count()
    mesh_data = mesh_data or n // fsdp_devices(config, n)
    if n % mesh_data:
        raise TrainError(f"--mesh_data {mesh_data} does not divide the {n} devices")
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((mesh_data, n // mesh_data), ("data", "fsdp"), axis_types=auto)


# ----------------------------------------------------------------------------
# The objective

def stratified_timesteps(rng, batch):
    """Stratified logit-normal t over the GLOBAL batch: one uniform u and one shift m."""
    import jax
    import jax.numpy as jnp
    from jax.scipy.special import ndtri
    ru, rm = jax.random.split(rng)
    u = jax.random.uniform(ru, ())
    m = jax.random.randint(rm, (), 0, batch)
    q = ((jnp.arange(batch) + m) % batch + u) / batch
    return jax.nn.sigmoid(ndtri(q))


def primer_steps(args):
    """How many first steps of a synthetic run train on its corpus's primer (0: none, or real data)."""
    if getattr(args, "data", None) != "synthetic" or getattr(args, "aot_topology", None):
        return 0
    corpus = data.SYNTHETIC_CORPORA[args.synthetic_corpus]
    return int(corpus.primer_fraction * args.steps) if corpus.primer else 0


def stage_lengths(args, corpus):
    """(max_latent_len, max_text_len, max_speaker_len) of a synthetic stage: its corpus's own where the
    run keeps its corpus's lengths, else the run's for every stage."""
    run = (args.max_latent_len, args.max_text_len, args.max_speaker_len)
    return data.synthetic_lengths(corpus) if run == data.synthetic_lengths(args.synthetic_corpus) else run


def make_optimizer(args):
    """AdamW with warm-up and cosine decay; a run with a primer (data stages) restarts both at the
    switch, and restart_moments gives Adam fresh moments there."""
    import optax

    def warmup_cosine(steps):
        warmup = max(int(args.warmup_frac * steps), 1)
        return optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(steps, warmup + 1), 0.0)
    primed = primer_steps(args)
    schedule = (optax.join_schedules([warmup_cosine(primed), warmup_cosine(args.steps - primed)], [primed])
                if primed else warmup_cosine(args.steps))

    def decay_mask(params):
        from flax.traverse_util import path_aware_map
        no_decay = re.compile(r"(bias|norm|adaln|cond_dense_global|wgate)")
        return path_aware_map(lambda path, _: not no_decay.search("/".join(path)), params)

    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=args.weight_decay, mask=decay_mask))
    return tx, schedule


def restart_moments(tx, opt_state, params):
    """The optimizer state of a new data stage: Adam's moments and step count as at the start (its
    bias correction starts over), while the schedule's count runs on into the stage's own warm-up."""
    import jax
    import optax
    kept = lambda node: isinstance(node, optax.ScaleByScheduleState)
    return jax.tree.map(lambda fresh, old: old if kept(fresh) else fresh, tx.init(params), opt_state, is_leaf=kept)


def flow_matching_pair(x0, noise, t):
    """The straight path from data (t = 0) to noise (t = 1): x_t and its velocity target."""
    t = t[:, None, None]
    return (1 - t) * x0 + t * noise, noise - x0


def cfg_dropout(rng, batch):
    """Which samples keep their text and their speaker: each dropped with probability 0.1, independently."""
    import jax
    import jax.numpy as jnp
    r_text, r_spk = jax.random.split(rng)
    keep_text = (jax.random.uniform(r_text, (batch,)) >= 0.1).astype(jnp.int32)
    keep_spk = (jax.random.uniform(r_spk, (batch,)) >= 0.1).astype(jnp.int32)
    return keep_text, keep_spk


def build_train_step(model, tx, args):
    """(state, batch) -> (state, metrics). state = {params, opt_state, step}; all randomness from
    fold_in(seed, step). Non-finite steps leave params and moments untouched."""
    import jax
    import jax.numpy as jnp
    import optax

    import model as echo
    accum = args.grad_accum

    def step_fn(state, batch):
        rng = jax.random.fold_in(jax.random.key(args.seed), state["step"])
        r_t, r_noise, r_cfg = jax.random.split(rng, 3)
        x0 = batch["latent"]
        b = x0.shape[0]
        t = stratified_timesteps(r_t, b)
        x_t, target = flow_matching_pair(x0, jax.random.normal(r_noise, x0.shape, jnp.float32), t)
        keep_text, keep_spk = cfg_dropout(r_cfg, b)
        inputs = dict(x=x_t, t=t, text_ids=batch["text_ids"], text_mask=batch["text_mask"] * keep_text[:, None],
                      speaker_latent=batch["speaker_latent"] * keep_spk[:, None, None].astype(jnp.float32),
                      speaker_mask=batch["speaker_mask"] * keep_spk[:, None], target=target)
        valid_fraction = jnp.maximum(jnp.mean(batch["latent_mask"].astype(jnp.float32)), 1e-6)
        norm = x0.size * valid_fraction

        def micro_loss(params, micro):
            pred = model.apply({"params": params}, micro["x"], micro["t"], micro["text_ids"], micro["text_mask"],
                               micro["speaker_latent"], micro["speaker_mask"])
            per_sample = jnp.sum((pred - micro["target"]) ** 2, axis=(1, 2))
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
            (loss, grads), per_sample = jax.lax.scan(body, zeros, micro, unroll=echo.scan_unroll(model.config, accum))
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
            decay = jnp.minimum(args.ema_decay, (1 + step) / (10 + step))
            new_state["ema_params"] = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema_params"],
                                                   new_state["params"])
        # Loss by timestep bucket: per-sample MSE over frames normalised the same way as the loss.
        per_sample = per_sample / (x0[0].size * valid_fraction)
        bucket = jnp.clip((t * TIMESTEP_BUCKETS).astype(jnp.int32), 0, TIMESTEP_BUCKETS - 1)
        one_hot = jax.nn.one_hot(bucket, TIMESTEP_BUCKETS)
        bucket_loss = (one_hot * per_sample[:, None]).sum(0) / jnp.maximum(one_hot.sum(0), 1)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "bucket_loss": bucket_loss,
                   "bucket_count": one_hot.sum(0)}
        return new_state, metrics

    return step_fn


def build_eval_loss(model, args):
    """Loss on held-out batch `index` of --eval_batches, with fixed t (evenly spaced over all of
    them) and fixed noise: the same number for the same params, a meaningful curve."""
    import jax
    import jax.numpy as jnp

    def eval_fn(params, batch, index):
        x0 = batch["latent"]
        b = x0.shape[0]
        t = (index * b + jnp.arange(b) + 0.5) / (args.eval_batches * b)
        noise_key = jax.random.fold_in(jax.random.key(args.seed + 12345), index)
        noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
        x_t, target = flow_matching_pair(x0, noise, t)
        pred = model.apply({"params": params}, x_t, t, batch["text_ids"], batch["text_mask"],
                           batch["speaker_latent"], batch["speaker_mask"])
        valid_fraction = jnp.maximum(jnp.mean(batch["latent_mask"].astype(jnp.float32)), 1e-6)
        return jnp.mean((pred - target) ** 2) / valid_fraction

    return eval_fn


def fixed_batches(trainer, args, source, split, count, flag, open_shards=None):
    """The first `count` global batches of a source, read alike on every host (validation sets,
    audio-sample references)."""
    config = dataclasses.replace(trainer.data_config, source=source, batch_size=args.global_batch_size,
                                 process_index=0, process_count=1, split=split,
                                 open_shards=open_shards or trainer.data_config.open_shards)
    try:
        pipeline = data.Pipeline(config)
    except data.DataError as e:
        raise TrainError(f"{flag}: {e}") from None
    try:
        batches = [next(pipeline) for _ in range(count)]
        return [{k: v for k, v in b.items() if isinstance(v, np.ndarray)} for b in batches]
    finally:
        pipeline.close()


# ----------------------------------------------------------------------------
# Checkpoints. Under --checkpoint_dir (gs://BUCKET/PATH, or a directory every host sees):
#   step_XXXXXXX/            orbax: `state` (every host writes its own shards, in the background)
#                            and `meta` (JSON: every host's data position, samples seen, config, flags)
#   step_XXXXXXX.params.pkl  the weights in the seed's pickle format, for inference.py
#   run_flags.json           the flags the run started with (restore_flags)

CHECKPOINT_BUFFER_GB = 2  # orbax's bound on the host memory a save or restore holds at once


def state_layout(config, tx, mesh, rules, ema):
    """(abstract train state, its shardings): params (and the float32 EMA weights) sharded by the
    model's logical axes, Adam moments like their params, counters replicated."""
    import flax.linen as nn
    import jax
    import optax

    import model as echo
    abstract = echo.abstract_params(config)
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


def checkpoint_manager(directory, keep=0, keep_period=0):
    """The orbax manager of a checkpoint directory. It removes the temporary directories of
    interrupted saves when it opens, and keeps the newest `keep` checkpoints (0: all) plus every
    `keep_period`-th step."""
    import orbax.checkpoint as ocp
    # One zarr array per leaf (no OCDBT): every host writes its own chunk objects and nothing is
    # updated in place, so any store that can write an object serves (OCDBT's shared manifest needs
    # conditional writes, which the Cloud Storage emulator of the tests lacks). A few hundred leaves
    # make a few thousand objects per checkpoint on a v4-64.
    handlers = {"state": ocp.StandardCheckpointHandler(save_concurrent_gb=CHECKPOINT_BUFFER_GB,
                                                       restore_concurrent_gb=CHECKPOINT_BUFFER_GB, use_ocdbt=False),
                "meta": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, keep_period=keep_period or None,
                                           step_prefix="step", step_format_fixed_length=7,
                                           cleanup_tmp_directories=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def write_atomically(path, write):
    """write(binary file) for a local path through a temporary file and a rename; on gs:// an object
    only appears once its upload completes, so it is written in place."""
    from etils import epath
    if "://" in path:
        with epath.Path(path).open("wb") as f:
            write(f)
        return

    def to_file(tmp):
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    data.atomic_write(path, to_file)


def write_json(path, payload):
    """A small JSON file, never half written."""
    text = json.dumps(payload, indent=1, sort_keys=True).encode()
    write_atomically(path, lambda f: f.write(text))


def read_json(path):
    from etils import epath
    return json.loads(epath.Path(path).read_text())


def dict_leaves(tree):
    """The leaves of nested dicts in insertion order: the order pickle writes them in."""
    if isinstance(tree, dict):
        for value in tree.values():
            yield from dict_leaves(value)
    else:
        yield tree


class StreamingPickler(pickle.Pickler):
    """Pickles a tree whose array leaves are fetched as numpy one at a time, when pickle reaches
    them (`fetch(leaf)`: the numpy array, or None for an ordinary object), so that only one whole
    array is ever on the host. Fast mode keeps no memo, which would hold every array until the end."""

    def __init__(self, file, fetch):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.fast = True
        self.fetch = fetch

    def reducer_override(self, obj):
        array = self.fetch(obj)
        return NotImplemented if array is None else np.asarray(array).__reduce_ex__(pickle.HIGHEST_PROTOCOL)


def gathered(obj):
    """A sharded jax array as a whole numpy array (a collective: every process must join)."""
    import jax
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(obj, tiled=True) if isinstance(obj, jax.Array) else None


def export_weights(path, state, about, process):
    """The weights-only pickle of the seed's format ({"params", "step", ...} with the EMA weights and
    what inference needs), gathered one array at a time. Every process must call it."""
    import flax.serialization
    from jax.experimental import multihost_utils
    trees = {key: flax.serialization.to_state_dict(state[key]) for key in ("params", "ema_params") if key in state}
    if process != 0:  # join process 0's gathers, in the order its pickler reaches the arrays
        for leaf in dict_leaves(trees):
            multihost_utils.process_allgather(leaf, tiled=True)
        return
    write_atomically(path, lambda f: StreamingPickler(f, gathered).dump({**trees, **about}))


def gather_json(value):
    """A small JSON-able value from every process, as a list (one collective)."""
    from jax.experimental import multihost_utils
    encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([len(encoded)], np.int64))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(encoded)] = encoded
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]


def agree(ok, processes):
    """The indices of the processes whose `ok` is False (one collective; [] on a single host)."""
    if processes == 1:
        return [] if ok else [0]
    from jax.experimental import multihost_utils
    every = np.asarray(multihost_utils.process_allgather(np.asarray([ok]))).reshape(-1)
    return [int(i) for i in np.flatnonzero(~every)]


def check_shared_directory(directory, process, processes):
    """Every host must see the same checkpoint directory (gs://, or a shared mount): process 0 writes
    a token into it and every host looks for it, before anything compiles."""
    from etils import epath
    from jax.experimental import multihost_utils
    token = np.frombuffer(os.urandom(8), np.uint8) if process == 0 else np.zeros(8, np.uint8)
    token = bytes(np.asarray(multihost_utils.broadcast_one_to_all(token)).astype(np.uint8)).hex()
    marker = epath.Path(directory) / f".hosts-{token}"
    if process == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    multihost_utils.sync_global_devices("checkpoint directory written")
    blind = agree(marker.exists(), processes)
    multihost_utils.sync_global_devices("checkpoint directory checked")
    if process == 0:
        marker.unlink()
    if blind:
        raise TrainError(f"host(s) {', '.join(map(str, blind))} do not see process 0's --checkpoint_dir {directory}: "
                         "every host must write to the same place; use gs://BUCKET/PATH or a directory on a "
                         "shared mount (NFS, Filestore)")


def save_checkpoint(manager, trainer, state, step, data_state, samples_seen, export=True):
    """Every process joins. Orbax copies this host's shards off the devices and writes them in the
    background; with `export`, the weights-only pickle follows (synchronously). Returns the seconds
    training waited for the sharded save and for the export."""
    import orbax.checkpoint as ocp

    import model as echo
    args = trainer.args
    started = time.perf_counter()
    meta = {"step": step, "samples_seen": samples_seen, "data_states": gather_json(data_state),
            "flags": run_flags(args), **trainer.about(json_safe=True)}
    try:  # also raises what the background write of the previous checkpoint met (a full disk, say)
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:
        raise TrainError(f"writing a checkpoint to {args.checkpoint_dir} failed ({type(e).__name__}: "
                         f"{str(e)[:200]}); free space there or fix its permissions, then rerun to resume "
                         "from the last complete checkpoint") from None
    sharded = time.perf_counter() - started
    if export:
        export_weights(echo.export_path(args.checkpoint_dir, step), state, {"step": step, **trainer.about()},
                       trainer.process)
    if trainer.process == 0:
        write_json(os.path.join(args.checkpoint_dir, RUN_FLAGS_FILE), run_flags(args))
        prune_exports(args.checkpoint_dir, manager.all_steps())
    return sharded, time.perf_counter() - started - sharded


def prune_exports(directory, kept_steps):
    """Remove the weights-only exports of checkpoints orbax has pruned."""
    from etils import epath
    for path in epath.Path(directory).glob("step_*.params.pkl"):
        m = re.fullmatch(r"step_(\d{7})\.params\.pkl", path.name)
        if m and int(m.group(1)) not in kept_steps:
            path.unlink(missing_ok=True)


def restore_checkpoint(manager, trainer):
    """The newest readable checkpoint, each host reading only its own shards straight onto its
    devices: (state, meta), or None when the directory holds none. An unreadable newest one gives a
    warning and the one before it is tried; every host takes the same decision."""
    import jax
    import orbax.checkpoint as ocp

    import model as echo
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            trainer.abstract_state, trainer.state_shardings)
    steps = sorted(manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
        error = None
        try:
            saved = manager.item_metadata(step)["state"]
            target = dict(abstract)
            if "ema_params" in target and "ema_params" not in saved:
                del target["ema_params"]
                log.warning("checkpoint %d holds no EMA weights: they start from its params", step)
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                     meta=ocp.args.JsonRestore()))
        except Exception as e:  # a damaged checkpoint raises whatever its reader meets
            error = f"{type(e).__name__}: {str(e)[:200]}"
        failed = agree(error is None, trainer.processes)
        if not failed:
            state = dict(restored["state"])
            if "ema_params" in abstract and "ema_params" not in state:
                state["ema_params"] = jax.tree.map(lambda p: p.copy(), state["params"])
            return state, restored["meta"]
        path = echo.step_path(str(manager.directory), step)
        where = error or f"unreadable on host(s) {', '.join(map(str, failed))}"
        if i + 1 == len(steps):
            raise TrainError(f"no checkpoint in {manager.directory} is readable (the oldest, {path}: {where}); "
                             "restore them, or start a new run in another --checkpoint_dir")
        log.warning("checkpoint %s is unreadable (%s): resuming from step %d instead", path, where, steps[i + 1])
        set_aside(manager, step, trainer.process, trainer.processes)
    return None


def set_aside(manager, step, process, processes):
    """Rename an unreadable checkpoint (and its export) to STEP_DIR.unreadable-TIME, out of the way of
    the step that will be saved again under its name (and of pruning, which would count it); nothing
    is deleted."""
    from etils import epath
    from jax.experimental import multihost_utils

    import model as echo
    path, export = echo.step_path(str(manager.directory), step), echo.export_path(str(manager.directory), step)
    aside = f"{path}.unreadable-{int(time.time())}"
    error = None
    if process == 0:
        try:
            epath.Path(path).rename(aside)
            if epath.Path(export).exists():
                epath.Path(export).rename(aside + ".params.pkl")
            log.warning("moved the unreadable checkpoint to %s", aside)
        except OSError as e:
            error = str(e)
    if processes > 1:
        multihost_utils.sync_global_devices("unreadable checkpoint set aside")
    if agree(error is None, processes):
        raise TrainError(f"cannot move the unreadable checkpoint {path} aside ({error or 'on process 0'}); move or "
                         "remove it, then restart")
    manager.reload()


class Trainer:
    """What one host knows about the run: model, mesh, optimizer, data sources, state layout."""

    def __init__(self, args):
        import jax

        import model as echo

        self.args = args
        self.process = jax.process_index()
        self.processes = jax.process_count()
        log.info("host %s is process %d of %d (%d local / %d global devices)", socket.gethostname(),
                 self.process, self.processes, jax.local_device_count(), jax.device_count())
        if args.global_batch_size % self.processes:
            raise TrainError(f"--global_batch_size {args.global_batch_size} must split evenly over "
                             f"{self.processes} hosts")
        dtype = args.dtype or ("bfloat16" if jax.default_backend() == "tpu" else "float32")
        config = dataclasses.replace(echo.PRESETS[args.preset], dtype=dtype, remat=args.remat)
        # A simulated pod (several CPU processes, gloo) unrolls every loop that holds collectives
        # (model.EchoConfig.unroll_scan), where that costs little memory.
        simulated_pod = cpu_pod()
        if simulated_pod and echo.count_params(config) <= UNROLL_MAX_PARAMS:
            config = dataclasses.replace(config, unroll_scan=True)
            log.info("simulated pod on CPU: layer scans unrolled, every collective in program order (see README, "
                     "'Training on a TPU pod')")
        elif simulated_pod:
            log.warning("simulated pod on CPU: the %s preset keeps its layer scans (unrolled, its step needs about "
                        "twice the memory), and XLA:CPU may then call collectives in a different order on each "
                        "host (see README, 'Training on a TPU pod')", args.preset)
        self.config = config
        self.model = echo.EchoDiT(self.config)
        self.mesh = make_mesh(args.mesh_data, self.config)
        self.rules = echo.logical_axis_rules()
        self.tx, self.schedule = make_optimizer(args)

        # Data: every host streams its own shards.
        self.source, self.eval_source, silence = args.data, args.eval_data, args.silence_latent
        primed = primer_steps(args)
        if args.data == "synthetic":
            # Each host writes its own copy (no shared disk needed), and the held-out split beside it.
            corpus = data.SYNTHETIC_CORPORA[args.synthetic_corpus]
            name = lambda which: os.path.join(args.run_dir, f"synthetic-{which}-{args.seed}-{self.process}")
            self.source, self.eval_source = name(args.synthetic_corpus), self.eval_source or \
                name(args.synthetic_corpus) + "-held-out"
            corpora = [(self.source, args.synthetic_corpus, False, max(corpus.shards, self.processes)),
                       (name(args.synthetic_corpus) + "-held-out", args.synthetic_corpus, True, 1)]
            if primed:
                shards = max(data.SYNTHETIC_CORPORA[corpus.primer].shards, self.processes)
                corpora.append((name(corpus.primer), corpus.primer, False, shards))
            for directory, which, held_out, shards in corpora:
                if not os.path.exists(os.path.join(directory, "silence_latent.npy")):
                    data.make_synthetic(directory, shards=shards, samples_per_shard=512, seed=args.seed,
                                        corpus=which, held_out=held_out)
            silence = os.path.join(self.source, "silence_latent.npy")
        self.data_config = data.DataConfig(
            source=self.source, batch_size=args.global_batch_size // self.processes, seed=args.seed,
            max_latent_len=args.max_latent_len, max_text_len=args.max_text_len, max_speaker_len=args.max_speaker_len,
            silence_latent=silence, process_index=self.process, process_count=self.processes,
            accept_data_change=args.accept_data_change)
        # Data stages, (first step, data config): a synthetic corpus with a primer trains on it first.
        self.data_stages = [(0, self.data_config)]
        if primed:
            latent_len, text_len, speaker_len = stage_lengths(args, corpus.primer)
            self.data_stages = [(0, dataclasses.replace(self.data_config, source=name(corpus.primer),
                                                        max_latent_len=latent_len, max_text_len=text_len,
                                                        max_speaker_len=speaker_len)),
                                (primed, self.data_config)]
        self.eval_split = "all"  # an --eval_data source is read whole
        try:
            sources = data.parse_sources(self.source)
            for source, _ in sources:
                data.list_shards(source, "train")
            if self.eval_source is None and args.data != "synthetic":
                with_val = [(s, w) for s, w in sources if data.has_split(s, "val")]
                if with_val:
                    self.eval_source = ",".join(f"{s}:{w}" for s, w in with_val)
                    self.eval_split = "val"
                    log.info("val_loss on the validation split of %s", ", ".join(s for s, _ in with_val))
            self.silence_latent = data.load_silence(silence, min(args.max_latent_len, 250)).astype(np.float16)
        except data.DataError as e:
            raise TrainError(str(e)) from None

        self.abstract_state, self.state_shardings = state_layout(self.config, self.tx, self.mesh, self.rules,
                                                                 args.ema_decay > 0)
        self.param_shardings = self.state_shardings["params"]
        self.replicated = self.state_shardings["step"]
        self.batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

    def about(self, json_safe=False):
        """What inference needs besides the weights: the config, the trained lengths, and the silence
        the model learned to end speech with (trailing-silence trimming)."""
        silence = self.silence_latent.tolist() if json_safe else self.silence_latent
        return {"config": dataclasses.asdict(self.config), "silence_latent": silence,
                "max_lengths": {k: getattr(self.args, k) for k in ("max_latent_len", "max_text_len", "max_speaker_len")}}

    def init_state(self):
        import flax.linen as nn
        import jax
        import jax.numpy as jnp

        import model as echo

        def init():
            params = nn.unbox(echo.init_params(self.config, jax.random.key(self.args.seed)))
            state = {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}
            if self.args.ema_decay > 0:
                state["ema_params"] = params
            return state

        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return jax.jit(init, out_shardings=self.state_shardings)()

    def state_from_numpy(self, params, opt_state, step, ema_params=None):
        """Host numpy trees -> the sharded train state, one array at a time: each device receives only
        its shards. A fresh optimizer where opt_state is None; EMA weights start from the params
        where none are given."""
        import flax.serialization
        import jax
        opt_template = jax.eval_shape(self.tx.init, params)
        opt_state = flax.serialization.from_state_dict(opt_template, opt_state) if opt_state is not None \
            else self.tx.init(params)
        put = lambda tree, shardings: jax.tree.map(
            lambda a, s: jax.make_array_from_callback(np.shape(a), s, lambda idx: np.asarray(a)[idx]), tree, shardings)
        state = {"params": put(params, self.param_shardings),
                 "opt_state": put(opt_state, self.state_shardings["opt_state"]),
                 "step": put(np.asarray(step, np.int32), self.replicated)}
        if self.args.ema_decay > 0:
            state["ema_params"] = put(params if ema_params is None else ema_params, self.param_shardings)
        return state

    def data_stage(self, step):
        """The index of the data stage that the batch of `step` (0-based) comes from."""
        return max(i for i, (first, _) in enumerate(self.data_stages) if first <= step)

    def data_position(self, data_states):
        """This host's data position among those a checkpoint holds (one per host that wrote it)."""
        if data_states and len(data_states) == self.processes:
            return data_states[self.process]
        log.warning("the checkpoint holds the data positions of %d host(s), this run has %d: every host's data "
                    "stream starts again from the beginning of its epoch order (seed %d), so some samples repeat",
                    len(data_states or []), self.processes, self.args.seed)
        return None

    def read_pickle(self, path):
        """A checkpoint pickle of the seed's format, read by every host (each keeps it in RAM only
        until its own shards are on its devices); any host that cannot read it stops them all."""
        import model as echo
        try:
            payload, error = echo.load_checkpoint_file(path), None
        except echo.CheckpointError as e:
            payload, error = None, str(e)
        failed = agree(error is None, self.processes)
        if failed:
            raise TrainError(error or f"{path} is unreadable on host(s) {', '.join(map(str, failed))}: put it "
                             "where every host can read it")
        return payload


# ----------------------------------------------------------------------------
# Metrics

class Metrics:
    """Append-only JSON Lines on process 0, flushed line by line (the source of truth), mirrored to
    TensorBoard events when a directory is given: step lines under train/, evals under eval/.
    A copy travels with the checkpoints (`history`, rewritten at each one): after a restart that
    puts process 0 on another worker, it replaces the shorter local file, so no history is lost."""

    def __init__(self, path, enabled, tensorboard_dir=None, history=None):
        if history and os.path.abspath(history) == os.path.abspath(path):
            history = None  # the metrics are written next to the checkpoints already
        self.file, self.tensorboard, self.path, self.history = None, None, path, history
        self.lock = threading.Lock()  # the audio-sample thread writes too
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if history:
                self.restore_history()
            self.file = open(path, "a", buffering=1)
            if tensorboard_dir:
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
            if self.tensorboard and "step" in fields and event in (None, "eval"):
                prefix = "eval/" if event else "train/"
                for tag, value in _numbers(fields, ("step", "time", "event")):
                    self.tensorboard.add_scalar(prefix + tag, value, fields["step"], walltime=fields["time"])

    def restore_history(self):
        from etils import epath
        saved = epath.Path(self.history)
        if not saved.exists():
            return
        local = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        if saved.stat().length > local:
            log.info("metrics history restored from %s", self.history)
            data.atomic_write(self.path, lambda tmp: saved.copy(tmp, overwrite=True))

    def save_history(self):
        """Copy the metrics file next to the checkpoints (process 0, after each checkpoint)."""
        if not (self.file and self.history):
            return
        with self.lock, open(self.path, "rb") as f:
            write_atomically(self.history, lambda out: shutil.copyfileobj(f, out, 1 << 20))

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
    from PIL import Image
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
    import dacvae
    dacvae.atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


class AudioSamples:
    """Process 0's decoder of audio samples: a background thread turns generated latents into 48 kHz
    wavs, spectrogram PNGs and an index.json under RUN_DIR/samples/step_XXXXXXX, then appends a
    {"event": "samples"} line naming the index (and the audio to TensorBoard)."""

    def __init__(self, args, metrics, texts, truth, silence_frame):
        import dacvae
        try:
            self.codec = dacvae.DACVAE.load(args.dacvae_weights, flag="--dacvae_weights")
        except dacvae.DACVAEError as e:
            raise TrainError(str(e)) from None
        self.root = os.path.join(args.run_dir, "samples")
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
        import dacvae
        import inference
        directory = os.path.join(self.root, f"step_{step:07d}")
        os.makedirs(directory, exist_ok=True)
        if self.truth_audio is None:
            self.truth_audio = self._decode(self.truth[1])
        clips = [(text, self._decode(inference.trim_trailing_silence(latent, self.silence_frame)), "generated")
                 for text, latent in zip(self.texts, latents)] + [(self.truth[0], self.truth_audio, "ground truth")]
        entries = []
        for i, (text, audio, kind) in enumerate(clips):
            name = f"{i:02d}-{'truth' if kind == 'ground truth' else 'generated'}"
            dacvae.save_audio(os.path.join(directory, name + ".wav"), audio)
            write_spectrogram(os.path.join(directory, name + ".png"), audio, self.codec.sample_rate)
            entries.append({"text": text, "kind": kind, "wav": name + ".wav", "spectrogram": name + ".png",
                            "seconds": round(len(audio) / self.codec.sample_rate, 3)})
            self.metrics.audio(f"samples/{name}", audio, step, self.codec.sample_rate)
        index = os.path.join(directory, "index.json")
        write_json(index, {"step": step, "weights": weights, "samples": entries})
        self.metrics.write(event="samples", step=step, index=os.path.abspath(index), weights=weights,
                           count=len(entries))


def nmse(generated, truth, frames):
    """MSE of generated vs true latents over the valid frames, over that of the per-channel mean."""
    err, base = 0.0, 0.0
    for g, t, n in zip(generated, truth, frames):
        err += np.sum((g[:n] - t[:n]) ** 2)
        base += np.sum((t[:n] - t[:n].mean(axis=0)) ** 2)
    return float(err / max(base, 1e-12))


def synthetic_nmse(module, params, held_out, args):
    """Generate the held-out texts with inference.py's sampler (every host joins) and score them."""
    import inference
    generated = inference.sample_latents(
        module, params, held_out["text_ids"], held_out["text_mask"], held_out["speaker_latent"],
        held_out["speaker_mask"], steps=args.sample_steps, cfg_scale=args.sample_cfg, seed=args.seed + 7,
        num_frames=args.max_latent_len, progress=False)
    return nmse(generated, held_out["latent"], held_out["frames"])


# ----------------------------------------------------------------------------

def train(args, on_eval=None):
    """The training loop. on_eval(step, fields), if given, sees every eval; returning True ends the
    run there (with a checkpoint), as --run_steps would."""
    import flax.linen as nn
    import jax

    import inference
    import model as echo

    if jax.process_count() > 1:
        check_shared_directory(args.checkpoint_dir, jax.process_index(), jax.process_count())
        check_same_flags(args)
    trainer = Trainer(args)
    metrics = Metrics(args.metrics_file, trainer.process == 0, args.tensorboard_dir,
                      history=os.path.join(args.checkpoint_dir, METRICS_HISTORY_FILE))
    stop = {"signal": None}
    if trainer.processes == 1:  # a pod learns of SIGTERM (or a preemption notice) through JAX's coordinator
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal="SIGTERM"))

    manager = checkpoint_manager(args.checkpoint_dir, args.keep_checkpoints, args.keep_period)
    data_state, samples_seen, state = None, 0, None
    if args.resume == "auto":
        restored = restore_checkpoint(manager, trainer)
        if restored is not None:
            state, meta = restored
            data_state, samples_seen = trainer.data_position(meta.get("data_states")), meta["samples_seen"]
            log.info("resumed from step %d in %s", meta["step"], args.checkpoint_dir)
            metrics.write(event="resumed", step=meta["step"])
            for change in args.flag_changes:
                metrics.write(event="flag_changed", step=meta["step"], **change)
    elif args.resume != "none":  # a pickle of the seed's full format
        payload = trainer.read_pickle(args.resume)
        try:
            params = echo.params_from_checkpoint(payload, trainer.config, args.resume)
            ema = echo.params_from_checkpoint(payload, trainer.config, args.resume, key="ema_params") \
                if "ema_params" in payload and args.ema_decay > 0 else None
        except echo.CheckpointError as e:
            raise TrainError(str(e)) from None
        state = trainer.state_from_numpy(params, payload.get("opt_state"), payload["step"], ema)
        data_state, samples_seen = trainer.data_position(payload.get("data_states")), payload.get("samples_seen", 0)
        del payload, params, ema
        log.info("resumed from step %d of %s; checkpoints go to %s", int(state["step"]), args.resume,
                 args.checkpoint_dir)
        metrics.write(event="resumed", step=int(state["step"]), path=args.resume)
    if state is None and args.init_from:
        payload = trainer.read_pickle(args.init_from)
        try:
            key = "ema_params" if "ema_params" in payload else "params"
            params = echo.params_from_checkpoint(payload, trainer.config, args.init_from, key=key)
            log.info("starting from the %s weights of %s", "EMA" if key == "ema_params" else "raw", args.init_from)
        except echo.CheckpointError as e:
            raise TrainError(str(e)) from None
        state = trainer.state_from_numpy(params, None, 0)
        metrics.write(event="init_from", path=args.init_from, step=0)
    if state is None:
        state = trainer.init_state()
    # Finish building the state before the first step is dispatched: on CPU (gloo) two programs with
    # collectives in flight at once can interleave differently on each host and deadlock.
    jax.block_until_ready(state)

    # A checkpoint's data position belongs to the stage of the last batch it trained.
    stage = trainer.data_stage(max(int(state["step"]) - 1, 0))
    pipeline = data.Pipeline(trainer.data_stages[stage][1], state=data_state)
    step_fn = build_train_step(trainer.model, trainer.tx, args)
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
        train_step = jax.jit(step_fn, in_shardings=(trainer.state_shardings, trainer.batch_sharding),
                             out_shardings=(trainer.state_shardings, trainer.replicated), donate_argnums=(0,))
        # A new data stage starts from the EMA weights with fresh Adam moments, as a new run would.
        start_stage = jax.jit(lambda s: {**s, "params": s.get("ema_params", s["params"]),
                                         "opt_state": restart_moments(trainer.tx, s["opt_state"], s["params"])},
                              out_shardings=trainer.state_shardings, donate_argnums=(0,))
        eval_loss = jax.jit(build_eval_loss(trainer.model, args), in_shardings=(
            trainer.param_shardings, trainer.batch_sharding, trainer.replicated))

    def global_batch(local):
        global_shape = lambda a: (args.global_batch_size,) + a.shape[1:]
        return {k: jax.make_array_from_process_local_data(trainer.batch_sharding, v, global_shape(v))
                for k, v in local.items() if isinstance(v, np.ndarray)}  # not the keys/sources lists

    # Validation only ever sees held-out samples: fixed batches of the held-out source.
    eval_sets, synthetic_eval = [], None
    if trainer.eval_source:
        eval_sets = fixed_batches(trainer, args, trainer.eval_source, trainer.eval_split, args.eval_batches,
                                  "--eval_data")
        rows = slice(trainer.process * trainer.data_config.batch_size,
                     (trainer.process + 1) * trainer.data_config.batch_size)
        eval_batches = [global_batch({k: v[rows] for k, v in b.items()}) for b in eval_sets]
    else:
        log.warning("no held-out data (--eval_data, or a synthetic corpus): no val_loss is reported")
    if args.data == "synthetic":
        held_out = {k: np.concatenate([b[k] for b in eval_sets])[:args.eval_samples] for k in eval_sets[0]}
        synthetic_eval = dict(held_out, frames=held_out["latent_mask"].sum(axis=1))

    # Audio samples: every host generates the fixed prompts (the weights are sharded over all of
    # them); process 0 decodes them in the background.
    prompts, audio = None, None
    if args.sample_every and not args.dacvae_weights:
        log.warning("no --dacvae_weights (or $DACVAE_WEIGHTS): no audio samples are written")
    elif args.sample_every:
        if eval_sets:
            reference = eval_sets[0]
        else:
            log.warning("no held-out data: the audio samples take their speakers from training samples")
            reference = fixed_batches(trainer, args, trainer.source, "train", 1, "--data", open_shards=1)[0]
        texts, prompts = sample_prompts(args, reference)
        if trainer.process == 0:
            frames = int(reference["latent_mask"][0].sum())
            truth = (batch_texts(reference)[0], reference["latent"][0, :frames])
            audio = AudioSamples(args, metrics, texts, truth,
                                 np.median(trainer.silence_latent.astype(np.float32), axis=0))

    start_step = int(state["step"])
    device_kind = jax.devices()[0].device_kind
    peak = peak_flops(device_kind)
    metrics.write(event="start", step=start_step, total_steps=args.steps, run=os.path.basename(
        os.path.abspath(args.run_dir)), preset=args.preset, global_batch_size=args.global_batch_size,
        processes=trainer.processes, devices=jax.device_count(), device_kind=device_kind, peak_flops_per_chip=peak)
    stage_flops = lambda config: echo.flops_per_sample(trainer.config, config.max_latent_len, config.max_text_len,
                                                       config.max_speaker_len)
    flops = stage_flops(trainer.data_stages[stage][1])
    profile_dir = args.tensorboard_dir or os.path.join(args.run_dir, "profile")
    profiling = False
    bad_in_a_row, chrono, pending = 0, Chrono(), None
    step, finished, saving = start_step, False, None

    def finish(record):
        """A dispatched step's checks and metrics line. Called once the next step is dispatched, so
        reading its outputs waits for it alone, never for the step in flight (no host sync)."""
        nonlocal bad_in_a_row
        done, out, step_time = record["step"], record["out"], chrono.lap()
        if not bool(out["finite"]):
            bad_in_a_row += 1
            metrics.write(event="nan_step", step=done, loss=float(out["loss"]))
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", done, bad_in_a_row)
            if bad_in_a_row >= args.max_bad_steps:
                raise TrainError(f"{bad_in_a_row} non-finite steps in a row at step {done}: stopping; the last "
                                 f"checkpoint in {args.checkpoint_dir} is intact (lower --lr or check the data)")
        else:
            bad_in_a_row = 0
        if not record["logged"]:
            return
        counts = np.asarray(out["bucket_count"])
        line = dict(step=done, loss=float(out["loss"]), lr=float(trainer.schedule(done - 1)),
                    grad_norm=float(out["grad_norm"]), step_time=round(step_time, 4),
                    data_wait=round(record["data_wait"], 4),
                    samples_per_sec=round(args.global_batch_size / step_time, 2),
                    latent_seconds_per_sec=round(record["frames"] * trainer.processes / 25.0 / step_time, 2),
                    samples_seen=record["samples_seen"], skipped=record["skipped"],
                    **({"skipped_by_source": record["skipped_by_source"]} if "," in args.data else {}),
                    loss_by_t={f"{i / TIMESTEP_BUCKETS:.1f}-{(i + 1) / TIMESTEP_BUCKETS:.1f}": float(v)
                               for i, v in enumerate(np.asarray(out["bucket_loss"])) if counts[i]})
        if peak is not None:
            line["mfu"] = round(flops * args.global_batch_size / step_time / (peak * jax.device_count()), 4)
        memory = jax.local_devices()[0].memory_stats() or {}  # None on CPU
        if "bytes_in_use" in memory:
            line["device_bytes_in_use"] = int(memory["bytes_in_use"])
            line["device_peak_bytes"] = int(memory.get("peak_bytes_in_use", 0))
        metrics.write(**line)
        if trainer.process == 0:
            print(f"step {done}/{args.steps} loss {line['loss']:.4f} lr {line['lr']:.2e} "
                  f"gnorm {line['grad_norm']:.3f} {line['samples_per_sec']:.1f} samples/s", flush=True)

    def finish_pending():
        """Finish the newest step now: before the loop pauses (eval, samples, checkpoint) or ends."""
        nonlocal pending
        if pending is not None:
            finish(pending)
            pending = None

    def note_committed(saving):
        """Log when the background write of the checkpoint (step, start time) is committed."""
        if saving:
            metrics.write(event="checkpoint_committed", step=saving[0],
                          save_s=round(time.perf_counter() - saving[1], 3))
        return None

    try:
        while step < args.steps:
            if args.profile_range and trainer.process == 0 and step + 1 == args.profile_range[0]:
                jax.profiler.start_trace(profile_dir)
                profiling = True
            if trainer.data_stage(step) != stage:
                stage = trainer.data_stage(step)
                config = trainer.data_stages[stage][1]
                pipeline.close()
                pipeline = data.Pipeline(config)
                with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
                    state = start_stage(state)
                flops = stage_flops(config)
                metrics.write(event="data_stage", step=step, source=config.source)
                log.info("step %d: training on %s from here (EMA weights, fresh Adam moments)", step, config.source)
            t0 = time.perf_counter()
            local = next(pipeline)
            data_wait = time.perf_counter() - t0
            with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
                compile_start = time.perf_counter()
                state, out = train_step(state, global_batch(local))
                if step == start_step or step == trainer.data_stages[stage][0]:
                    jax.block_until_ready(out["loss"])
                    metrics.write(event="compiled", step=step, compile_s=round(time.perf_counter() - compile_start, 2))
            step += 1
            samples_seen += args.global_batch_size
            if profiling and step == args.profile_range[1]:
                profiling = stop_profile(out, profile_dir)
            if pending is not None:
                finish(pending)
            logged = step % args.log_every == 0 or step == args.steps
            pending = dict(step=step, out=out, data_wait=data_wait, frames=float(local["latent_mask"].sum()),
                           samples_seen=samples_seen, logged=logged, skipped=pipeline.counters() if logged else None,
                           skipped_by_source=pipeline.source_counters() if logged and "," in args.data else None)
            slot_done = False
            if (step % args.eval_every == 0 or step == args.steps) and eval_sets:
                finish_pending()
                with chrono.pause(), jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
                    fields = {"step": step, "event": "eval"}
                    for name, key in (("val_loss", "params"), ("val_loss_ema", "ema_params")):
                        if key in state:
                            losses = [eval_loss(state[key], b, np.int32(i)) for i, b in enumerate(eval_batches)]
                            fields[name] = float(np.mean([float(v) for v in losses]))
                    if synthetic_eval is not None:
                        fields["synthetic_nmse"] = synthetic_nmse(trainer.model, state["params"], synthetic_eval, args)
                        if "ema_params" in state:
                            fields["synthetic_nmse_ema"] = synthetic_nmse(trainer.model, state["ema_params"],
                                                                          synthetic_eval, args)
                    metrics.write(**fields)
                    slot_done = on_eval is not None and bool(on_eval(step, fields))
            if prompts is not None and step % args.sample_every == 0:
                finish_pending()
                weights = "ema_params" if "ema_params" in state else "params"
                with chrono.pause(), jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
                    latents = inference.sample_latents(trainer.model, state[weights], **prompts, steps=args.sample_steps,
                                                       cfg_scale=args.sample_cfg, seed=args.seed + 11,
                                                       num_frames=args.max_latent_len, progress=False)
                if audio is not None:
                    audio.submit(step, latents, "ema" if weights == "ema_params" else "raw")
            if trainer.processes > 1:  # every host reaches the agreed step, then all checkpoint there
                from jax.experimental import multihost_utils
                preempted = multihost_utils.reached_preemption_sync_point(step)
            else:
                preempted = stop["signal"] is not None
            slot_done = slot_done or (args.run_steps is not None and step - start_step >= args.run_steps)
            if saving and not manager.is_saving_in_progress():
                saving = note_committed(saving)
            if step % args.checkpoint_every == 0 or step == args.steps or preempted or slot_done:
                # A preempted host has about 30 s: only the sharded save, no pickle export.
                finish_pending()
                started = time.perf_counter()
                with chrono.pause():
                    sharded, exported = save_checkpoint(manager, trainer, state, step, pipeline.state(),
                                                        samples_seen, export=not preempted)
                metrics.write(event="checkpoint", step=step, path=echo.step_path(args.checkpoint_dir, step),
                              blocking_s=round(sharded, 3), export_s=round(exported, 3))
                with chrono.pause():
                    metrics.save_history()
                saving = (step, started)
            if preempted:
                manager.wait_until_finished()
                saving = note_committed(saving)
                metrics.write(event="preempted", step=step)
                log.info("preempted: checkpoint written at step %d, exiting", step)
                break
            if slot_done:
                break
        finish_pending()
        if profiling:
            stop_profile(out, profile_dir)
        manager.wait_until_finished()
        note_committed(saving)
        finished = True
    finally:
        # A save under way still commits when the loop fails; on a pod only when every host got this
        # far (orbax's commit waits for all of them).
        if finished or trainer.processes == 1:
            manager.close()
    if audio is not None:
        audio.close()
    metrics.close()
    pipeline.close()
    return state


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


def stop_profile(out, directory):
    """End the jax.profiler trace once the traced steps have run; returns False (not profiling)."""
    import jax
    jax.block_until_ready(out["loss"])
    jax.profiler.stop_trace()
    log.info("profile written to %s (tensorboard --logdir %s, Profile tab; or xprof)", directory, directory)
    return False


# ----------------------------------------------------------------------------
# Ahead-of-time compile for a TPU pod (no TPU, no data needed)

TPU_TOPOLOGIES = {"v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:4x4x2",
                  "v4-128": "v4:4x4x4"}
V4_HBM_BYTES = 32 * 2 ** 30


def aot_compile(args):
    """Compile the real train step for a TPU topology with libtpu; report per-chip memory."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    import model as echo

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
    devices = np.asarray(topology.devices)
    config = dataclasses.replace(echo.PRESETS[args.preset], dtype=args.dtype or "bfloat16", remat=args.remat)
    mesh_data = args.mesh_data or len(devices) // fsdp_devices(config, len(devices))
    if args.global_batch_size % len(devices) or len(devices) % mesh_data:
        raise TrainError(f"--global_batch_size {args.global_batch_size} must split over the {len(devices)} chips")
    mesh = jax.sharding.Mesh(devices.reshape(mesh_data, -1), ("data", "fsdp"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model = echo.EchoDiT(config)
    rules = echo.logical_axis_rules()
    tx, _ = make_optimizer(args)
    abstract, shardings = state_layout(config, tx, mesh, rules, args.ema_decay > 0)  # EMA weights count too
    replicated = shardings["step"]
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    b = args.global_batch_size
    shapes = {"latent": ((b, args.max_latent_len, 128), jnp.float32), "latent_mask": ((b, args.max_latent_len), jnp.int32),
              "text_ids": ((b, args.max_text_len), jnp.int32), "text_mask": ((b, args.max_text_len), jnp.int32),
              "speaker_latent": ((b, args.max_speaker_len, 128), jnp.float32),
              "speaker_mask": ((b, args.max_speaker_len), jnp.int32)}
    batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding) for k, (s, d) in shapes.items()}
    step_fn = build_train_step(model, tx, args)
    start = time.perf_counter()
    result = {"topology": name, "chips": len(devices), "preset": args.preset, "global_batch_size": b,
              "remat": args.remat, "dtype": config.dtype, "hbm_bytes": V4_HBM_BYTES,
              "flops_per_step": echo.flops_per_sample(config, args.max_latent_len, args.max_text_len,
                                                      args.max_speaker_len) * b}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = jax.jit(step_fn, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated),
                          donate_argnums=(0,)).lower(state, batch)
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


class StoredArray:
    """One array of a checkpoint on disk (a zarr directory), read only when it is pickled."""

    def __init__(self, path):
        self.path = path

    def read(self):
        import tensorstore
        kvstore = self.path if "://" in self.path else {"driver": "file", "path": self.path}  # gs:// as a URL
        return tensorstore.open({"driver": "zarr", "kvstore": kvstore}).result().read().result()


def export_checkpoint(source, out):
    """`python train_pretrain.py export CHECKPOINT OUT.pkl`: a training checkpoint (its directory, or
    one step of it) as one pickle of the seed's full format (params, opt_state, step, samples_seen,
    EMA weights, config, data positions, flags), which --resume and --init_from read. Each array is
    read from the checkpoint when the pickle reaches it: the host holds one array at a time."""
    import flax.serialization
    import jax
    import orbax.checkpoint as ocp

    import model as echo
    try:
        directory, step = echo.find_checkpoint_step(source)
        step_dir = echo.step_path(directory, step)
        meta = read_json(os.path.join(step_dir, "meta", "metadata"))
        stored = ocp.PyTreeCheckpointer().metadata(os.path.join(step_dir, "state")).item_metadata.tree
        config = echo.EchoConfig(**meta["config"])
        mesh = jax.make_mesh((1, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                             devices=jax.devices()[:1])
        abstract, _ = state_layout(config, make_optimizer(argparse.Namespace(**meta["flags"]))[0], mesh,
                                   echo.logical_axis_rules(), "ema_params" in stored)
    except (echo.CheckpointError, OSError, ValueError, KeyError, TypeError) as e:
        raise TrainError(f"{source} is not a readable training checkpoint ({type(e).__name__}: {str(e)[:200]})") \
            from None

    def leaf(path, _):
        node = stored
        for key in path:  # dict keys, namedtuple fields, list indices: orbax's tree mirrors the state's
            node = node[getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))]
        return StoredArray(os.path.join(step_dir, "state", node.name))

    lazy = jax.tree_util.tree_map_with_path(leaf, {k: v for k, v in abstract.items() if k != "step"})
    payload = {key: flax.serialization.to_state_dict(value) for key, value in lazy.items()}
    payload.update(step=step, samples_seen=meta["samples_seen"], config=meta["config"],
                   max_lengths=meta["max_lengths"], silence_latent=np.asarray(meta["silence_latent"], np.float16),
                   data_states=meta["data_states"], train_args=meta["flags"])
    fetch = lambda obj: obj.read() if isinstance(obj, StoredArray) else None
    try:
        write_atomically(out, lambda f: StreamingPickler(f, fetch).dump(payload))
    except OSError as e:
        raise TrainError(f"cannot write {out} ({e.strerror or e})") from None
    except Exception as e:  # a damaged array raises whatever tensorstore meets
        raise TrainError(f"{step_dir} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    print(f"wrote step {step} of {directory} to {out}")


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax narrates every file of every save at INFO
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        if len(argv) != 3:
            print("usage: python train_pretrain.py export CHECKPOINT OUT.pkl", file=sys.stderr)
            return 2
        try:
            export_checkpoint(argv[1], argv[2])
        except TrainError as e:
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
            joined = init_distributed(args.distributed_timeout if args else DISTRIBUTED_TIMEOUT_S)
        if refused is not None:
            raise refused
        import jax
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
    except (TrainError, data.DataError) as e:
        if joined:
            leave_pod(str(e), tell_others=True)
        print(f"train_pretrain.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        if joined and any(sign in str(e) for sign in PEER_LOST_SIGNS):
            leave_pod("lost contact with another host in the middle of a collective (it stopped or died: see its "
                      "log); rerun the same command to resume from the last checkpoint", tell_others=True)
        if joined:  # a defect: its traceback here, one sentence everywhere
            leave_pod(f"{type(e).__name__}: {str(e)[:300]} (the traceback is in that host's log)",
                      tell_others=True, with_traceback=True)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
