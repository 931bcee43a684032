"""Speed and memory benchmarks. One JSON object per line on stdout, one per section.

    python bench.py            # every section
    python bench.py model      # just one

Sections:
  model   forward and train-step (forward + backward + AdamW) time of a small Echo DiT,
          achieved GFLOP/s, the machine's measured float32 matmul peak, MFU, compile time.
  dacvae  encode and decode of 10 s of audio with the full-size codec (random weights):
          seconds, real-time factors, peak memory, and the chunked-vs-whole gap.
  data    samples per second on ONE core, from local shards to batches, default lengths
          (768 frames / bytes / speaker frames), against what a 1.3B run needs per host.
  build   corpus.py build with the full-size codec (random weights): clips per second and seconds of
          audio encoded per second, from a manifest of 2-6 s clips to finished shards.
  train   train_pretrain.py's real step (flow matching, CFG dropout, AdamW, clipping) for the tiny
          preset and the small config: step time and MFU; then a simulated 2-host pod of the 840M
          preset saves, restores and continues: each host's peak RSS against the full train state,
          and each checkpoint's blocking and total save seconds (about 25 GB of RAM in all).
  inference  inference.py's sampler for the tiny preset and the small config (768 text bytes,
          768 speaker frames, 15 s = 375 frames): median seconds per Euler step with joint and with
          independent guidance (also with temporal score rescaling on), against one decoder-only
          forward over as many rows (2 and 3); sampling real-time factor at 32 steps; the per-step
          dispatch cost; compile time cold and from a warm cache. Then blockwise generation's time to
          the first block (24 frames of --blocks 24,48,rest) against the whole canvas, for the
          demo-blockwise and 840M-blockwise presets (random weights).
  tpu_aot the 1.3B train step compiled for a v4-64 with libtpu: per-chip memory at global batch
          256 and 448, compile time.
  learn   the demo preset on a synthetic corpus (`--corpus`, default `words`: 10-40 bytes over ~40
          characters; `durations`: letters of their own lengths) for up to `--minutes` (60): the
          held-out curve, and the steps and minutes until synthetic_cer < 0.1 with
          synthetic_end_frames < 2, or the curve if it never gets there. Not part of the default run
          (`python bench.py learn --corpus durations`).
  sampler the demo model (a default `--data synthetic` run: $ECHO_DEMO_RUN, else trained first) on
          held-out texts: sampling on the trained canvas and trimming vs on a shorter canvas, and
          8/16/32 Euler steps on the uniform grid vs sway sampling. Not in the default run either.
  blockwise the blockwise demo model (`--synthetic_corpus short --preset demo-blockwise --prefix_prob
          0.5`, 4000 steps: $ECHO_BLOCKWISE_RUN, else trained first) on 64 held-out texts: synthetic_nmse
          of the whole canvas vs 2 and 3 blocks; each second half after the true first half vs after
          another sample's and after noise. Not in the default run.
  serve   serve.py (demo preset, tiny codec, a model trained 3 steps) under 1, 4, 8 and 16 concurrent
          clients streaming pcm: p50/p99 time to first audio and total latency, audio seconds per wall
          second, each against the same requests one at a time; the goal at 8 clients: 3x the
          throughput, p50 first audio within 2x the idle figure. Not in the default run either.
"""

import argparse
import concurrent.futures
import csv
import dataclasses
import glob
import http.client
import io
import json
import multiprocessing
import os
import resource
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402

import corpus  # noqa: E402
import dacvae  # noqa: E402
import data  # noqa: E402
import inference  # noqa: E402
import model  # noqa: E402
import train_pretrain  # noqa: E402

# The model issue's small config: d 512, 8 layers, 8 heads; encoders 384 / 4 layers / 6 heads.
SMALL = model.EchoConfig(model_size=512, num_layers=8, num_heads=8, intermediate_size=1408,
                         encoder_model_size=384, encoder_num_layers=4, encoder_num_heads=6,
                         encoder_intermediate_size=1056, text_model_size=384, text_num_layers=4,
                         text_num_heads=6, text_intermediate_size=1056)
SMALL_BATCH = dict(batch=4, latent_len=250, text_len=128, speaker_len=128)


def best_time(fn, *args, repeats=5, reduce=min):
    """Best (or, with reduce=np.median, median) wall time of `fn(*args)` (blocking), after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(reduce(times))


def matmul_peak_gflops(n=2048, dtype=jnp.float32):
    """The machine's float32 matmul throughput: the denominator of MFU."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    b = jnp.asarray(np.random.default_rng(1).normal(size=(n, n)), dtype)
    mm = jax.jit(lambda a, b: a @ b)
    return 2 * n ** 3 / best_time(mm, a, b, repeats=10) / 1e9


def random_batch(config, batch, latent_len, text_len, speaker_len, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        x=rng.normal(size=(batch, latent_len, config.latent_size)).astype(np.float32),
        t=rng.uniform(size=(batch,)).astype(np.float32),
        text_ids=rng.integers(1, 256, size=(batch, text_len)).astype(np.int32),
        text_mask=np.ones((batch, text_len), np.int32),
        speaker_latent=rng.normal(size=(batch, speaker_len, config.latent_size)).astype(np.float32),
        speaker_mask=np.ones((batch, speaker_len), np.int32),
        target=rng.normal(size=(batch, latent_len, config.latent_size)).astype(np.float32),
    )


