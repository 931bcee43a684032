"""launch.sh --local: a simulated 2-host pod end to end, and a clean stop on SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import soundfile
from conftest import COMPILE_CACHE, QUICK_COMPILES, REPO, UNREACHABLE_HUB, free_port, xla_flags

import train_pretrain

TINY = ["--preset", "tiny", "--data", "synthetic", "--synthetic_corpus", "short", "--global_batch_size", "8",
        "--max_latent_len", "48", "--max_text_len", "48", "--max_speaker_len", "48", "--eval_samples", "0",
        "--full_eval_samples", "0",  # evals give val_loss only: nothing sampled to compile
        "--compile_cache_dir", COMPILE_CACHE]  # the suite's cache, not each test's empty one


def launch(tmp_path, port, *flags, **popen):
    env = {**os.environ, "ECHO_DISK": str(tmp_path / "disk"), "ECHO_MONITOR_PORT": str(port), **UNREACHABLE_HUB}
    env.pop("DACVAE_WEIGHTS", None)
    env.pop("HF_HOME", None)  # launch.sh puts it on the large disk unless the user chose one
    env["XLA_FLAGS"] = QUICK_COMPILES  # not the suite's 8 fake devices: launch.sh gives each host one
    return subprocess.Popen(["bash", os.path.join(REPO, "launch.sh"), "--local", "2", *TINY, *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **popen)


def command_line(pid):
    """The command line of process `pid`, its arguments joined by spaces ("" once it has gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_of(tmp_path):
    """PIDs of any process whose command line mentions this test's directory."""
    return [int(pid) for pid in filter(str.isdigit, os.listdir("/proc")) if str(tmp_path) in command_line(pid)]


def metrics(run):
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in open(path)] if path.exists() else []


def assert_ended_with_companions_and_the_spoken_example(tmp_path, out):
    """What a completed `launch.sh --local` run leaves behind: its companions' logs, the example spoken
    with the newest checkpoint (said aloud: random codec weights while the Hub cannot be reached), and
    no process."""
    run = tmp_path / "disk" / "run"
    assert "layer scans unrolled" in (run / "logs" / "host0.log").read_text()
    assert "cannot be reached" in out and "RANDOM codec weights" in out  # the offline fallback, said aloud
    assert f"inference example with the newest checkpoint in {run / 'checkpoints'}" in out
    audio, rate = soundfile.read(str(run / "demo.wav"))
    assert rate == 48000 and len(audio) > 0 and abs(audio).max() > 0
    assert "watchdog_started" in (run / "logs" / "disk_watchdog.log").read_text()
    assert "dashboard of" in (run / "logs" / "monitor.log").read_text()
    assert (tmp_path / "disk" / "hf").is_dir() and (tmp_path / "disk" / "jax_cache").is_dir()
    time.sleep(0.5)
    assert processes_of(tmp_path) == []


def test_a_local_pod_runs_to_its_end_with_companions_checkpoints_and_the_spoken_example(tmp_path):
    """A short run of `launch.sh --local 2`: both hosts train, the companions run, and once the last step
    is checkpointed the launcher speaks with the newest checkpoint, saying that the codec is random
    when the Hub cannot be reached."""
    proc = launch(tmp_path, free_port(), "--steps", "4", "--checkpoint_every", "2", "--eval_every", "4")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    run = tmp_path / "disk" / "run"
    lines = metrics(run)
    start = [m for m in lines if m.get("event") == "start"][0]
    assert start["processes"] == 2 and start["devices"] == 2
    assert [m["step"] for m in lines if "event" not in m] == [1, 2, 3, 4]
    assert any(m.get("event") == "eval" and "val_loss" in m for m in lines)
    assert {"step_0000002", "step_0000004", "step_0000004.params.pkl"} <= set(os.listdir(run / "checkpoints"))
    assert_ended_with_companions_and_the_spoken_example(tmp_path, out)


