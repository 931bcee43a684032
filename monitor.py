"""Live dashboard of a training run: loss, throughput, optimizer, checkpoints, on one web page.

    python monitor.py --metrics runs/echo/metrics.jsonl                 # http://127.0.0.1:8080
    python monitor.py --metrics /mnt/disk/ckpt/metrics.jsonl --port 8080 --token s3cret

Open it through a tunnel (ssh -L 8080:localhost:8080 WORKER, or cloudflared). It tails the metrics
file that train_pretrain.py appends to (`../shared/spec/formats.md`), reading only what is new, and
the page polls every few seconds. It also plays the run's audio samples: the files named by the
index of each {"event": "samples"} line, and only those. Read-only, only its own routes (/,
/api/metrics?since=STEP, /api/samples, /samples/STEP/FILE, /metrics.csv), bound to 127.0.0.1
unless told otherwise; with --token every request must carry
`?token=T` or `Authorization: Bearer T`. A separate process: it never slows the trainer. The
standard library serves a local file; a gs:// path (the history train_pretrain.py keeps beside
gs:// checkpoints, updated at each checkpoint, which outlives any one worker) is read through etils.epath:

    python monitor.py --metrics gs://BUCKET/run/metrics.jsonl The charts are drawn on canvas by the small script below; nothing is fetched
from the internet.
"""

import argparse
import array
import bisect
import hmac
import json
import math
import os
import statistics
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FIELDS = ("step", "time", "loss", "lr", "grad_norm", "samples_per_sec", "latent_seconds_per_sec", "step_time",
          "data_wait", "mfu")
# The eval fields the dashboard draws, from "eval" events and the "full_eval" one (with its controls).
EVAL_FIELDS = ("val_loss", "val_loss_ema", "synthetic_nmse", "synthetic_cer", "synthetic_cer_ema",
               "synthetic_end_frames", "synthetic_cer_shuffled", "synthetic_cer_other_text")
MARKER_EVENTS = ("checkpoint", "resumed", "preempted", "disk_critical", "init_from")
READ_CHUNK = 64 * 1024 * 1024  # bytes parsed per poll at most: a huge file loads over a few polls
DEFAULT_POINTS, MAX_POINTS = 2000, 20000


