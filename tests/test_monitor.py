"""monitor.py: the API, its security, a huge metrics file, and the page in a real headless Chromium."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from conftest import REPO

import monitor

ARTIFACTS = os.path.join(REPO, "test-artifacts")


def step_line(step, t0=1_700_000_000.0):
    return json.dumps({"step": step, "time": t0 + step, "loss": 1.0 / (1 + 0.01 * step) + 0.05 * (step % 7) / 7,
                       "lr": 1e-4, "grad_norm": 0.5, "samples_per_sec": 30.0, "latent_seconds_per_sec": 400.0,
                       "step_time": 1.0, "data_wait": 0.1, "skipped": {"empty_text": 2},
                       "loss_by_t": {"0.0-0.2": 0.4, "0.8-1.0": 1.2}}) + "\n"


def write_run(path, steps, events=True):
    with open(path, "w") as f:
        f.write(json.dumps({"event": "start", "step": 0, "total_steps": 1000, "run": "demo-run"}) + "\n")
        for s in range(1, steps + 1):
            f.write(step_line(s))
            if events and s % 20 == 0:
                f.write(json.dumps({"event": "eval", "step": s, "time": 1_700_000_000 + s, "val_loss": 0.8,
                                    "synthetic_cer": 1 - s / 100}) + "\n")
                f.write(json.dumps({"event": "checkpoint", "step": s, "time": 1_700_000_000 + s}) + "\n")


def write_samples(metrics_path, step, texts=("hello there", "a second prompt")):
    """Audio samples as the trainer writes them: wavs, spectrogram PNGs, index.json, a samples event."""
    import numpy as np
    import soundfile
    from PIL import Image

    directory = metrics_path.parent / "samples" / f"{step:07d}"
    directory.mkdir(parents=True)
    entries = []
    for i, text in enumerate(texts):
        t = np.arange(24000) / 48000
        soundfile.write(str(directory / f"{i:02d}.wav"), 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t), 48000)
        Image.fromarray(np.full((40, 120, 3), 60 * i, np.uint8)).save(directory / f"{i:02d}.png")
        entries.append({"text": text, "kind": "generated", "wav": f"{i:02d}.wav", "spectrogram": f"{i:02d}.png",
                        "seconds": 0.5})
    (directory / "secret.wav").write_bytes(b"RIFF not listed")
    (directory / "index.json").write_text(json.dumps({"step": step, "weights": "ema", "samples": entries}))
    with open(metrics_path, "a") as f:
        f.write(json.dumps({"event": "samples", "step": step, "weights": "ema", "time": 1_700_000_000 + step,
                            "index": os.path.relpath(directory / "index.json", metrics_path.parent)}) + "\n")
    return directory


@pytest.fixture
def server(tmp_path):
    """An in-process dashboard on a free port: (base url, metrics path, token setter)."""
    path = tmp_path / "metrics.jsonl"
    servers = []

    def start(token=None):
        srv = monitor.serve(str(path), "127.0.0.1", 0, token)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start, path
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def get(url, headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def raw(base, request):
    host, port = base[len("http://"):].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


# ---------------------------------------------------------------- API

def test_api_tails_incrementally_with_partial_lines_and_a_missing_file(server):
    start, path = server
    base = start()
    status, body = get(base + "/api/metrics")
    data = json.loads(body)
    assert status == 200 and data["file_exists"] is False and data["step"] is None  # not written yet
    write_run(path, 40)
    with open(path, "a") as f:
        half = step_line(41)
        f.write(half[:30])  # a line still being written
        f.flush()
        data = json.loads(get(base + "/api/metrics")[1])
        assert data["points"] == 40 and data["step"] == 40 and data["total_steps"] == 1000 and data["run"] == "demo-run"
        assert data["series"]["loss"][0] == json.loads(step_line(1))["loss"] and len(data["evals"]) == 2
        assert [m["event"] for m in data["markers"]] == ["checkpoint", "checkpoint"]
        assert data["last_checkpoint"]["step"] == 40 and data["skipped"] == {"empty_text": 2}
        assert data["eta_s"] == pytest.approx(960.0)
        f.write(half[30:])
    data = json.loads(get(base + "/api/metrics?since=38")[1])
    assert data["series"]["step"] == [39, 40, 41] and data["points"] == 41
    assert data["series"]["loss_by_t"]["0.8-1.0"] == [1.2, 1.2, 1.2]
    # A resume from step 30 replaces the steps that were redone.
    with open(path, "a") as f:
        f.write(json.dumps({"event": "resumed", "step": 30, "time": 1_700_000_100}) + "\n")
        f.write(step_line(31))
    data = json.loads(get(base + "/api/metrics")[1])
    assert data["series"]["step"][-3:] == [29, 30, 31] and data["generation"] == 1
    status, csv = get(base + "/metrics.csv")
    rows = csv.decode().strip().splitlines()
    assert status == 200 and rows[0].startswith("step,time,loss") and len(rows) == 1 + 31
    assert rows[-1].split(",")[0] == "31.0"


def test_the_history_beside_gs_checkpoints_is_served(gcs, tmp_path):
    """train_pretrain.py rewrites CHECKPOINT_DIR/metrics.jsonl (on gs://) longer at each checkpoint;
    the dashboard follows it there as it does a local file."""
    from etils import epath
    path = f"gs://{gcs}/monitor-run/metrics.jsonl"
    srv = monitor.serve(path, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        data = json.loads(get(base + "/api/metrics")[1])
        assert data["file_exists"] is False and data["step"] is None
        local = tmp_path / "metrics.jsonl"
        write_run(local, 20)
        epath.Path(path).write_bytes(local.read_bytes())
        data = json.loads(get(base + "/api/metrics")[1])
        assert data["file_exists"] and data["step"] == 20 and data["points"] == 20
        assert data["last_checkpoint"]["step"] == 20
        write_run(local, 40)
        epath.Path(path).write_bytes(local.read_bytes())
        data = json.loads(get(base + "/api/metrics?since=18")[1])
        assert data["series"]["step"] == list(range(19, 41)) and data["generation"] == 0
        assert data["series"]["loss"][-1] == json.loads(step_line(40))["loss"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_huge_file_is_read_once_and_answered_small(server, monkeypatch):
    start, path = server
    lines = 1_000_000
    with open(path, "w") as f:
        f.writelines(f'{{"step": {s}, "time": {s}, "loss": {1 / s}, "lr": 1e-4, "grad_norm": 1, '
                     f'"samples_per_sec": 1, "step_time": 1}}\n' for s in range(1, lines + 1))
    base = start()
    for _ in range(10):  # a big file loads over a few polls
        status, body = get(base + "/api/metrics")
        data = json.loads(body)
        if data["points"] == lines:
            break
    assert data["points"] == lines and data["downsampled"] and data["returned"] <= monitor.DEFAULT_POINTS
    assert len(body) < 300_000
    steps = data["series"]["step"]
    assert steps[-1] == lines and steps[-1000:] == list(range(lines - 999, lines + 1))  # the newest, exactly
    assert steps == sorted(steps) and steps[0] == 1
    parsed = []
    real = monitor.MetricsStore.add_line
    monkeypatch.setattr(monitor.MetricsStore, "add_line", lambda self, line: (parsed.append(line), real(self, line)))
    with open(path, "a") as f:
        f.write(step_line(lines + 1))
    data = json.loads(get(base + f"/api/metrics?since={lines}")[1])
    assert data["series"]["step"] == [lines + 1] and len(parsed) == 1  # only the new line was read


def test_security_routes_token_and_garbage(server, tmp_path):
    start, path = server
    write_run(path, 5)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0 TOPSECRET")
    base = start(token="s3cret")
    assert get(base + "/")[0] == 401 and get(base + "/api/metrics")[0] == 401
    assert get(base + "/api/metrics?token=wrong")[0] == 401
    assert get(base + "/metrics.csv", {"Authorization": "Bearer nope"})[0] == 401
    status, body = get(base + "/?token=s3cret")
    assert status == 200 and b"<canvas" in body
    assert get(base + "/api/metrics", {"Authorization": "Bearer s3cret"})[0] == 200
    assert get(base + "/metrics.csv?token=s3cret")[0] == 200
    for target in ("/../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/..%2f..%2fetc%2fpasswd",
                   str(secret), "//" + str(secret), "/metrics.csv/../../" + str(secret), "/monitor.py",
                   "/api/metrics/../../etc/passwd"):
        for request in (f"GET {target}?token=s3cret HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                        f"GET http://x{target}?token=s3cret HTTP/1.1\r\nHost: x\r\n\r\n".encode()):
            reply = raw(base, request)
            assert reply.split(b" ")[1] in (b"404", b"400"), (target, reply[:80])
            assert b"TOPSECRET" not in reply and b"root:" not in reply
    garbage = [b"\x00\xff\xfe garbage\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/1.1\r\nno colon header\r\n\r\n",
               b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"BREW /pot HTTP/1.1\r\n\r\n",
               b"GET /api/metrics?since=abc&token=s3cret HTTP/1.1\r\n\r\n",
               b"GET /api/metrics?since=nan&token=s3cret HTTP/1.1\r\n\r\n",
               b"POST /api/metrics?token=s3cret HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", b""]
    for request in garbage:
        reply = raw(base, request)
        client_error = reply.startswith(b"HTTP/") and reply.split(b" ")[1][:1] == b"4"
        http09_error = b"Error code: 4" in reply  # an HTTP/0.9 request gets its error without a status line
        assert reply == b"" or client_error or http09_error, (request[:40], reply[:80])
    assert get(base + "/api/metrics?token=s3cret")[0] == 200  # still serving
    # Binds this machine only unless told otherwise.
    srv = monitor.serve(str(path), port=0)
    assert srv.server_address[0] == "127.0.0.1"
    srv.server_close()


# ---------------------------------------------------------------- a real browser

APPENDER = r"""
import json, sys, time
path, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for step in range(first, last + 1):
    line = json.dumps({"step": step, "time": time.time(), "loss": 1.0 / (1 + 0.01 * step), "lr": 1e-4,
                       "grad_norm": 0.5, "samples_per_sec": 30.0, "latent_seconds_per_sec": 400.0,
                       "step_time": 0.3, "data_wait": 0.1}) + "\n"
    with open(path, "a") as f:  # half a line, then the rest: the monitor must wait for the newline
        f.write(line[:25]); f.flush(); time.sleep(0.05); f.write(line[25:])
    time.sleep(0.25)
"""


def start_process(args, **kwargs):
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_audio_samples_api_serves_only_indexed_files(server):
    start, path = server
    write_run(path, 10)
    write_samples(path, 5)
    write_samples(path, 10, texts=("newest",))
    base = start(token="tok")
    assert get(base + "/api/samples")[0] == 401 and get(base + "/samples/10/00.wav")[0] == 401
    status, body = get(base + "/api/samples?token=tok")
    steps = json.loads(body)["steps"]
    assert status == 200 and [s["step"] for s in steps] == [10, 5]  # newest first
    assert steps[0]["samples"] == [{"text": "newest", "kind": "generated", "seconds": 0.5,
                                    "audio": "samples/10/00.wav", "spectrogram": "samples/10/00.png"}]
    status, body = get(base + "/samples/5/01.wav?token=tok")
    assert status == 200 and body[:4] == b"RIFF"
    with urllib.request.urlopen(base + "/samples/5/01.png?token=tok", timeout=30) as r:
        assert r.headers["Content-Type"] == "image/png" and r.read(4) == b"\x89PNG"
    for bad in ("/samples/5/secret.wav", "/samples/5/index.json", "/samples/5/..%2F..%2Fmetrics.jsonl",
                "/samples/5/../../metrics.jsonl", "/samples/7/00.wav", "/samples/x/00.wav", "/samples/10/01.wav",
                "/samples/5", "/samples/"):
        assert get(base + bad + "?token=tok")[0] == 404, bad


def test_dashboard_in_headless_chromium(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are not installed; .ci/run installs them")
        pytest.skip("apt-get install chromium chromium-driver")
    path = tmp_path / "metrics.jsonl"
    write_run(path, 60)
    with open(path, "a") as f:
        f.write(json.dumps({"event": "full_eval", "step": 60, "time": 1_700_000_060, "synthetic_cer": 0.05,
                            "synthetic_cer_shuffled": 0.8, "synthetic_cer_other_text": 0.9}) + "\n")
    write_samples(path, 40, texts=("an older sample",))
    write_samples(path, 60)
    server = start_process([sys.executable, os.path.join(REPO, "monitor.py"), "--metrics", str(path), "--port", "0",
                            "--token", "tok"])
    appender = None
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = None
    try:
        url = server.stdout.readline().split(" on ")[1].split()[0]
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        driver.get(url + "?token=tok")
        wait = WebDriverWait(driver, 30)
        points = lambda chart="loss": driver.execute_script(
            f"return Number(document.getElementById('chart-{chart}').dataset.points || -1)")
        wait.until(lambda d: points() == 60)  # every step line, drawn
        assert points("lr") == 60 and points("throughput") == 60
        # Beside the loss, the held-out CER of each eval (3) and the last full eval with its two controls.
        assert points("cer") == 3 and driver.find_element("id", "card-cer").is_displayed()
        assert driver.execute_script("return document.getElementById('chart-cer').dataset.fullEval") == "0.05 0.8 0.9"
        assert "step 60 / 1000" in driver.find_element("id", "progress").text
        assert "checkpoint 60" in driver.find_element("id", "ckpt").text
        assert "empty_text 2" in driver.find_element("id", "skipped").text

        # The audio samples: newest step first, a player and a spectrogram per sample, all loaded.
        wait.until(lambda d: len(d.find_elements("css selector", "#sample-list audio")) == 3)
        titles = [e.text for e in driver.find_elements("css selector", ".sample-step h3")]
        assert titles[0].startswith("step 60") and titles[1].startswith("step 40") and "ema" in titles[0]
        captions = [e.text for e in driver.find_elements("css selector", "figure.sample figcaption")]
        assert "hello there" in captions[0] and "an older sample" in captions[2]
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#sample-list audio')].every(a => a.readyState >= 1 && "
            "a.duration > 0.4) && [...document.querySelectorAll('#sample-list img')].every(i => i.complete && "
            "i.naturalWidth > 0)"))

        # New points appear without a reload.
        driver.execute_script("window.__sameDocument = true")
        # The appender ends on a whole line, so the file's last line is the last point drawn.
        appender = start_process([sys.executable, "-c", APPENDER, str(path), "61", "80"])
        wait.until(lambda d: points() >= 66)
        assert driver.execute_script("return window.__sameDocument === true")
        appender.wait(timeout=60)
        final = 80
        wait.until(lambda d: points() == final)

        # The smoothing slider: 0 means the EMA is the raw curve.
        def set_control(element_id, js_value):
            driver.execute_script(f"const e = document.getElementById('{element_id}'); {js_value}; "
                                  "e.dispatchEvent(new Event('input'));")

        last_loss = json.loads(open(path).read().strip().splitlines()[-1])["loss"]
        ema = lambda: float(driver.execute_script("return document.getElementById('chart-loss').dataset.emaLast"))
        set_control("smoothing", "e.value = '0'")
        assert ema() == pytest.approx(last_loss, rel=1e-9)
        set_control("smoothing", "e.value = '0.99'")
        assert abs(ema() - last_loss) > 1e-4
        assert driver.find_element("id", "smoothing-value").text == "0.990"
        # The x-axis toggle and log-y.
        x_mode = lambda: driver.execute_script("return document.getElementById('chart-loss').dataset.xMode")
        assert x_mode() == "step"
        set_control("xaxis", "e.value = 'time'")
        assert x_mode() == "time" and points() == final
        set_control("logy", "e.checked = true")
        assert points() == final

        os.makedirs(ARTIFACTS, exist_ok=True)
        driver.save_screenshot(os.path.join(ARTIFACTS, "monitor.png"))
        driver.execute_script("document.getElementById('samples').scrollIntoView()")
        driver.save_screenshot(os.path.join(ARTIFACTS, "monitor-samples.png"))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        if driver:
            driver.quit()
        for proc in (appender, server):
            if proc and proc.poll() is None:
                proc.kill()
                proc.wait()
