"""serve.py as its clients see it: a real server on 127.0.0.1, talked to with the `openai` client and
plain HTTP."""
import dataclasses
import io
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import flax.linen as nn
import jax
import numpy as np
import openai
import pytest
import soundfile
import soxr
from conftest import COMPILE_CACHE, REPO, free_port

import checkpoint
import dacvae
import inference
import model as echo
import serve
import train_pretrain

TEXT = "The first sentence is here. A second one follows it."
# A server thread that dies (the scheduler's, the decoder's) fails the test that killed it.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint written by train_pretrain.py and codec weights from `dacvae.py init-random`."""
    root = tmp_path_factory.mktemp("serve")
    assert train_pretrain.main(["--preset", "tiny", "--synthetic_corpus", "short", "--run_dir", str(root / "run"),
                                "--steps", "3", "--global_batch_size", "8", "--max_latent_len", "40",
                                "--max_text_len", "32", "--max_speaker_len", "48", "--eval_every", "100",
                                "--eval_samples", "0", "--full_eval_samples", "0"]) == 0
    assert dacvae.main(["init-random", str(root / "codec.pth"), "--size", "tiny", "--seed", "1"]) in (0, None)
    return {"root": root, "checkpoint": str(root / "run" / "checkpoints"), "codec": str(root / "codec.pth")}


def flags(files, port, *extra):
    return ["--checkpoint", files["checkpoint"], "--dacvae_weights", files["codec"], "--port", str(port),
            "--voices_dir", str(files["root"] / "voices"), "--max_batch", "4",
            "--compile_cache_dir", COMPILE_CACHE, *extra]


@pytest.fixture(scope="module")
def served(files):
    """serve.py in this process (uvicorn in a thread), ready."""
    yield from running(files)


def running(files, *extra):
    port = free_port()
    args = serve.parse_args(flags(files, port, *extra))
    server, http = serve.build(args)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    assert server.scheduler.ready.wait(600) and wait_until(lambda: http.started)
    base = f"http://127.0.0.1:{port}"
    yield {"server": server, "base": base,
           "client": openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)}
    http.should_exit = True
    thread.join(30)
    server.scheduler.stop()