class MetricsStore:
    """Everything the page shows, built incrementally from the metrics file."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.offset, self.inode, self.partial = 0, None, b""
        self.columns = {f: array.array("d") for f in FIELDS}
        self.buckets = {}  # loss by timestep bucket: name -> array, aligned with the columns
        self.evals = []  # {"step", "time", "event", *EVAL_FIELDS} of each eval and full eval
        self.markers = []  # {"event", "step", "time", ...} for checkpoints, resumes, ...
        self.sample_events = {}  # step -> {"index", "weights", "time"} of the audio samples
        self.nan_steps = 0
        self.bad_lines = 0
        self.skipped = {}
        self.start = {}  # the newest "start" event: total steps, run name
        self.generation = 0  # bumps when history is rewritten (a resume drops the steps redone)
        self.last_line_time = None

    # -- reading
    def poll(self):
        """Read what was appended since the last poll (at most READ_CHUNK bytes)."""
        try:
            size, inode, mtime = stat_file(self.path)
        except OSError:
            return
        with self.lock:
            if self.inode is not None and (inode != self.inode or size < self.offset):
                generation = self.generation
                self.reset()  # the file was replaced or truncated: start over
                self.generation = generation + 1
            self.inode = inode
            if size == self.offset:
                return
            try:
                data = read_range(self.path, self.offset, min(READ_CHUNK, size - self.offset))
            except OSError:
                return
            self.offset += len(data)
            lines = (self.partial + data).split(b"\n")
            self.partial = lines.pop()  # a line still being written stays for the next poll
            for line in lines:
                if line.strip():
                    self.add_line(line)
            self.last_line_time = mtime

    def add_line(self, raw):
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError
        except ValueError:
            self.bad_lines += 1
            return
        event = record.get("event")
        step = _number(record.get("step"))
        if event is None and step is not None and _number(record.get("loss")) is not None:
            self.add_step(record)
        elif event in ("eval", "full_eval"):
            self.evals.append({"step": step, "time": _number(record.get("time")), "event": event,
                               **{f: _number(record.get(f)) for f in EVAL_FIELDS}})
        elif event == "nan_step":
            self.nan_steps += 1
        elif event == "start":
            self.start = record
        elif event == "samples" and step is not None and isinstance(record.get("index"), str):
            self.sample_events[int(step)] = {"index": record["index"], "weights": str(record.get("weights", "")),
                                             "time": _number(record.get("time"))}
        if event == "resumed" and step is not None:
            self.rewind(step)
        if event in MARKER_EVENTS:
            self.markers.append({k: record[k] for k in ("event", "step", "time", "path", "free_gb", "message")
                                 if k in record})

    def add_step(self, record):
        steps = self.columns["step"]
        if len(steps) and record["step"] <= steps[-1]:  # a restarted run without a resume event
            self.rewind(record["step"] - 1)
        n = len(steps)
        for f in FIELDS:
            value = _number(record.get(f))
            self.columns[f].append(math.nan if value is None else value)
        for name, value in (record.get("loss_by_t") or {}).items():
            column = self.buckets.setdefault(str(name), array.array("d", [math.nan] * n))
            value = _number(value)
            column.append(math.nan if value is None else value)
        for column in self.buckets.values():
            if len(column) == n:
                column.append(math.nan)
        if isinstance(record.get("skipped"), dict):
            self.skipped = record["skipped"]

    def rewind(self, step):
        """A resume from `step`: the steps logged after it were redone, so the redo replaces them."""
        keep = bisect.bisect_right(self.columns["step"], step)
        if keep < len(self.columns["step"]):
            for column in list(self.columns.values()) + list(self.buckets.values()):
                del column[keep:]
            self.evals = [e for e in self.evals if e["step"] is None or e["step"] <= step]
            self.generation += 1

    # -- answering
    def snapshot(self, since=None, max_points=DEFAULT_POINTS):
        with self.lock:
            steps = self.columns["step"]
            start = 0 if since is None else bisect.bisect_right(steps, since)
            rows = _downsample(start, len(steps), max_points)
            series = {f: [_json_number(self.columns[f][i]) for i in rows] for f in FIELDS}
            series["loss_by_t"] = {name: [_json_number(column[i]) for i in rows]
                                   for name, column in sorted(self.buckets.items())}
            recent = [t for t in self.columns["step_time"][-50:] if not math.isnan(t)]
            step_time = statistics.median(recent) if recent else None
            step = int(steps[-1]) if len(steps) else None
            total = _number(self.start.get("total_steps"))
            checkpoints = [m for m in self.markers if m["event"] == "checkpoint"]
            last_event = self.markers[-1]["event"] if self.markers else None
            age = time.time() - self.last_line_time if self.last_line_time else None
            finished = (step is not None and total is not None and step >= total) or last_event == "preempted"
            return {
                "run": self.start.get("run") or os.path.basename(os.path.dirname(os.path.abspath(self.path))),
                "device_kind": self.start.get("device_kind") if isinstance(self.start.get("device_kind"), str)
                else None,
                "file": os.path.basename(self.path), "file_exists": self.inode is not None,
                "generation": self.generation, "since": since, "step": step, "total_steps": total,
                "points": len(steps), "returned": len(rows), "downsampled": len(rows) < len(steps) - start,
                "step_time_median": step_time,
                "eta_s": (total - step) * step_time if step is not None and total and step_time and not finished
                else None,
                "last_line_age_s": age, "finished": finished,
                "stalled": bool(age is not None and step_time and not finished and age > max(5 * step_time, 60)),
                "last_checkpoint": checkpoints[-1] if checkpoints else None,
                "skipped": self.skipped, "nan_steps": self.nan_steps, "bad_lines": self.bad_lines,
                "series": series,
                "evals": [e for e in self.evals if since is None or (e["step"] is not None and e["step"] > since)],
                "markers": [m for m in self.markers if since is None or (m.get("step") or 0) > since],
            }

    # -- audio samples
    SAMPLE_TYPES = {".wav": "audio/wav", ".png": "image/png"}
    MAX_SAMPLE_STEPS = 20

    def sample_index(self, step):
        """The index of a step's samples as {"dir", "weights", "samples"}, or None if unreadable."""
        with self.lock:
            event = self.sample_events.get(step)
        if event is None:
            return None
        path = event["index"]
        if not os.path.isabs(path):
            path = os.path.join(os.path.dirname(os.path.abspath(self.path)), path)
        try:
            with open(path, encoding="utf-8") as f:
                index = json.load(f)
            entries = [e for e in index["samples"] if isinstance(e, dict)]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        files = lambda e: [e.get(k) for k in ("wav", "spectrogram")]
        ok = lambda name: isinstance(name, str) and name == os.path.basename(name) and name not in ("", ".", "..") \
            and os.path.splitext(name)[1] in self.SAMPLE_TYPES
        return {"dir": os.path.dirname(path), "weights": event["weights"], "time": event["time"],
                "samples": [e for e in entries if all(ok(n) for n in files(e))]}

    def samples(self):
        """The newest steps' audio samples, newest first, with the URLs the page plays them from."""
        with self.lock:
            steps = sorted(self.sample_events, reverse=True)[:self.MAX_SAMPLE_STEPS]
        out = []
        for step in steps:
            index = self.sample_index(step)
            if index is None:
                continue
            out.append({"step": step, "weights": index["weights"], "time": index["time"], "samples": [
                {"text": str(e.get("text", "")), "kind": str(e.get("kind", "")), "seconds": _number(e.get("seconds")),
                 "audio": f"samples/{step}/{e['wav']}", "spectrogram": f"samples/{step}/{e['spectrogram']}"}
                for e in index["samples"]]})
        return out

    def sample_file(self, step, name):
        """(bytes, content type) of a file some samples index names, else None."""
        index = self.sample_index(step)
        if index is None or not any(name in (e["wav"], e["spectrogram"]) for e in index["samples"]):
            return None
        try:
            with open(os.path.join(index["dir"], name), "rb") as f:
                return f.read(), self.SAMPLE_TYPES[os.path.splitext(name)[1]]
        except OSError:
            return None

    def csv_rows(self):
        with self.lock:
            columns = {f: self.columns[f][:] for f in FIELDS}
            buckets = {name: column[:] for name, column in sorted(self.buckets.items())}
        yield ",".join(FIELDS + tuple(f"loss_t_{name}" for name in buckets)) + "\n"
        for i in range(len(columns["step"])):
            values = [columns[f][i] for f in FIELDS] + [b[i] for b in buckets.values()]
            yield ",".join("" if math.isnan(v) else repr(v) for v in values) + "\n"