@pytest.mark.slow  # five minutes: readme-demo.sh runs it three times; the suite runs a short pod to its end
def test_the_readme_command_completes_on_a_busy_machine(tmp_path):
    """Exactly the README's first command, `bash launch.sh --local 2` with no flag (the words corpus),
    while another process keeps a core busy: every host must issue its collectives in program order
    whatever the timing. The run ends with its companions, checkpoints and the spoken example."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        env = {**os.environ, "ECHO_DISK": str(tmp_path / "disk"), "ECHO_MONITOR_PORT": str(free_port()),
               **UNREACHABLE_HUB}
        for name in ("DACVAE_WEIGHTS", "HF_HOME", "XLA_FLAGS"):
            env.pop(name, None)
        proc = subprocess.run(["bash", os.path.join(REPO, "launch.sh"), "--local", "2"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env, timeout=1500)
    finally:
        busy.kill()
        busy.wait()
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    run = tmp_path / "disk" / "run"
    lines = metrics(run)
    start = [m for m in lines if m.get("event") == "start"][0]
    assert start["processes"] == 2 and start["devices"] == 2 and start["preset"] == "tiny"
    assert [m["step"] for m in lines if "event" not in m] == list(range(1, start["total_steps"] + 1))
    assert any(m.get("event") == "eval" and "synthetic_nmse" in m for m in lines)
    last = f"step_{start['total_steps']:07d}"
    assert {last, last + ".params.pkl"} <= set(os.listdir(run / "checkpoints"))
    assert any(name.startswith("synthetic-words-") for name in os.listdir(run))
    assert_ended_with_companions_and_the_spoken_example(tmp_path, out)


def trainer_of_host(tmp_path, index):
    """PID of simulated host `index`'s trainer."""
    for pid in processes_of(tmp_path):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if f"ECHO_PROCESS_ID={index}".encode() in environ and "train_pretrain.py" in command_line(pid):
            return pid
    return None


def wait_for_steps(tmp_path, proc, port, count):
    run = tmp_path / "disk" / "run"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len([m for m in metrics(run) if "event" not in m]) >= count:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/metrics", timeout=10) as r:
                return json.loads(r.read())
        time.sleep(0.5)
    raise AssertionError(proc.stdout.read()[-3000:] if proc.poll() is not None else "timeout")