def wait_until(condition, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def speech(served, fmt="wav", seed=1, voice="random", text=TEXT, **knobs):
    response = served["client"].audio.speech.create(model="echo", voice=voice, input=text, response_format=fmt,
                                                    extra_body={"seed": seed, "steps": 4, **knobs})
    return response.content


def decoded(data):
    audio, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert rate == 48000
    return audio


def http(served, method, path, body=None, headers=None):
    """(status, headers, body) of a plain HTTP request."""
    request = urllib.request.Request(served["base"] + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post_json(served, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http(served, "POST", "/v1/audio/speech", data, {"Content-Type": "application/json", **(headers or {})})


def openai_error(status, body):
    """The error's message, asserting OpenAI's error shape and a 4xx status."""
    error = json.loads(body)["error"]
    assert 400 <= status < 500 and set(error) == {"message", "type", "param", "code"}, (status, body)
    return error["message"]


def relative_difference(a, b):
    assert len(a) == len(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_every_format_decodes_and_pcm_is_the_same_audio_at_24_khz(served):
    wav = decoded(speech(served, "wav"))
    assert 0.2 < len(wav) / 48000 < 10 and np.isfinite(wav).all() and np.abs(wav).max() > 0
    assert relative_difference(decoded(speech(served, "flac")), wav) < 1e-3  # both 16-bit
    for fmt in ("mp3", "opus"):  # lossy: the same length, give or take the codec's frames
        assert abs(len(decoded(speech(served, fmt))) - len(wav)) < 0.05 * 48000, fmt
    pcm = np.frombuffer(speech(served, "pcm"), "<i2").astype(np.float32) / 32767
    assert abs(len(pcm) - len(wav) / 2) <= 1
    expected = np.clip(soxr.resample(wav, 48000, 24000), -1, 1)  # 16-bit holds no overshoot
    n = min(len(pcm), len(expected))
    assert relative_difference(pcm[:n], expected[:n]) < 1e-2


def test_same_seed_same_audio_and_the_default_format_is_mp3(served):
    assert speech(served, seed=5) == speech(served, seed=5)
    assert speech(served, seed=5) != speech(served, seed=6)
    data = served["client"].audio.speech.create(model="echo", voice="random", input="Hello.",
                                                extra_body={"steps": 2}).content
    assert data[:3] == b"ID3" or data[0] == 0xFF  # an MP3 stream, as OpenAI's default


ROW_KNOBS = {10: {}, 11: {"steps": 7, "cfg_text": 2.0, "cfg_speaker": 4.0},
             12: {"cfg_scale": 1.5, "cfg_min_t": 0.5, "rescale_k": 1.2, "rescale_sigma": 3.0},
             13: {"steps": 5, "speaker_kv_scale": 1.5, "speaker_kv_min_t": 0.6, "truncation": 0.8}}


def test_concurrent_clients_get_what_they_get_alone_and_share_steps(served):
    """Rows of different requests share steps, each with its own seed, step count, guidance and knobs."""
    alone = {seed: decoded(speech(served, seed=seed, **knobs)) for seed, knobs in ROW_KNOBS.items()}
    steps_before = batched_steps(served)
    together, errors = {}, []

    def client(seed):
        try:
            together[seed] = decoded(speech(served, seed=seed, **ROW_KNOBS[seed]))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in alone]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert max(relative_difference(together[s], alone[s]) for s in alone) < 1e-2
    assert batched_steps(served) > steps_before  # some steps sampled rows of several requests at once


def test_a_bounded_load_beyond_the_batch_is_answered_in_full(served):
    """16 requests from 8 clients at once, twice the rows the server samples together: every one is
    answered with its audio, and the queue empties."""
    answered = requests_answered(served)
    results = []

    def client(first_seed):
        for seed in (first_seed, first_seed + 100):
            status, _, body = post_json(served, {"model": "echo", "input": "Hello there. Goodbye.", "voice": "random",
                                                 "response_format": "wav", "steps": 4, "seed": seed})
            results.append((status, len(decoded(body)) if status == 200 else body))

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
    [t.start() for t in threads]
    [t.join(300) for t in threads]
    assert len(results) == 16 and all(status == 200 and n > 0 for status, n in results), results
    assert requests_answered(served) == answered + 16
    assert wait_until(lambda: served["server"].scheduler.busy_rows() == 0 and not served["server"].scheduler.waiting)


def requests_answered(served):
    _, _, text = http(served, "GET", "/metrics")
    return sum(float(line.split()[-1]) for line in text.decode().splitlines()
               if line.startswith('echo_requests_total{status="200"}'))


def batched_steps(served):
    """Steps the scheduler took over more than one row so far, read from /metrics."""
    _, _, text = http(served, "GET", "/metrics")
    counts = {}
    for line in text.decode().splitlines():
        if line.startswith("echo_step_rows_bucket"):
            counts[line.split('le="')[1].split('"')[0]] = float(line.split()[-1])
    return counts["+Inf"] - counts["1.0"]


def test_streaming_sends_the_first_sentence_before_the_last_is_sampled(served):
    text = " ".join(f"Sentence number {i} is here." for i in range(6))
    arrivals, started = [], time.monotonic()
    with served["client"].audio.speech.with_streaming_response.create(
            model="echo", voice="random", input=text, response_format="pcm", extra_body={"seed": 3, "steps": 24}) as r:
        for chunk in r.iter_bytes(1024):
            arrivals.append((time.monotonic() - started, len(chunk)))
    first, whole = arrivals[0][0], arrivals[-1][0]
    assert sum(n for _, n in arrivals) > 0 and first < 0.5 * whole, (first, whole)
    # Server-sent events carry the same audio, base64 in speech.audio.delta events.
    status, headers, body = post_json(served, {"model": "echo", "input": "One. Two.", "voice": "random",
                                               "response_format": "pcm", "stream_format": "sse", "steps": 2})
    events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert [e["type"] for e in events][-1] == "speech.audio.done"
    import base64
    streamed = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert streamed == served["client"].audio.speech.create(model="echo", voice="random", input="One. Two.",
                                                            response_format="pcm",
                                                            extra_body={"steps": 2}).content


def test_a_voice_is_uploaded_listed_used_kept_and_deleted(served, files):
    rate = 48000
    t = np.arange(3 * rate) / rate
    recording = io.BytesIO()
    soundfile.write(recording, (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2)
                    .astype(np.float32), rate, format="FLAC")
    status, _, body = upload(served, "narrator", recording.getvalue(), "ref.flac")
    assert status == 201 and json.loads(body)["name"] == "narrator", body
    status, _, body = http(served, "GET", "/v1/audio/voices")
    assert status == 200 and "narrator" in [v["name"] for v in json.loads(body)["voices"]]
    assert os.path.exists(files["root"] / "voices" / "narrator.npy")  # a restart finds it
    voiced, random_voice = decoded(speech(served, voice="narrator")), decoded(speech(served))
    assert len(voiced) > 0 and not np.array_equal(voiced[:len(random_voice)], random_voice[:len(voiced)])
    status, _, _ = http(served, "DELETE", "/v1/audio/voices/narrator")
    assert status == 200 and not os.path.exists(files["root"] / "voices" / "narrator.npy")
    status, _, body = post_json(served, {"model": "echo", "input": "Hi.", "voice": "narrator"})
    assert "narrator" in openai_error(status, body)
    status, _, body = http(served, "DELETE", "/v1/audio/voices/narrator")
    assert status == 404 and "narrator" in openai_error(status, body)


def upload(served, name, data, filename):
    boundary = "echo-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n{name}\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return http(served, "POST", "/v1/audio/voices", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


@pytest.mark.parametrize("body, needle", [
    ({"input": ""}, "input"),
    ({"input": "word " * 1000}, "4096"),
    ({"input": 42}, "input"),
    ({"voice": "nobody"}, "nobody"),
    ({"response_format": "aac"}, "aac"),
    ({"speed": 2.0}, "speed"),
    ({"steps": -3}, "steps"),
    ({"steps": "many"}, "steps"),
    ({"cfg_min_t": 0.9, "cfg_max_t": 0.1}, "cfg_min_t"),
    ({"sampler_preset": "Fastest"}, "Fastest"),
    ({"loudness_knob": 3}, "loudness_knob"),
    ({"model": "tts-1"}, "tts-1"),
    (b"{not json", "JSON"),
    ([1, 2], "JSON object"),
])
def test_bad_requests_are_4xx_in_openai_shape(served, body, needle):
    if isinstance(body, dict):
        body = {"model": "echo", "input": "Hello.", "voice": "random", **body}
    status, _, answer = post_json(served, body)
    assert needle in openai_error(status, answer)


def test_bad_uploads_auth_overload_and_timeouts(served):
    status, _, body = upload(served, "noise", b"this is not audio" * 100, "x.wav")
    assert "not audio" in openai_error(status, body)
    status, _, body = upload(served, "random", b"", "x.wav")
    assert "name" in openai_error(status, body)
    status, _, body = http(served, "POST", "/v1/audio/voices", b"--x\r\nbroken",
                           {"Content-Type": "multipart/form-data; boundary=x"})
    assert openai_error(status, body)
    settings = served["server"].settings
    settings.max_upload_mb = 0.001
    try:
        status, _, body = upload(served, "large", b"\0" * 4000, "x.wav")
        assert status == 413 and openai_error(status, body)
    finally:
        settings.max_upload_mb = 20.0
    settings.api_key = "sesame"
    try:
        status, _, body = post_json(served, {"model": "echo", "input": "Hi.", "voice": "random"})
        assert status == 401 and "API key" in openai_error(status, body)
        status, _, _ = post_json(served, {"model": "echo", "input": "Hi.", "voice": "random", "steps": 2},
                                 {"Authorization": "Bearer sesame"})
        assert status == 200
    finally:
        settings.api_key = None
    settings.max_requests = 1
    try:
        results = []
        threads = [threading.Thread(target=lambda: results.append(post_json(
            served, {"model": "echo", "input": TEXT, "voice": "random", "steps": 40}))) for _ in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        refused = [r for r in results if r[0] == 429]
        assert refused and all(r[1].get("retry-after") for r in refused) and any(r[0] == 200 for r in results)
    finally:
        settings.max_requests = 64
    settings.request_timeout = 0.05
    try:
        status, _, body = post_json(served, {"model": "echo", "input": TEXT, "voice": "random", "steps": 60})
        assert status == 504 and json.loads(body)["error"]["message"]
    finally:
        settings.request_timeout = 300.0
    assert wait_until(lambda: served["server"].scheduler.busy_rows() == 0)


def test_a_row_that_goes_non_finite_fails_its_request_alone(served):
    results = {}

    def ask(name, **knobs):
        results[name] = post_json(served, {"model": "echo", "input": "Hello there.", "voice": "random",
                                           "response_format": "wav", "steps": 8, **knobs})

    threads = [threading.Thread(target=ask, args=("bad",), kwargs={"truncation": 1e38}),
               threading.Thread(target=ask, args=("good",))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results["bad"][0] == 500 and "non-finite" in json.loads(results["bad"][2])["error"]["message"]
    assert results["good"][0] == 200 and np.isfinite(decoded(results["good"][2])).all()


def test_a_client_that_leaves_mid_stream_frees_its_row(served):
    text = " ".join(f"Sentence number {i} is here." for i in range(12))
    request = urllib.request.Request(served["base"] + "/v1/audio/speech", method="POST", headers={
        "Content-Type": "application/json"}, data=json.dumps({"model": "echo", "input": text, "voice": "random",
                                                             "response_format": "pcm", "steps": 60}).encode())
    response = urllib.request.urlopen(request, timeout=300)
    assert response.read(100)
    response.close()  # gone after its first audio
    assert wait_until(lambda: served["server"].scheduler.busy_rows() == 0, 30)
    _, _, metrics = http(served, "GET", "/metrics")
    assert 'echo_requests_total{status="499"}' in metrics.decode()
    for name in ("echo_time_to_first_audio_seconds_count", "echo_request_seconds_count", "echo_queue_depth",
                 "echo_rows_busy", "echo_audio_seconds_total"):
        assert name in metrics.decode(), name


def test_sigterm_finishes_the_request_under_way_refuses_new_ones_then_exits(files, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "serve.py"), *flags(files, port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def healthy():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return urllib.request.urlopen(base + "/health", timeout=5).status == 200
            except (OSError, urllib.error.HTTPError):
                return False

        assert wait_until(healthy, 600)
        text = " ".join(f"Sentence number {i} is here." for i in range(12))
        body = json.dumps({"model": "echo", "input": text, "voice": "random", "response_format": "wav",
                           "steps": 60}).encode()
        response = urllib.request.urlopen(urllib.request.Request(base + "/v1/audio/speech", data=body, method="POST",
                                                                 headers={"Content-Type": "application/json"}))
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # refused while the request under way goes on
            urllib.request.urlopen(base + "/health", timeout=5)
        audio = decoded(response.read())
        assert len(audio) > 11 * 0.5 * 48000  # all of it: twelve sentences
        # uvicorn ends the process with the signal it caught, once every request is answered.
        assert proc.wait(60) == -signal.SIGTERM
        assert "Traceback" not in proc.stdout.read()
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def blockwise_served(files):
    """serve.py on a tiny-blockwise checkpoint (random weights that use the prefix), in blocks of 12 frames."""
    payload = checkpoint.load_checkpoint_file(os.path.join(files["checkpoint"], "step_0000003.params.pkl"))
    config = echo.PRESETS["tiny-blockwise"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: (np.asarray(a) + rng.normal(0, 0.2, a.shape)).astype(np.float32),
                          nn.unbox(echo.init_params(config, jax.random.key(1))))
    payload.update(params=params, ema_params=params, config=dataclasses.asdict(config))
    path = files["root"] / "blockwise.params.pkl"
    with open(path, "wb") as f:
        pickle.dump(payload, f)
    yield from running({**files, "checkpoint": str(path)}, "--blocks", "12,12,rest", "--max_batch", "1")


def test_a_blockwise_checkpoint_streams_each_sentence_block_by_block(blockwise_served):
    """A 40-frame sentence in blocks of 12, 12 and 16 frames: each block's audio is sent once it is
    sampled, and the whole is inference.py's blockwise latent, decoded."""
    body = {"model": "echo", "input": "Blocks stream.", "voice": "random", "steps": 3, "seed": 4,
            "trim_tolerance": 0}
    status, _, data = post_json(blockwise_served, {**body, "response_format": "pcm", "stream_format": "sse"})
    events = [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: ")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert status == 200 and len(deltas) == 4  # three blocks' audio, then the held crossfade tail
    status, _, data = post_json(blockwise_served, {**body, "response_format": "wav"})
    assert status == 200
    loaded = blockwise_served["server"].loaded
    (ids, mask), = inference.prepare_text("Blocks stream.", loaded.max_text_len)
    speaker = (np.zeros((1, loaded.max_speaker_len, 128), np.float32), np.zeros((1, loaded.max_speaker_len), np.int32))
    latent = inference.sample_latents(loaded.module, loaded.params, ids[None], mask[None], *speaker, steps=3, seed=4,
                                      blocks=[12, 12, 16], progress=False)[0]
    import torch
    whole = blockwise_served["server"].codec.decode(torch.from_numpy(latent.T.copy())[None])[0, 0].numpy()
    assert relative_difference(decoded(data), np.clip(whole, -1, 1)) < 1e-2


def test_a_port_in_use_or_a_missing_checkpoint_is_one_sentence(files, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve.main(flags(files, taken.getsockname()[1])) == 1
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    assert serve.main(["--checkpoint", "/nowhere", *flags(files, free_port())[2:]]) == 1
    assert "/nowhere does not exist" in capsys.readouterr().err
    assert serve.main(flags(files, free_port(), "--blocks", "12,rest")) == 1
    assert "no latent-prefix path" in capsys.readouterr().err