def stat_file(path):
    """(size, identity, mtime) of the metrics file: a local file's inode; a gs:// object's path, since
    its history is only ever rewritten longer and its size alone says what is new."""
    if "://" not in path:
        st = os.stat(path)
        return st.st_size, st.st_ino, st.st_mtime
    from etils import epath  # gs:// only: a local dashboard starts without it
    try:
        st = epath.Path(path).stat()
    except Exception as e:  # gcsfs raises its own errors for a missing object or a refused request
        raise OSError(str(e)) from None
    mtime = st.mtime.timestamp() if hasattr(st.mtime, "timestamp") else float(st.mtime)
    return st.length, path, mtime


def read_range(path, offset, count):
    """`count` bytes of the metrics file from `offset` (local, or a ranged read of a gs:// object)."""
    if "://" not in path:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(count)
    from etils import epath  # gs:// only: a local dashboard starts without it
    try:
        with epath.Path(path).open("rb") as f:
            f.seek(offset)
            return f.read(count)
    except Exception as e:
        raise OSError(str(e)) from None


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _json_number(value):
    return None if math.isnan(value) else value


def _downsample(start, end, max_points):
    """Row indices from start to end: all of them, or at most max_points with the newest half exact."""
    count = end - start
    if count <= max_points:
        return range(start, end)
    newest = max_points // 2
    older_end = end - newest
    stride = (older_end - start) / (max_points - newest)
    return [start + int(i * stride) for i in range(max_points - newest)] + list(range(older_end, end))