def model_inputs(b):
    return b["x"], b["t"], b["text_ids"], b["text_mask"], b["speaker_latent"], b["speaker_mask"]


def time_train_step(config, batch):
    """(compile seconds, best step seconds) of forward + backward + AdamW, params donated."""
    module = model.EchoDiT(config)
    params = nn.unbox(model.init_params(config, jax.random.key(0)))
    tx = optax.adamw(1e-4, b1=0.9, b2=0.99, weight_decay=0.01)

    def train_step(params, opt_state, b):
        loss_fn = lambda p: jnp.mean((module.apply({"params": p}, *model_inputs(b)) - b["target"]) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, tx.init(params), batch).compile()
    compile_s = time.perf_counter() - start
    state = [params, tx.init(params)]

    def one_step(b):
        state[0], state[1], loss = compiled(state[0], state[1], b)
        return loss

    return compile_s, best_time(one_step, batch)


def bench_model():
    config, shape = SMALL, SMALL_BATCH
    batch = random_batch(config, **shape)
    params = nn.unbox(model.init_params(config, jax.random.key(0)))
    forward = jax.jit(lambda p, b: model.EchoDiT(config).apply({"params": p}, *model_inputs(b)))
    forward_s = best_time(forward, params, batch)
    compile_s, train_s = time_train_step(config, batch)
    unscanned = dataclasses.replace(config, scan_layers=False)
    compile_unscanned_s, train_unscanned_s = time_train_step(unscanned, batch)

    # Analytic model FLOPs, checked against XLA's count on an unscanned build (XLA counts a
    # scanned loop body once, so the production program under-reports).
    train_flops = shape["batch"] * model.flops_per_sample(config, shape["latent_len"], shape["text_len"],
                                                          shape["speaker_len"], training=True)
    fwd_flops = train_flops / 3
    xla_fwd = jax.jit(model.EchoDiT(unscanned).apply).lower(
        {"params": nn.unbox(model.abstract_params(unscanned))}, *model_inputs(batch)).compile().cost_analysis()
    peak = matmul_peak_gflops()
    gflops = lambda flops, seconds: flops / seconds / 1e9
    return {
        "section": "model",
        "config": dataclasses.asdict(config),
        "shape": shape,
        "params": model.count_params(config),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "matmul_peak_gflops_per_s": round(peak, 1),
        "forward_gflops_per_step": round(fwd_flops / 1e9, 2),
        "xla_forward_gflops_unscanned": round(xla_fwd["flops"] / 1e9, 2),
        "analytic_over_xla_flops": round(fwd_flops / xla_fwd["flops"], 4),
        "forward_s": round(forward_s, 4),
        "forward_gflops_per_s": round(gflops(fwd_flops, forward_s), 1),
        "forward_mfu": round(gflops(fwd_flops, forward_s) / peak, 3),
        "train_compile_s": round(compile_s, 2),
        "train_step_s": round(train_s, 4),
        "train_gflops_per_s": round(gflops(train_flops, train_s), 1),
        "train_step_mfu": round(gflops(train_flops, train_s) / peak, 3),
        # The same step with the layers unrolled: XLA:CPU's while loop costs the scanned build
        # its stacked residual copies; on TPU the scan is what keeps compile time flat.
        "train_compile_s_unscanned": round(compile_unscanned_s, 2),
        "train_step_s_unscanned": round(train_unscanned_s, 4),
        "train_step_mfu_unscanned": round(gflops(train_flops, train_unscanned_s) / peak, 3),
    }


def _dacvae_measurements(seconds, chunk_frames):
    codec = dacvae.init_random(dacvae.RELEASED_KWARGS)
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 48000)) / 48000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.normal(size=t.shape)).astype(np.float32)
    audio = torch.from_numpy(audio)[None, None]
    start = time.perf_counter()
    latent = codec.encode(audio)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    decoded = codec.decode(latent)
    decode_s = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    chunked_latent = codec.encode(audio, chunk=chunk_frames)
    chunked_audio = codec.decode(latent, chunk=chunk_frames)
    return dict(encode_s=encode_s, decode_s=decode_s, peak_rss_mb=peak_mb,
                chunk_gap_latent=float((chunked_latent - latent).abs().max()),
                chunk_gap_audio=float((chunked_audio - decoded).abs().max()))


def bench_dacvae(seconds=10.0, chunk_frames=100):
    # A fresh process, so that the peak memory is the codec's alone.
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        m = pool.submit(_dacvae_measurements, seconds, chunk_frames).result()
    return {
        "section": "dacvae",
        "config": "released (107.7 M params, random weights), float32",
        "audio_s": seconds,
        "torch_threads": torch.get_num_threads(),
        "encode_s": round(m["encode_s"], 3),
        "decode_s": round(m["decode_s"], 3),
        "encode_rtf": round(m["encode_s"] / seconds, 3),
        "decode_rtf": round(m["decode_s"] / seconds, 3),
        "peak_rss_mb": round(m["peak_rss_mb"]),
        # Chunks of `chunk_frames` frames (8 frames overlap) against one pass over all 10 s.
        "chunk_frames": chunk_frames,
        "chunked_vs_whole_max_abs_latent": m["chunk_gap_latent"],
        "chunked_vs_whole_max_abs_audio": m["chunk_gap_audio"],
    }