@pytest.mark.parametrize("target", ["launcher", "host 1"])
def test_sigterm_checkpoints_and_leaves_no_process(tmp_path, target):
    """SIGTERM to the launcher (Ctrl-C, a scheduler) or to one host (a preempted worker): every host
    checkpoints at the same step and exits 0; the launcher says how to resume and runs no demo."""
    port = free_port()
    proc = launch(tmp_path, port, "--steps", "100000", "--checkpoint_every", "100000", "--eval_every", "100000",
                  start_new_session=True)
    served = wait_for_steps(tmp_path, proc, port, 3)
    assert served["points"] >= 3
    os.kill(proc.pid if target == "launcher" else trainer_of_host(tmp_path, 1), signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    run = tmp_path / "disk" / "run"
    lines = metrics(run)
    preempted = [m for m in lines if m.get("event") == "preempted"]
    assert len(preempted) == 1
    last = max(m["step"] for m in lines if "event" not in m)
    assert preempted[0]["step"] == last
    assert f"step_{last:07d}" in os.listdir(run / "checkpoints")
    assert "rerun the same command to resume" in out and "inference example" not in out
    assert not (run / "demo.wav").exists()
    time.sleep(0.5)
    assert processes_of(tmp_path) == []


def test_a_lost_host_stops_the_pod_with_one_line_naming_it(tmp_path):
    """SIGKILL of host 1's trainer (a dead worker): the launcher names it, exits with its status
    within 90 s and leaves nothing running; host 0 says it lost contact, with no raw traceback."""
    port = free_port()
    proc = launch(tmp_path, port, "--steps", "100000", "--checkpoint_every", "100000", "--eval_every", "100000",
                  start_new_session=True)
    wait_for_steps(tmp_path, proc, port, 3)
    killed = time.monotonic()
    os.kill(trainer_of_host(tmp_path, 1), signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 137 and time.monotonic() - killed < 90, out[-3000:]
    assert "launch.sh: host 1 was lost (killed by signal 9, status 137)" in out, out[-3000:]
    assert "rerun the same command to resume" in out and "inference example" not in out
    host0 = (tmp_path / "disk" / "run" / "logs" / "host0.log").read_text()
    assert "Traceback" not in host0, host0[-3000:]
    time.sleep(0.5)
    assert processes_of(tmp_path) == []


def worker_env(tmp_path, port):
    env = {**os.environ, "ECHO_DISK": str(tmp_path / "disk"), "ECHO_MONITOR_PORT": str(port),
           "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu"}
    env.pop("HF_HOME", None)
    return env


def test_worker_mode_starts_companions_and_logs_the_trainer(tmp_path):
    """Without --local (a TPU worker): companions in the background, the trainer's output in its log."""
    port = free_port()
    env = worker_env(tmp_path, port)
    try:
        out = subprocess.run(["bash", os.path.join(REPO, "launch.sh"), *TINY, "--steps", "2", "--eval_every", "100"],
                             capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        logs = tmp_path / "disk" / "run" / "logs"
        train_log = [p for p in os.listdir(logs) if p.startswith("train-")]
        assert len(train_log) == 1 and "step 2/2" in (logs / train_log[0]).read_text()
        assert (tmp_path / "disk" / "run" / "checkpoints" / "step_0000002.params.pkl").exists()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/metrics", timeout=10) as r:
            assert json.loads(r.read())["step"] == 2  # the dashboard keeps serving the finished run
    finally:
        for pid in processes_of(tmp_path):  # on a pod the companions outlive the run; here, clean up
            os.kill(pid, signal.SIGTERM)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_preempted_worker_checkpoints_and_the_same_command_resumes(tmp_path, signum):
    """The machine's shutdown (SIGTERM to every process of the worker's session at once, the reader of
    the terminal included) or a dropped ssh session (SIGHUP): the trainer checkpoints at the step it
    reached, its log says so, every process is gone within 30 s, and the same command resumes there."""
    command = ["bash", os.path.join(REPO, "launch.sh"), *TINY, "--steps", "100000", "--checkpoint_every", "100000",
               "--eval_every", "100000"]
    # As in an ssh session, SIGHUP has its default action, even when the suite runs under nohup (whose
    # ignored SIGHUP every child would inherit, so that the companions would rightly outlive the signal).
    # (env, not a preexec_fn: forking this multithreaded process and running Python in the child can deadlock.)
    session = ["env", "--default-signal=HUP", *command]
    run = tmp_path / "disk" / "run"
    proc = subprocess.Popen(session, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=worker_env(tmp_path, free_port()), start_new_session=True)
    deadline = time.time() + 300
    while len([m for m in metrics(run) if "event" not in m]) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signum)
    proc.stdout.close()  # the terminal's reader goes with the rest
    stopped = time.monotonic()
    while processes_of(tmp_path) and time.monotonic() - stopped < 30:
        time.sleep(0.2)
    assert processes_of(tmp_path) == [], [command_line(pid) for pid in processes_of(tmp_path)]
    lines = metrics(run)
    preempted = [m["step"] for m in lines if m.get("event") == "preempted"]
    assert len(preempted) == 1 and preempted[0] == max(m["step"] for m in lines if "event" not in m)
    assert f"step_{preempted[0]:07d}" in os.listdir(run / "checkpoints")
    log = next((run / "logs").glob("train-*.log")).read_text()
    assert any(f"checkpoint written at step {preempted[0]}, exiting" in line for line in log.splitlines()[-5:])
    assert "BrokenPipeError" not in log and "Traceback" not in log

    again = subprocess.run([*command, "--run_steps", "2"], capture_output=True, text=True,
                           env=worker_env(tmp_path, free_port()), timeout=300)
    try:
        assert again.returncode == 0, again.stdout[-3000:]
        lines = metrics(run)
        assert [m["step"] for m in lines if m.get("event") == "resumed"] == [preempted[0]]
        assert max(m["step"] for m in lines if "event" not in m) == preempted[0] + 2
        assert f"step {preempted[0] + 2}/100000" in again.stdout  # the log, shown on the terminal
    finally:
        for pid in processes_of(tmp_path):
            os.kill(pid, signal.SIGTERM)


@pytest.mark.parametrize("checkpoint_dir, cache", [("gs://bucket/run/checkpoints", "gs://bucket/run/jax_cache"),
                                                   (None, "disk/jax_cache")], ids=["gs", "local"])
def test_a_worker_shares_the_compilation_cache_of_gs_checkpoints(tmp_path, checkpoint_dir, cache):
    """JAX writes cache entries from process 0 only: with gs:// checkpoints the cache lives beside them
    for every host to read, so launch.sh does not point it at the worker's own disk."""
    record = tmp_path / "argv"
    stub = tmp_path / "python"  # records the trainer's command line, then exits
    stub.write_text(f"#!/bin/sh\ncase \"$*\" in *train_pretrain.py*) printf '%s\\n' \"$@\" > {record};; esac\n")
    stub.chmod(0o755)
    flags = ["--checkpoint_dir", checkpoint_dir] if checkpoint_dir else []
    env = {**worker_env(tmp_path, free_port()), "PYTHON": str(stub)}
    subprocess.run(["bash", os.path.join(REPO, "launch.sh"), "--preset", "tiny", *flags], env=env, timeout=60,
                   capture_output=True, check=True)
    argv = record.read_text().splitlines()
    args = train_pretrain.resolve_defaults(train_pretrain.parse_args(argv[argv.index(
        os.path.join(REPO, "train_pretrain.py")) + 1:]))
    assert args.compile_cache_dir == (cache if cache.startswith("gs://") else str(tmp_path / cache))


def test_a_simulated_pod_keeps_the_users_xla_flags_and_gives_each_host_one_device(tmp_path):
    """launch.sh --local passes the user's XLA_FLAGS on to every host with one fake device appended:
    XLA takes a flag's last value, so a device count of the user's own gives way to it."""
    # A python that answers launch.sh's port question, and as a trainer records its XLA_FLAGS and fails
    # (a second later: the first failure stops the other hosts, which must have written theirs).
    stub = tmp_path / "python"
    stub.write_text("#!/bin/sh\ncase \"$*\" in\n  *coordinator_port*) echo 12345;;\n"
                    f"  *train_pretrain.py*) printf '%s' \"$XLA_FLAGS\" > {tmp_path}/flags$ECHO_PROCESS_ID; sleep 1; "
                    "exit 3;;\nesac\n")
    stub.chmod(0o755)
    one_device = "--xla_force_host_platform_device_count=1"
    for users, hosts_get in ((None, one_device),
                             (f"{QUICK_COMPILES} --xla_force_host_platform_device_count=8",
                              f"{QUICK_COMPILES} --xla_force_host_platform_device_count=8 {one_device}")):
        env = {**worker_env(tmp_path, free_port()), "PYTHON": str(stub)}
        env.pop("XLA_FLAGS")
        if users:
            env["XLA_FLAGS"] = users
        out = subprocess.run(["bash", os.path.join(REPO, "launch.sh"), "--local", "2", "--preset", "tiny"], env=env,
                             timeout=60, capture_output=True, text=True)
        assert out.returncode == 3 and "exited with status 3" in out.stderr, out
        assert [(tmp_path / f"flags{i}").read_text() for i in range(2)] == [hosts_get] * 2