# ----------------------------------------------------------------------------
# The page: plain HTML, CSS and a small canvas-drawing script.

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Echo training</title>
<link rel="icon" href="data:,">
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px system-ui,sans-serif;margin:0;background:#f6f7f9;color:#222}
 header{background:#1f2937;color:#fff;padding:10px 16px;display:flex;flex-wrap:wrap;gap:18px;align-items:baseline}
 header b{font-size:17px} .muted{color:#9ca3af} .warn{background:#b91c1c;color:#fff;padding:2px 8px;border-radius:4px}
 .ok{background:#15803d;color:#fff;padding:2px 8px;border-radius:4px}
 #controls{padding:8px 16px;display:flex;gap:20px;align-items:center;flex-wrap:wrap}
 #grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:12px;padding:0 16px 16px}
 .card{background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:8px}
 .card h3{margin:0 0 4px;font-size:14px} canvas{width:100%;height:260px;display:block}
 #samples{padding:0 16px 16px} #samples h2{font-size:15px;margin:4px 0 8px}
 .sample-step{margin-bottom:12px} .sample-row{display:flex;flex-wrap:wrap;gap:12px}
 figure.sample{margin:0;width:320px} figure.sample figcaption{font-size:13px;margin-bottom:4px;overflow-wrap:anywhere}
 figure.sample audio{width:100%} figure.sample img{width:100%;height:100px;display:block;image-rendering:pixelated;background:#000}
 .kind{color:#6b7280;font-size:12px}
</style></head><body>
<header>
 <b id="run">…</b><span id="progress"></span><span id="eta"></span><span id="ckpt"></span>
 <span id="skipped"></span><span id="nans"></span><span id="device"></span><span id="status"></span>
</header>
<div id="controls">
 <label>EMA smoothing <input id="smoothing" type="range" min="0" max="0.999" step="0.001" value="0.9">
  <span id="smoothing-value">0.900</span></label>
 <label><input id="logy" type="checkbox"> log-y</label>
 <label>x axis <select id="xaxis"><option value="step">step</option><option value="time">wall time</option></select></label>
 <span class="muted" id="info"></span>
</div>
<div id="grid">
 <div class="card"><h3>Loss (raw, EMA, validation)</h3><canvas id="chart-loss"></canvas></div>
 <div class="card" id="card-cer" hidden><h3>Character error rate, held-out texts (synthetic corpora)</h3><canvas id="chart-cer"></canvas></div>
 <div class="card"><h3>Loss by timestep bucket (EMA)</h3><canvas id="chart-loss_by_t"></canvas></div>
 <div class="card"><h3>Throughput</h3><canvas id="chart-throughput"></canvas></div>
 <div class="card"><h3>Step time: compute and data wait (s)</h3><canvas id="chart-step_time"></canvas></div>
 <div class="card"><h3>Learning rate</h3><canvas id="chart-lr"></canvas></div>
 <div class="card"><h3>Gradient norm</h3><canvas id="chart-grad_norm"></canvas></div>
 <div class="card" id="card-mfu" hidden><h3>MFU</h3><canvas id="chart-mfu"></canvas></div>
</div>
<section id="samples" hidden><h2>Audio samples (newest first)</h2><div id="sample-list"></div></section>
<script>
"use strict";
const POLL_MS = 2000, COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];
const token = new URLSearchParams(location.search).get("token");
const state = {series: null, evals: [], markers: [], generation: null, lastStep: null, summary: null};

function api(path) {
  const url = new URL(path, location.href);
  if (token) url.searchParams.set("token", token);
  return fetch(url).then(r => { if (!r.ok) throw new Error(r.status); return r.json(); });
}

function merge(data) {
  if (state.series === null || data.generation !== state.generation || data.since === null) {
    state.series = data.series; state.evals = data.evals; state.markers = data.markers;
  } else {
    for (const k of Object.keys(data.series)) {
      if (k === "loss_by_t") {
        for (const b of Object.keys(data.series.loss_by_t)) {
          const old = state.series.loss_by_t[b] || new Array(state.series.step.length - data.series.step.length).fill(null);
          state.series.loss_by_t[b] = old.concat(data.series.loss_by_t[b]);
        }
      } else state.series[k] = state.series[k].concat(data.series[k]);
    }
    state.evals = state.evals.concat(data.evals); state.markers = state.markers.concat(data.markers);
  }
  state.generation = data.generation; state.summary = data;
  if (state.series.step.length) state.lastStep = state.series.step[state.series.step.length - 1];
}

function withToken(path) {
  const url = new URL(path, location.href);
  if (token) url.searchParams.set("token", token);
  return url.href;
}

function renderSamples(data) {
  const key = JSON.stringify(data.steps.map(s => [s.step, s.time]));
  if (key === state.samplesKey) return;  // unchanged: leave the players (and what they play) alone
  state.samplesKey = key;
  const list = document.getElementById("sample-list");
  list.replaceChildren();
  document.getElementById("samples").hidden = !data.steps.length;
  for (const entry of data.steps) {
    const block = document.createElement("div"); block.className = "card sample-step";
    const title = document.createElement("h3");
    title.textContent = "step " + entry.step + (entry.weights ? " \u00b7 " + entry.weights + " weights" : "");
    const row = document.createElement("div"); row.className = "sample-row";
    for (const s of entry.samples) {
      const fig = document.createElement("figure"); fig.className = "sample";
      const cap = document.createElement("figcaption");
      const kind = document.createElement("span"); kind.className = "kind"; kind.textContent = s.kind + " \u00b7 ";
      cap.append(kind, document.createTextNode(s.text));
      const player = document.createElement("audio"); player.controls = true; player.preload = "metadata";
      player.src = withToken(s.audio);
      const img = document.createElement("img"); img.alt = "spectrogram of " + s.text; img.src = withToken(s.spectrogram);
      fig.append(cap, player, img); row.append(fig);
    }
    block.append(title, row); list.append(block);
  }
}

function poll() {
  api("api/samples").then(renderSamples).catch(() => {});
  const fresh = state.series === null || state.series.step.length > 40000;
  const q = fresh || state.lastStep === null ? "api/metrics" : "api/metrics?since=" + state.lastStep;
  api(q).then(data => {
    if (!fresh && data.generation !== state.generation) return api("api/metrics").then(full => { state.series = null; merge(full); });
    merge(data);
  }).then(render).catch(e => { document.getElementById("status").innerHTML = '<span class="warn">dashboard cannot reach the server</span>'; })
    .finally(() => setTimeout(poll, POLL_MS));
}

function ema(ys, alpha) {  // debiased exponential moving average, skipping gaps
  const out = []; let avg = 0, weight = 0;
  for (const y of ys) {
    if (y === null) { out.push(null); continue; }
    avg = alpha * avg + (1 - alpha) * y; weight = alpha * weight + (1 - alpha);
    out.push(avg / weight);
  }
  return out;
}

function fmtDuration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s); const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return d ? d + "d " + h + "h" : h ? h + "h " + m + "m" : m ? m + "m " + (s % 60) + "s" : s + "s";
}

function fmt(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a >= 1e4 || a < 1e-3 ? v.toExponential(1) : a >= 100 ? v.toFixed(0) : a >= 1 ? v.toFixed(2) : v.toPrecision(2);
}

// lines: [{name, xs, ys, color, alpha, width, dots}]; markers: [{x, color, label}]
function draw(canvas, lines, opts) {
  const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const g = canvas.getContext("2d"); g.scale(dpr, dpr); g.clearRect(0, 0, w, h);
  const L = 58, R = 10, T = 10, B = 34, logy = opts.logy;
  const ty = y => (logy ? (y > 0 ? Math.log10(y) : null) : y);
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity, drawn = 0;
  for (const ln of lines) ln.xs.forEach((x, i) => {
    const y = ln.ys[i] === null ? null : ty(ln.ys[i]);
    if (x === null || y === null || !isFinite(y)) return;
    x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
  });
  canvas.dataset.xMode = opts.xmode;
  if (!isFinite(x0)) { canvas.dataset.points = 0; g.fillStyle = "#888"; g.fillText("no data yet", w / 2 - 30, h / 2); return; }
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 += 0.5; y0 -= 0.5; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const X = x => L + (x - x0) / (x1 - x0) * (w - L - R), Y = y => T + (1 - (y - y0) / (y1 - y0)) * (h - T - B);
  g.strokeStyle = "#e5e7eb"; g.fillStyle = "#555"; g.font = "11px system-ui"; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + (y1 - y0) * i / 4, xv = x0 + (x1 - x0) * i / 4;
    g.beginPath(); g.moveTo(L, Y(yv)); g.lineTo(w - R, Y(yv)); g.stroke();
    g.fillText(fmt(logy ? Math.pow(10, yv) : yv), 4, Y(yv) + 4);
    const label = opts.xmode === "time" ? fmtDuration(xv - x0) : String(Math.round(xv));
    g.fillText(label, Math.min(X(xv) - 10, w - R - 30), h - B + 14);
  }
  g.fillText(opts.xmode === "time" ? "wall time since the first point" : "step", L + (w - L - R) / 2 - 30, h - 4);
  for (const m of opts.markers || []) {
    if (m.x === null || m.x < x0 || m.x > x1) continue;
    g.strokeStyle = m.color; g.setLineDash([4, 3]); g.beginPath(); g.moveTo(X(m.x), T); g.lineTo(X(m.x), h - B); g.stroke();
    g.setLineDash([]);
  }
  lines.forEach((ln, k) => {
    g.strokeStyle = g.fillStyle = ln.color; g.globalAlpha = ln.alpha || 1; g.lineWidth = ln.width || 1.5;
    g.beginPath(); let pen = false, count = 0;
    ln.xs.forEach((x, i) => {
      const y = ln.ys[i] === null ? null : ty(ln.ys[i]);
      if (x === null || y === null || !isFinite(y)) { pen = false; return; }
      count++;
      if (ln.dots) { g.fillRect(X(x) - 2.5, Y(y) - 2.5, 5, 5); return; }
      if (pen) g.lineTo(X(x), Y(y)); else { g.moveTo(X(x), Y(y)); pen = true; }
    });
    if (!ln.dots) g.stroke();
    g.globalAlpha = 1;
    if (k === 0) drawn = count;
    g.fillText(ln.name, w - R - 150, T + 12 + 13 * k);
  });
  canvas.dataset.points = drawn;
}

function xsFor(steps, times, xmode) { return xmode === "time" ? times : steps; }

function render() {
  const s = state.series, sum = state.summary; if (!s || !sum) return;
  const xmode = document.getElementById("xaxis").value, logy = document.getElementById("logy").checked;
  const alpha = parseFloat(document.getElementById("smoothing").value);
  document.getElementById("smoothing-value").textContent = alpha.toFixed(3);
  const xs = xsFor(s.step, s.time, xmode);
  const stepToX = {}; s.step.forEach((st, i) => { stepToX[st] = xs[i]; });
  const markerX = m => (xmode === "time" ? m.time : m.step);
  const markers = state.markers.filter(m => m.event === "checkpoint" || m.event === "resumed" || m.event === "preempted")
    .map(m => ({x: markerX(m), color: m.event === "checkpoint" ? "#9ca3af" : "#f59e0b"}));
  const lossEma = ema(s.loss, alpha);
  const evalX = e => (xmode === "time" ? e.time : e.step);
  const evals = state.evals.filter(e => e.event === "eval" && e.val_loss !== null);
  draw(document.getElementById("chart-loss"), [
    {name: "loss (raw)", xs, ys: s.loss, color: COLORS[0], alpha: 0.25, width: 1},
    {name: "loss EMA", xs, ys: lossEma, color: COLORS[0], width: 2},
    {name: "validation", xs: evals.map(evalX), ys: evals.map(e => e.val_loss), color: COLORS[1], dots: true},
    {name: "validation, EMA weights", xs: evals.map(evalX), ys: evals.map(e => e.val_loss_ema), color: COLORS[4], dots: true},
  ], {logy, xmode, markers});
  const cerEvals = state.evals.filter(e => e.event === "eval" && e.synthetic_cer !== null);
  const fullEvals = state.evals.filter(e => e.event === "full_eval" && e.synthetic_cer !== null);
  document.getElementById("card-cer").hidden = !cerEvals.length && !fullEvals.length;
  if (cerEvals.length || fullEvals.length) draw(document.getElementById("chart-cer"), [
    {name: "CER", xs: cerEvals.map(evalX), ys: cerEvals.map(e => e.synthetic_cer), color: COLORS[1], dots: true},
    {name: "CER, EMA weights", xs: cerEvals.map(evalX), ys: cerEvals.map(e => e.synthetic_cer_ema), color: COLORS[4], dots: true},
    {name: "full eval", xs: fullEvals.map(evalX), ys: fullEvals.map(e => e.synthetic_cer), color: COLORS[0], dots: true},
    {name: "full eval, letters shuffled", xs: fullEvals.map(evalX), ys: fullEvals.map(e => e.synthetic_cer_shuffled), color: COLORS[3], dots: true},
    {name: "full eval, another text", xs: fullEvals.map(evalX), ys: fullEvals.map(e => e.synthetic_cer_other_text), color: COLORS[5], dots: true},
  ], {logy: false, xmode, markers});
  const lastFull = fullEvals[fullEvals.length - 1];
  document.getElementById("chart-cer").dataset.fullEval = lastFull ? [lastFull.synthetic_cer,
    lastFull.synthetic_cer_shuffled, lastFull.synthetic_cer_other_text].join(" ") : "";
  const lossCanvas = document.getElementById("chart-loss");
  const lastEma = lossEma.filter(v => v !== null).pop();
  lossCanvas.dataset.emaLast = lastEma === undefined ? "" : lastEma;
  draw(document.getElementById("chart-loss_by_t"), Object.keys(s.loss_by_t).map((b, k) => ({
    name: "t " + b, xs, ys: ema(s.loss_by_t[b], alpha), color: COLORS[k % COLORS.length]})), {logy, xmode, markers});
  draw(document.getElementById("chart-throughput"), [
    {name: "samples/s", xs, ys: s.samples_per_sec, color: COLORS[2]},
    {name: "latent-seconds/s", xs, ys: s.latent_seconds_per_sec, color: COLORS[3]}], {logy, xmode, markers});
  draw(document.getElementById("chart-step_time"), [
    {name: "compute", xs, ys: s.step_time.map((t, i) => (t === null ? null : Math.max(t - (s.data_wait[i] || 0), 0))), color: COLORS[0]},
    {name: "data wait", xs, ys: s.data_wait, color: COLORS[4]}], {logy, xmode, markers});
  draw(document.getElementById("chart-lr"), [{name: "lr", xs, ys: s.lr, color: COLORS[3]}], {logy, xmode, markers});
  draw(document.getElementById("chart-grad_norm"), [{name: "grad norm", xs, ys: s.grad_norm, color: COLORS[1]}], {logy, xmode, markers});
  const hasMfu = s.mfu.some(v => v !== null);
  document.getElementById("card-mfu").hidden = !hasMfu;
  if (hasMfu) draw(document.getElementById("chart-mfu"), [{name: "MFU", xs, ys: s.mfu, color: COLORS[5]}], {logy, xmode, markers});

  document.getElementById("run").textContent = sum.run;
  document.getElementById("progress").textContent = sum.step === null ? "waiting for " + sum.file + (sum.file_exists ? "" : " (not written yet; only process 0 writes it)")
    : "step " + sum.step + (sum.total_steps ? " / " + sum.total_steps : "");
  document.getElementById("eta").textContent = sum.eta_s ? "ETA " + fmtDuration(sum.eta_s) : "";
  const ck = sum.last_checkpoint;
  document.getElementById("ckpt").textContent = ck ? "checkpoint " + ck.step + " (" + fmtDuration(Date.now() / 1000 - ck.time) + " ago)" : "no checkpoint yet";
  const skipped = Object.entries(sum.skipped || {}).filter(([k, v]) => v > 0);
  document.getElementById("skipped").textContent = "skipped samples: " + (skipped.length ? skipped.map(([k, v]) => k + " " + v).join(", ") : "none");
  document.getElementById("nans").textContent = "NaN steps: " + sum.nan_steps;
  const mfu = s.mfu.filter(v => v !== null).pop();
  document.getElementById("device").textContent = sum.device_kind ? sum.device_kind + (mfu === undefined ? " (no MFU: peak unknown)" : " \u00b7 MFU " + (100 * mfu).toFixed(1) + "%") : "";
  const disk = state.markers.filter(m => m.event === "disk_critical").pop();
  const status = document.getElementById("status");
  if (sum.stalled) status.innerHTML = '<span class="warn">stalled: no metrics for ' + fmtDuration(sum.last_line_age_s) + "</span>";
  else if (disk) status.innerHTML = '<span class="warn">disk critical: ' + (disk.message || disk.path) + "</span>";
  else if (sum.finished) status.innerHTML = '<span class="ok">finished</span>';
  else status.textContent = sum.last_line_age_s === null ? "" : "last line " + fmtDuration(sum.last_line_age_s) + " ago";
  document.getElementById("info").textContent = s.step.length + " points" + (sum.downsampled ? " (older ones downsampled)" : "");
}

for (const id of ["smoothing", "logy", "xaxis"]) document.getElementById(id).addEventListener("input", render);
window.addEventListener("resize", render);
poll();
</script></body></html>
"""


# ----------------------------------------------------------------------------
# The server: read-only, its own routes only.

def make_handler(store, token):
    page = PAGE.encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = "echo-monitor"
        sys_version = ""
        timeout = 30  # a client that stops talking loses its thread, not the server

        def log_message(self, *args):
            pass

        def send(self, status, body, content_type="application/json", extra=None, head=False):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def send_error(self, code, message=None, explain=None):
            # An unknown method is the client's mistake (405), not a missing feature (501).
            super().send_error(405 if code == 501 else code, message, explain)

        def fail(self, status, message, head=False):
            extra = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            self.send(status, json.dumps({"error": message}).encode(), extra=extra, head=head)

        def authorised(self, query):
            if token is None:
                return True
            given = query.get("token", [""])[-1]
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                given = given or auth[len("Bearer "):]
            return hmac.compare_digest(given.encode(), token.encode())

        def do_HEAD(self):
            self.route(head=True)

        def do_GET(self):
            self.route(head=False)

        def refuse(self):
            self.fail(405, "read-only: GET only")

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = refuse

        def route(self, head):
            try:
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query, keep_blank_values=True, max_num_fields=20)
            except ValueError:
                return self.fail(400, "malformed request", head)
            if not self.authorised(query):
                return self.fail(401, "a valid token is required (?token=T or Authorization: Bearer T)", head)
            if url.path == "/":
                return self.send(200, page, "text/html; charset=utf-8", head=head)
            if url.path == "/api/metrics":
                try:
                    since = float(query["since"][-1]) if "since" in query else None
                    points = int(query["max_points"][-1]) if "max_points" in query else DEFAULT_POINTS
                    if since is not None and not math.isfinite(since):
                        raise ValueError
                except ValueError:
                    return self.fail(400, "since and max_points must be numbers", head)
                store.poll()
                body = json.dumps(store.snapshot(since, min(max(points, 10), MAX_POINTS))).encode()
                return self.send(200, body, head=head)
            if url.path == "/api/samples":
                store.poll()
                return self.send(200, json.dumps({"steps": store.samples()}).encode(), head=head)
            if url.path.startswith("/samples/"):
                parts = url.path.split("/")
                found = None
                if len(parts) == 4 and parts[2].isdigit():
                    store.poll()
                    found = store.sample_file(int(parts[2]), urllib.parse.unquote(parts[3]))
                if found is None:
                    return self.fail(404, "not found", head)
                return self.send(200, found[0], found[1], head=head)
            if url.path == "/metrics.csv":
                store.poll()
                body = "".join(store.csv_rows()).encode()
                return self.send(200, body, "text/csv; charset=utf-8",
                                 {"Content-Disposition": 'attachment; filename="metrics.csv"'}, head)
            return self.fail(404, "not found", head)

    return Handler


def serve(metrics, host="127.0.0.1", port=8080, token=None):
    """Start the dashboard; returns the server (its .serve_forever() runs it)."""
    store = MetricsStore(metrics)
    store.poll()
    server = ThreadingHTTPServer((host, port), make_handler(store, token))
    server.daemon_threads = True
    return server


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metrics", required=True, help="the run's metrics.jsonl (it may not exist yet)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only; reach it "
                   "through a tunnel)")
    p.add_argument("--token", default=os.environ.get("ECHO_MONITOR_TOKEN"), help="require this token on every "
                   "request (?token=T or Authorization: Bearer T); default $ECHO_MONITOR_TOKEN")
    args = p.parse_args(argv)
    try:
        server = serve(args.metrics, args.host, args.port, args.token or None)
    except OSError as e:
        print(f"monitor.py: error: cannot listen on {args.host}:{args.port} ({e.strerror})", file=sys.stderr)
        return 2
    print(f"dashboard of {args.metrics} on http://{args.host}:{server.server_address[1]}/"
          + (" (token required)" if args.token else ""), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