def bench_build(clips=12, batch_size=4):
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        weights = os.path.join(root, "codec.pth")
        dacvae.init_random(dacvae.RELEASED_KWARGS).save(weights)
        rows, audio_s = [], 0.0
        for i in range(clips):
            # Speech-like clips of a few lengths, so that equal lengths batch together.
            seconds = float(rng.choice([2.0, 4.0, 6.0]))
            t = np.arange(int(seconds * 48000)) / 48000
            wave = 0.3 * np.sin(2 * np.pi * (150 + 50 * i) * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
            path = os.path.join(root, f"clip{i}.flac")
            soundfile.write(path, (wave + 0.01 * rng.normal(size=t.shape)).astype(np.float32), 48000)
            rows.append({"audio": path, "text": f"clip number {i}", "speaker": f"s{i % 3}"})
            audio_s += seconds
        manifest = os.path.join(root, "manifest.csv")
        with open(manifest, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["audio", "text", "speaker"])
            writer.writeheader()
            writer.writerows(rows)
        start = time.perf_counter()
        report = corpus.build_corpus(manifest, os.path.join(root, "out"), weights, shard_size=1000,
                                     batch_size=batch_size, progress=False)
        seconds = time.perf_counter() - start
        # A fixed cost of every build, whatever its size: the 30 s silence latent it writes.
        start = time.perf_counter()
        dacvae.silence_latent(dacvae.DACVAE.load(weights), 30.0)
        silence_s = time.perf_counter() - start
    encode_s = seconds - silence_s
    return {"section": "build", "codec": "released size, random weights, float32", "clips": clips,
            "audio_s": audio_s, "samples": report["samples"], "build_s": round(seconds, 2),
            "silence_latent_s": round(silence_s, 2), "clips_per_s": round(clips / encode_s, 3),
            "audio_s_per_s": round(audio_s / encode_s, 3)}


def _data_measurements(directory, batches, batch_size, open_shards):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core

    pipeline = data.Pipeline(data.DataConfig(source=directory, batch_size=batch_size, process_index=0,
                                             process_count=1, open_shards=open_shards,
                                             silence_latent=os.path.join(directory, "silence.npy")))
    next(pipeline)
    start = time.perf_counter()
    distinct = []
    for _ in range(batches):
        distinct.append(len(set(next(pipeline)["speakers"])))
    seconds = time.perf_counter() - start
    pipeline.close()
    return {"samples_per_s": round(batches * batch_size / seconds, 1),
            "distinct_speakers_per_batch": round(float(np.mean(distinct)), 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def bench_data(shards=64, per_shard=16, batches=120, batch_size=32, repeats=3):
    """The pipeline at the default lengths (one speaker per shard), reading one shard at a time
    (the pipeline before cross-shard shuffling) and at the default `open_shards`, each in a fresh
    one-core process so that the peak RSS is its own; the median of `repeats` runs each."""
    rng = np.random.default_rng(0)
    directory = tempfile.mkdtemp(prefix="bench-data-")
    np.save(os.path.join(directory, "silence.npy"), np.zeros((750, 128), np.float16))

    def member(tar, name, payload):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    def latent_bytes(frames):
        buffer = io.BytesIO()
        np.save(buffer, rng.normal(size=(frames, 128)).astype(np.float16))
        return buffer.getvalue()

    for s in range(shards):  # clips of 4-30 s with references of 3-40 s, texts of 50-400 bytes
        with tarfile.open(os.path.join(directory, f"shard-{s:05d}.tar"), "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}-{i:06d}"
                member(tar, key + ".npy", latent_bytes(int(rng.integers(100, 760))))
                member(tar, key + ".ref.npy", latent_bytes(int(rng.integers(75, 1000))))
                member(tar, key + ".json", json.dumps({"text": "word " * int(rng.integers(10, 80)),
                                                       "speaker": f"spk{s}"}).encode())
    runs = {"one_shard_at_a_time": [], "default": []}
    for _ in range(repeats):  # alternated, so that drifts of the machine hit both alike
        for name, open_shards in (("one_shard_at_a_time", 1), ("default", data.DataConfig.open_shards)):
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                runs[name].append(dict(pool.submit(_data_measurements, directory, batches, batch_size, open_shards)
                                       .result(), open_shards=open_shards))
    shutil.rmtree(directory)
    median = lambda r: sorted(r, key=lambda x: x["samples_per_s"])[len(r) // 2]
    results = {name: dict(median(r), samples_per_s_runs=[x["samples_per_s"] for x in r]) for name, r in runs.items()}
    needed = 32 * 1.0  # 1.3B at global batch 256 on 8 hosts: 32 samples per host per ~1 s step
    rate = results["default"]["samples_per_s"]
    return {"section": "data", "cores": 1, "batch_size": batch_size, "shards": shards,
            "lengths": {"latent": 768, "text": 768, "speaker": 768}, **results,
            "speed_vs_one_shard": round(rate / results["one_shard_at_a_time"]["samples_per_s"], 3),
            "samples_per_s": rate, "needed_per_host_samples_per_s": needed, "headroom": round(rate / needed, 1)}


def bench_train():
    results = {"section": "train"}
    peak = matmul_peak_gflops()
    results["matmul_peak_gflops_per_s"] = round(peak, 1)
    for name, config, batch, lengths in (("tiny", model.PRESETS["tiny"], 32, (96, 64, 96)),
                                         ("small", SMALL, 4, (250, 128, 128))):
        args = train_pretrain.resolve_defaults(train_pretrain.parse_args(
            ["--global_batch_size", str(batch), "--max_latent_len", str(lengths[0]), "--max_text_len",
             str(lengths[1]), "--max_speaker_len", str(lengths[2])]))
        module = model.EchoDiT(config)
        tx = train_pretrain.make_optimizer(args)
        params = nn.unbox(model.init_params(config, jax.random.key(0)))
        state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
        b = random_batch(config, batch, *lengths)
        b = {"latent": b["x"], "latent_mask": np.ones(b["x"].shape[:2], np.int32), "text_ids": b["text_ids"],
             "text_mask": b["text_mask"], "speaker_latent": b["speaker_latent"], "speaker_mask": b["speaker_mask"]}
        step = jax.jit(train_pretrain.build_train_step(module, args), donate_argnums=(0,))
        run = train_pretrain.run_values(args)
        start = time.perf_counter()
        compiled = step.lower(state, b, run).compile()
        compile_s = time.perf_counter() - start
        holder = [state]

        def one(batch):
            holder[0], metrics = compiled(holder[0], batch, run)
            return metrics["loss"]

        seconds = best_time(one, b)
        flops = batch * model.flops_per_sample(config, *lengths)
        results[name] = {"batch": batch, "lengths": lengths, "compile_s": round(compile_s, 2),
                         "step_s": round(seconds, 4), "samples_per_s": round(batch / seconds, 1),
                         "mfu": round(flops / seconds / 1e9 / peak, 3)}
    results["checkpoint_840M_2_hosts"] = checkpointed_pod("840M", hosts=2)
    return results


def checkpointed_pod(preset, hosts):
    """A simulated pod of `hosts` processes (one device and one core each) trains one step of
    `preset` with a checkpoint, then a restart restores it and trains a second: each host's peak RSS
    (from wait4) in both runs against the size of the full train state, the seconds each checkpoint
    held the loop and its total save seconds, and the weights-only exports process 0 wrote after
    each invocation (none inside the loop). Needs about 12 GB per host at 840M."""
    state_bytes = 12 * model.count_params(model.PRESETS[preset])  # params + two Adam moments, float32
    with tempfile.TemporaryDirectory() as tmp:
        corpus.make_synthetic(os.path.join(tmp, "data"), shards=hosts * 2, samples_per_shard=8, seed=1)
        flags = ["--preset", preset, "--data", os.path.join(tmp, "data"), "--steps", "2", "--global_batch_size",
                 str(hosts), "--max_latent_len", "96", "--max_text_len", "64", "--max_speaker_len", "96",
                 "--checkpoint_every", "1", "--eval_every", "1000", "--ema_decay", "0", "--checkpoint_dir",
                 os.path.join(tmp, "ck"), "--metrics_file", os.path.join(tmp, "metrics.jsonl"), "--silence_latent",
                 os.path.join(tmp, "data", "silence_latent.npy"), "--run_dir", tmp]
        peaks = {}
        for run, extra in (("first", ["--run_steps", "1"]), ("resumed", [])):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            procs = [subprocess.Popen(
                ["taskset", "-c", str(i % os.cpu_count()), sys.executable,
                 os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_pretrain.py"), *flags, *extra],
                env={**os.environ, "ECHO_COORDINATOR": f"127.0.0.1:{port}", "ECHO_NUM_PROCESSES": str(hosts),
                     "ECHO_PROCESS_ID": str(i), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(hosts)]
            for i, proc in enumerate(procs):
                _, status, usage = os.wait4(proc.pid, 0)
                if status:
                    raise RuntimeError(f"{preset} {run} run: host {i} failed (wait status {status})")
                peaks[f"{run}-{i}"] = round(usage.ru_maxrss * 1024 / 2 ** 30, 2)  # ru_maxrss is in KiB
        with open(os.path.join(tmp, "metrics.jsonl")) as f:
            events = [json.loads(line) for line in f if '"event"' in line]
        exports = sorted(n for n in os.listdir(os.path.join(tmp, "ck")) if n.endswith(".params.pkl"))
    saves = [e for e in events if e["event"] == "checkpoint"]
    committed = {e["step"]: e["save_s"] for e in events if e["event"] == "checkpoint_committed"}
    return {"preset": preset, "hosts": hosts, "train_state_gib": round(state_bytes / 2 ** 30, 2),
            "peak_rss_gib": peaks, "max_peak_over_state": round(max(peaks.values()) * 2 ** 30 / state_bytes, 3),
            "saves": [{"step": e["step"], "blocking_s": e["blocking_s"], "total_s": committed.get(e["step"])}
                      for e in saves],
            "max_blocking_s": max(e["blocking_s"] for e in saves),
            "exports_after_the_loop": exports}


_COMPILE_PROBE = """
import json, sys, time
import jax
jax.config.update("jax_compilation_cache_dir", sys.argv[2])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
import bench, inference
config = bench.SMALL if sys.argv[1] == "small" else bench.model.PRESETS["tiny"]
module, params, inputs = bench.inference_inputs(config)
timings = {}
inference.sample_latents(module, params, *inputs, steps=1, num_frames=375, timings=timings, progress=False)
print(json.dumps(timings["compile"]))
"""


def inference_inputs(config, text_len=768, speaker_len=768):
    """(module, params, (text_ids, text_mask, speaker_latent, speaker_mask)) for one utterance."""
    b = random_batch(config, 1, 375, text_len, speaker_len)
    params = nn.unbox(model.init_params(config, jax.random.key(0)))
    return model.EchoDiT(config), params, (b["text_ids"], b["text_mask"], b["speaker_latent"], b["speaker_mask"])


def first_block_figures(preset, frames=375, blocks="24,48,rest", steps=32):
    """A blockwise preset (random weights) sampling 15 s of one utterance: seconds until the first
    block's latents exist, against the whole canvas sampled at once, and all blocks' total. Every
    program compiled before the clock starts."""
    module, params, inputs = inference_inputs(model.PRESETS[preset])
    plan = inference.block_frames(blocks, frames)
    sample = lambda sizes: inference.sample_blocks(module, params, *inputs, blocks=sizes, steps=steps, progress=False)
    for sizes in ([frames], plan):
        list(sample(sizes))
    start = time.perf_counter()
    list(sample([frames]))
    whole_s = time.perf_counter() - start
    start = time.perf_counter()
    parts = sample(plan)
    next(parts)
    first_s = time.perf_counter() - start
    list(parts)
    blocks_s = time.perf_counter() - start
    return {"steps": steps, "blocks": plan, "whole_canvas_s": round(whole_s, 3), "first_block_s": round(first_s, 3),
            "all_blocks_s": round(blocks_s, 3), "first_block_over_whole": round(first_s / whole_s, 3)}


def bench_inference(frames=375, steps=32):
    results = {"section": "inference", "frames": frames, "steps": steps,
               # The 840M step takes seconds here: 4 Euler steps say the same ratio as 32.
               "time_to_first_block": {"demo-blockwise": first_block_figures("demo-blockwise", frames, steps=steps),
                                       "840M-blockwise": first_block_figures("840M-blockwise", frames, steps=4)}}
    for name, config in (("tiny", model.PRESETS["tiny"]), ("small", SMALL)):
        module, params, inputs = inference_inputs(config)
        decode = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c, method=model.EchoDiT.decode))
        row = {}
        for mode, passes in (("joint", 2), ("independent", 3)):
            inputs_on_device = tuple(jnp.asarray(a) for a in inputs)
            encode = inference.compiled_encode(module, mode, params, inputs_on_device)
            cond = encode(params, *inputs_on_device)
            step = inference.compiled_step(module, params, 1, frames, cond)
            holder = [jnp.zeros((1, frames, config.latent_size), jnp.float32)]
            scales = np.full((1, passes - 1), 3.0, np.float32)

            def guided_step(rescale_on=False):
                holder[0] = step(params, holder[0], cond, np.full(1, 0.5, np.float32), np.full(1, 0.4, np.float32),
                                 scales, np.ones(1, bool), np.asarray([[1.2, 3.0]], np.float32),
                                 np.full(1, rescale_on), np.zeros(1, np.int32))
                return holder[0]

            step_s = best_time(guided_step, repeats=7, reduce=np.median)
            rescaled_s = best_time(lambda: guided_step(True), repeats=7, reduce=np.median)
            # The yardstick: one decoder-only forward over as many rows as the guidance passes.
            x, t = jnp.zeros((passes, frames, config.latent_size)), jnp.full((passes,), 0.5)
            forward_s = best_time(decode, params, x, t, cond, repeats=7, reduce=np.median)
            row[mode] = {"step_s": round(step_s, 4), f"decoder_forward_{passes}b_s": round(forward_s, 4),
                         "step_over_forward": round(step_s / forward_s, 3),
                         "step_with_rescaling_over_forward": round(rescaled_s / forward_s, 3)}
            if mode == "joint":
                encode_s = best_time(encode, params, *inputs_on_device)
                noop = jax.jit(lambda p, x, c, *rest: x)  # the cost of dispatching a step with these arguments
                dispatch_s = best_time(lambda: noop(params, holder[0], cond, scales), repeats=20)
                sampling_s = encode_s + steps * step_s
                row.update(encode_s=round(encode_s, 4), dispatch_fraction=round(dispatch_s / step_s, 4),
                           sampling_s_15s_audio=round(sampling_s, 2), sampling_rtf=round(sampling_s / (frames / 25), 4))
        compile_s = {}
        with tempfile.TemporaryDirectory() as cache:
            for kind in ("cold", "warm_cache"):
                out = subprocess.run([sys.executable, "-c", _COMPILE_PROBE, name, cache], capture_output=True,
                                     text=True, check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
                compile_s[kind] = round(json.loads(out.stdout.strip().splitlines()[-1]), 2)
        results[name] = dict(row, compile_s=compile_s)
    return results


def bench_tpu_aot():
    runs = []
    for batch in (256, 448):
        args = train_pretrain.resolve_defaults(train_pretrain.parse_args(
            ["--preset", "1.3B", "--aot_topology", "v4-64", "--global_batch_size", str(batch)]))
        runs.append(train_pretrain.aot_compile(args))
    return {"section": "tpu_aot", "runs": runs}


def bench_learn(which="words", minutes=60.0, steps=None, preset="demo", eval_every=250):
    """A preset (default: demo) trained on a synthetic corpus (default: the 10-40-byte `words`) for up to
    `minutes`, on a schedule of `steps` (default: what 0.15 s steps fill the budget with): the
    held-out curve (val_loss, synthetic_nmse, synthetic_cer, synthetic_end_frames), and the step
    and minute where the goal is first met: CER < LEARN_CER, speech ending within LEARN_END_FRAMES."""
    run_dir = tempfile.mkdtemp(prefix="bench-learn-")
    try:
        steps = steps or int(minutes * 60 / 0.15)  # the demo's step takes ~0.1-0.2 s here: the clock stops the run
        args = train_pretrain.resolve_defaults(train_pretrain.parse_args(
            ["--data", "synthetic", "--synthetic_corpus", which, "--preset", preset, "--run_dir", run_dir,
             "--steps", str(steps), "--eval_every", str(eval_every), "--checkpoint_every", str(10 ** 9),
             "--log_every", "50", "--full_eval_samples", "0"]))
        curve, start, reached = [], time.perf_counter(), None

        def on_eval(step, fields):
            nonlocal reached
            elapsed = (time.perf_counter() - start) / 60
            curve.append({"step": step, "minutes": round(elapsed, 2), "val_loss": round(fields["val_loss"], 4),
                          **{k: round(fields[k], 3) for k in ("synthetic_nmse", "synthetic_cer",
                                                              "synthetic_end_frames")}})
            if reached is None and fields["synthetic_cer"] < LEARN_CER and \
                    fields["synthetic_end_frames"] < LEARN_END_FRAMES:
                reached = curve[-1]
            return reached is not None or elapsed >= minutes  # True: stop training

        train_pretrain.train(args, on_eval=on_eval)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"section": "learn", "corpus": which, "preset": args.preset, "steps_scheduled": steps,
            "goal": {"synthetic_cer_below": LEARN_CER, "synthetic_end_frames_below": LEARN_END_FRAMES},
            "reached": reached, "budget_minutes": minutes, "curve": curve}


def demo_run_dir():
    """A finished default demo run directory: $ECHO_DEMO_RUN, else one trained now (~9 minutes on 2 cores)."""
    run_dir = os.environ.get("ECHO_DEMO_RUN")
    if not run_dir:
        run_dir = tempfile.mkdtemp(prefix="bench-demo-")
        assert train_pretrain.main(["--data", "synthetic", "--run_dir", run_dir]) == 0
    return run_dir


def held_out_batch(run_dir, samples, seed=0):
    """(the run's last exported model, `samples` of its synthetic corpus's held-out split as one batch)."""
    loaded = inference.load_model(sorted(glob.glob(os.path.join(run_dir, "checkpoints", "*.params.pkl")))[-1])
    source = glob.glob(os.path.join(run_dir, "synthetic-*-0-held-out"))[0][:-len("-held-out")]
    pipeline = data.Pipeline(data.DataConfig(
        source=source + "-held-out", batch_size=samples, seed=seed, process_index=0, process_count=1,
        max_latent_len=loaded.max_latent_len, max_text_len=loaded.max_text_len,
        max_speaker_len=loaded.max_speaker_len, silence_latent=os.path.join(source, "silence_latent.npy")))
    batch = next(pipeline)
    pipeline.close()
    return loaded, batch


def bench_sampler(samples=64, seed=0):
    """The demo model's held-out texts sampled on its trained canvas vs a shorter one (synthetic_nmse
    and trimming accuracy), and at 8/16/32 steps on the uniform grid vs F5-TTS's sway (-1)."""
    run_dir = demo_run_dir()
    loaded, batch = held_out_batch(run_dir, samples, seed)
    frames = batch["latent_mask"].sum(axis=1)
    inputs = (batch["text_ids"], batch["text_mask"], batch["speaker_latent"], batch["speaker_mask"])

    def generate(rows, num_frames, **knobs):
        return inference.sample_latents(loaded.module, loaded.params, *(a[rows] for a in inputs), seed=seed,
                                        num_frames=num_frames, progress=False, **knobs)

    def trimmed_right(latents, rows):
        ends = [len(inference.trim_trailing_silence(z, loaded.silence_frame)) for z in latents]
        return float(np.mean([abs(e - (n + inference.TAIL_FRAMES)) <= 1 for e, n in zip(ends, frames[rows])]))

    trained = loaded.max_latent_len
    short = trained * 2 // 3  # as --duration 15 (375 frames) is to the trained 768
    rows = np.flatnonzero(frames + inference.TAIL_FRAMES <= short)  # the texts that fit the short canvas
    canvas = {}
    for name, num_frames in (("trained", trained), ("short", short)):
        latents = generate(rows, num_frames, steps=16)
        canvas[name] = {"frames": num_frames, "synthetic_nmse": round(train_pretrain.nmse(
            latents, batch["latent"][rows], frames[rows]), 4), "trimmed_within_1_frame": trimmed_right(latents, rows)}
    everyone = np.arange(samples)
    schedules = {}
    for steps in (8, 16, 32):
        for name, sway in (("uniform", None), ("sway-1", -1.0)):
            latents = generate(everyone, trained, steps=steps, sway=sway)
            schedules[f"{name}@{steps}"] = round(train_pretrain.nmse(latents, batch["latent"], frames), 4)
    return {"section": "sampler", "run": run_dir, "held_out_samples": samples,
            "canvas": dict(canvas, texts=len(rows)), "schedules_synthetic_nmse": schedules}


# The blockwise demo: `short` (4-8 bytes at 2 frames each: 8-16 frames, 2-4 patches, on a 32-frame canvas).
BLOCKWISE_RUN = ["--data", "synthetic", "--synthetic_corpus", "short", "--preset", "demo-blockwise",
                 "--prefix_prob", "0.5"]
BLOCKWISE_STEPS = 4000
BLOCKWISE_SPLITS = (("whole_canvas", None), ("2_blocks", "8,rest"), ("3_blocks", "4,8,rest"))


def blockwise_run_dir():
    """A finished blockwise demo run directory: $ECHO_BLOCKWISE_RUN, else one trained now (~10 minutes)."""
    run_dir = os.environ.get("ECHO_BLOCKWISE_RUN")
    if not run_dir:
        run_dir = tempfile.mkdtemp(prefix="bench-blockwise-")
        assert train_pretrain.main([*BLOCKWISE_RUN, "--steps", str(BLOCKWISE_STEPS), "--run_dir", run_dir]) == 0
    return run_dir


def blockwise_figures(loaded, batch, seed=0, steps=16, cfg_scale=2.0):
    """A blockwise model on held-out samples: synthetic_nmse of the whole utterance generated as one
    canvas and in 2 and 3 blocks (BLOCKWISE_SPLITS); then the second half of each utterance (from
    its first half, rounded down to whole patches) generated after its TRUE first half, after
    another sample's first half and after Gaussian noise of the latents' scale: the error of that
    second half in each case, and in the whole-canvas generation for reference. Sampled as the
    trainer's eval samples (16 steps, joint guidance 2.0)."""
    frames, truth = batch["latent_mask"].sum(axis=1), batch["latent"]
    inputs = (batch["text_ids"], batch["text_mask"], batch["speaker_latent"], batch["speaker_mask"])
    canvas, patch, everyone = loaded.max_latent_len, loaded.config.encoder_patch_size, np.arange(len(frames))

    def generate(rows, **how):
        return inference.sample_latents(loaded.module, loaded.params, *(a[rows] for a in inputs), seed=seed,
                                        steps=steps, cfg_scale=cfg_scale, num_frames=canvas, progress=False, **how)

    generated = {name: generate(everyone, blocks=spec and inference.block_frames(spec, canvas, patch))
                 for name, spec in BLOCKWISE_SPLITS}
    utterance = {name: round(train_pretrain.nmse(latents, truth, frames), 4) for name, latents in generated.items()}
    splits = np.maximum(frames // 2 // patch * patch, patch)
    noise = np.random.default_rng(seed).standard_normal(truth.shape).astype(np.float32) * truth.std()
    prefixes = {"true_first_half": truth, "another_samples_first_half": truth[np.roll(everyone, 1)],
                "gaussian_noise": noise}
    halves, order = {name: [] for name in ("whole_canvas", *prefixes)}, []
    for split in np.unique(splits):
        rows = np.flatnonzero(splits == split)
        order += list(rows)
        halves["whole_canvas"] += list(generated["whole_canvas"][rows, split:])
        for name, source in prefixes.items():
            halves[name] += list(generate(rows, blocks=[canvas - split], prefix=source[rows, :split]))
    order = np.asarray(order)
    second_truth, second_frames = [truth[i, splits[i]:] for i in order], frames[order] - splits[order]
    return {"samples": len(frames), "steps": steps, "cfg_scale": cfg_scale, "canvas": canvas,
            "utterance_synthetic_nmse": utterance,
            "blocks": dict(BLOCKWISE_SPLITS[1:]),
            "second_half_synthetic_nmse": {name: round(train_pretrain.nmse(generated, second_truth, second_frames), 4)
                                           for name, generated in halves.items()}}


def bench_blockwise(samples=64, seed=0):
    """The blockwise demo model (BLOCKWISE_RUN: $ECHO_BLOCKWISE_RUN, else trained first) on held-out texts:
    blockwise_figures."""
    run_dir = blockwise_run_dir()
    loaded, batch = held_out_batch(run_dir, samples, seed)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        trained = max(json.loads(line).get("step", 0) for line in f)
    return {"section": "blockwise", "run": run_dir, "flags": BLOCKWISE_RUN, "steps_trained": trained,
            **blockwise_figures(loaded, batch, seed)}


SERVE_TEXT = "The quick brown fox jumps over the lazy dog. It was a bright cold day in April."
SERVE_GOAL = {"clients": 8, "throughput_over_one_at_a_time": 3.0, "first_audio_p50_over_idle": 2.0}


def serve_request(port, seed):
    """One streamed pcm request to serve.py: (seconds to the first audio byte, seconds to the last, audio seconds)."""
    body = json.dumps({"model": "echo", "input": SERVE_TEXT, "voice": "random", "response_format": "pcm",
                       "seed": seed}).encode()
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/audio/speech", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    first = response.read(1)
    first_audio = time.perf_counter() - started
    rest = response.read()
    connection.close()
    if response.status != 200:
        raise RuntimeError(f"serve.py answered {response.status}: {(first + rest)[:200]!r}")
    return first_audio, time.perf_counter() - started, (len(first) + len(rest)) / 2 / 24000


def serve_figures(port, seeds, clients):
    """`seeds` requested by `clients` concurrent clients: latency percentiles and audio seconds per second."""
    queue = list(seeds)
    results, errors, lock = [], [], threading.Lock()

    def client():
        while True:
            with lock:
                if not queue:
                    return
                seed = queue.pop()
            try:
                results.append(serve_request(port, seed))
            except (OSError, RuntimeError) as e:
                errors.append(e)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(seeds)} requests failed, e.g. {errors[0]}")
    first, total, audio = (np.array(column) for column in zip(*results))
    return {"requests": len(results), "first_audio_p50_s": round(float(np.percentile(first, 50)), 3),
            "first_audio_p99_s": round(float(np.percentile(first, 99)), 3),
            "latency_p50_s": round(float(np.percentile(total, 50)), 3),
            "latency_p99_s": round(float(np.percentile(total, 99)), 3),
            "audio_seconds_per_second": round(float(audio.sum() / wall), 2)}


def bench_serve(levels=(1, 4, 8, 16), requests_per_client=2):
    """serve.py with the demo preset and the tiny codec: for each number of concurrent clients, the
    latencies and throughput of their streamed requests, against the same requests one at a time."""
    work = tempfile.mkdtemp(prefix="bench-serve-")
    here = os.path.dirname(os.path.abspath(__file__))
    server = None
    try:
        subprocess.run([sys.executable, os.path.join(here, "train_pretrain.py"), "--preset", "demo", "--data",
                        "synthetic", "--run_dir", os.path.join(work, "run"), "--steps", "3", "--eval_every", "1000",
                        "--full_eval_samples", "0"], check=True, capture_output=True)
        subprocess.run([sys.executable, os.path.join(here, "dacvae.py"), "init-random", os.path.join(work, "codec.pth"),
                        "--size", "tiny"], check=True, capture_output=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = subprocess.Popen([sys.executable, os.path.join(here, "serve.py"), "--checkpoint",
                                   os.path.join(work, "run", "checkpoints"), "--dacvae_weights",
                                   os.path.join(work, "codec.pth"), "--port", str(port), "--voices_dir",
                                   os.path.join(work, "voices"), "--max_batch", str(max(levels))],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.perf_counter()
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.perf_counter() - started > 900:
                    raise RuntimeError("serve.py did not become ready")
                time.sleep(1)
        ready_s = time.perf_counter() - started
        serve_request(port, 0)  # the first request warms what compilation leaves cold
        rows = []
        for clients in levels:
            seeds = range(1000 * clients, 1000 * clients + clients * requests_per_client)
            alone = serve_figures(port, seeds, 1)
            together = serve_figures(port, seeds, clients)
            rows.append({"clients": clients, "together": together, "one_at_a_time": alone,
                         "throughput_over_one_at_a_time": round(together["audio_seconds_per_second"]
                                                                / alone["audio_seconds_per_second"], 2),
                         "first_audio_p50_over_idle": round(together["first_audio_p50_s"]
                                                            / alone["first_audio_p50_s"], 2)})
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    goal_row = next((r for r in rows if r["clients"] == SERVE_GOAL["clients"]), None)
    met = goal_row is not None and \
        goal_row["throughput_over_one_at_a_time"] >= SERVE_GOAL["throughput_over_one_at_a_time"] and \
        goal_row["first_audio_p50_over_idle"] <= SERVE_GOAL["first_audio_p50_over_idle"]
    return {"section": "serve", "preset": "demo", "codec": "tiny", "text": SERVE_TEXT, "format": "pcm",
            "ready_s": round(ready_s, 1), "levels": rows, "goal": SERVE_GOAL, "goal_met": met}


LEARN_CER, LEARN_END_FRAMES = 0.1, 2.0  # bench_learn's goal: the words said, ending where they should

SECTIONS = {"model": bench_model, "dacvae": bench_dacvae, "data": bench_data, "build": bench_build,
            "train": bench_train, "inference": bench_inference, "tpu_aot": bench_tpu_aot, "learn": bench_learn,
            "sampler": bench_sampler, "blockwise": bench_blockwise, "serve": bench_serve}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", help=f"sections to run (default: all of {', '.join(SECTIONS)})")
    parser.add_argument("--corpus", default="words", help="learn: the synthetic corpus to train (default words; "
                        f"one of {', '.join(corpus.SYNTHETIC_CORPORA)})")
    parser.add_argument("--minutes", type=float, default=60.0, help="learn: the budget in minutes (default 60)")
    parser.add_argument("--steps", type=int, default=None, help="learn: the run's --steps, which its learning rate "
                        "schedule spans (default: as many as 0.15 s steps fill the budget with)")
    parser.add_argument("--preset", default="demo", help="learn: the model preset (default demo)")
    args = parser.parse_args()
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        sys.exit(f"bench.py: unknown section {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.corpus not in corpus.SYNTHETIC_CORPORA:
        sys.exit(f"bench.py: --corpus must be one of {', '.join(corpus.SYNTHETIC_CORPORA)}, got {args.corpus!r}")
    if not args.minutes > 0:
        sys.exit(f"bench.py: --minutes must be positive, got {args.minutes}")
    for name in args.sections or [s for s in SECTIONS if s not in ("learn", "sampler", "blockwise", "serve")]:
        if name == "learn":
            result = bench_learn(args.corpus, args.minutes, args.steps, args.preset)
        else:
            result = SECTIONS[name]()
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
