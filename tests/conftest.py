"""Test setup shared by every test: CPU JAX with 8 fake devices, one compilation cache, and a
loopback Hugging Face Hub.

The environment must be set before JAX or huggingface_hub is imported anywhere (both read it
at import), which is why it lives here.
"""
import os
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ["JAX_PLATFORMS"] = "cpu"
# Several fake devices share 2 cores: a device thread descheduled for a while (CI's machine under
# load) must not abort a collective after XLA:CPU's default 40 s; a true hang still ends at each
# test's own timeout.
PATIENT_COLLECTIVES = ("--xla_cpu_collective_call_terminate_timeout_seconds=300 "
                       "--xla_cpu_collective_timeout_seconds=300")
# The suite compiles hundreds of programs, from an empty cache on CI, and runs each for a few steps:
# LLVM's optimisations cost more time than they save (a 2-host 6-step run: 53 s with them, 38 s
# without; the same losses). XLA's own passes still run.
QUICK_COMPILES = "--xla_backend_optimization_level=0"


def xla_flags(devices):
    """The suite's XLA flags for a process with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {PATIENT_COLLECTIVES} {QUICK_COMPILES}"


os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
# The suite's subprocesses (the background learning runs, simulated hosts, CLIs) read these when they
# start. By default glibc's malloc hands a freed block of a few MB back to the kernel, and so each
# training step's buffers are fresh pages that the kernel zeroes again: a one-device demo run spent
# a quarter of its CPU time in the kernel (5.0M page faults in 300 steps; 0.26M with these). Blocks
# under 256 MB come from the heap, which keeps 256 MB free at its top; the losses are the same to the bit.
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(256 << 20))
os.environ.setdefault("MALLOC_TOP_PAD_", str(256 << 20))
# One compilation cache for the suite and the runs it starts (their --compile_cache_dir).
COMPILE_CACHE = os.path.join(REPO, ".jax_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", COMPILE_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# XLA:CPU gives a process max(cores, devices) threads to run programs and as many for the work
# inside them, and a device waiting at a collective holds one. Its collectives are ordered only by
# when they start, so a device may wait at several at once: with 8 devices and 8 threads, the
# devices that are ahead can hold every thread while one still needs a thread to arrive (twice in
# 14 suite runs an in-process run hung in a collective until XLA's timeout). 32 leave room.
# The backend reads PJRT_NPROC once, when it starts; it starts here and the variable goes, so that
# the suite's subprocesses (one-device trainers, simulated hosts) keep XLA's own count rather than
# 32 busy threads on 2 cores (a one-device run takes 13% longer with them).
os.environ["PJRT_NPROC"] = "32"
import jax  # noqa: E402

jax.devices()
del os.environ["PJRT_NPROC"]

from hub_server import FakeHub  # noqa: E402

HUB = FakeHub()
os.environ["HF_ENDPOINT"] = HUB.endpoint
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf_home_")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_TOKEN", None)
os.environ.pop("DACVAE_WEIGHTS", None)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# gs:// goes to a local Cloud Storage emulator (started by the `gcs` fixture); gcsfs and tensorstore
# (orbax) read these variables at first use.
GCS_PORT = free_port()
os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{GCS_PORT}"
os.environ["TENSORSTORE_GCS_HTTP_URL"] = f"http://127.0.0.1:{GCS_PORT}"
GCS_BUCKET = "echo-test-bucket"
# No Google credentials here: without this, every gcsfs call asks google.auth for them again (its
# bucket-type lookup caches no failure), and google.auth probes the GCE metadata server each time.
os.environ["NO_GCE_CHECK"] = "true"

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long end-to-end runs; skipped unless -m slow is given")


def background_runs_needed(item):
    """The background runs (its module's BACKGROUND_RUNS) that a test's fixtures read."""
    runs = getattr(item.module, "BACKGROUND_RUNS", {})
    return [name for name in item.fixturenames if name in runs]


def pytest_collection_modifyitems(items):
    """The modules whose tests wait for a background run go last, so that every other test runs while
    those runs train."""
    late = {item.module for item in items if background_runs_needed(item)}
    items.sort(key=lambda item: item.module in late)


@pytest.fixture(scope="session", autouse=True)
def background_runs(request, tmp_path_factory):
    """The long training runs that the selected tests need (a module's BACKGROUND_RUNS: fixture name ->
    function of a run directory giving the command and its environment), all started when the session
    starts at the lowest CPU priority: they train on the cores the rest of the suite leaves idle, and
    the tests that read them wait with `finished_run`."""
    wanted = {(item.module, name) for item in request.session.items for name in background_runs_needed(item)}
    runs = {}
    for module, name in sorted(wanted, key=lambda pair: pair[1]):
        run_dir = tmp_path_factory.mktemp(name)
        command, env = module.BACKGROUND_RUNS[name](run_dir)
        # Nice 19 in a session of its own, whose scheduling group gets nice 19 too: the kernel weighs
        # sessions against each other first, and the simulated pods' hosts each run in their own.
        with open(run_dir / "output.log", "wb") as log:
            runs[name] = (subprocess.Popen(["sh", "-c", 'echo 19 2>/dev/null >/proc/self/autogroup; exec "$@"', "sh",
                                            "nice", "-n", "19", *command], stdout=log, stderr=subprocess.STDOUT,
                                           env=env, start_new_session=True), run_dir)
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finished_run(background_runs, name, timeout=3600):
    """The run directory of background run `name` once it has ended well."""
    proc, run_dir = background_runs[name]
    returncode = proc.wait(timeout=timeout)
    assert returncode == 0, (run_dir / "output.log").read_text()[-3000:]
    return run_dir


# A Hugging Face Hub that refuses every connection (port 9, discard), answered fast.
UNREACHABLE_HUB = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}


class EarlyRun:
    """A CLI run that spends most of its time waiting (the Hub client's retries with backoff, about
    20 s), started by a module-scoped fixture when its module starts, so that it waits while the
    module's other tests run; the test that checks it comes last and reads `result()`."""

    def __init__(self, command, env):
        self.command, self.streams = command, [tempfile.TemporaryFile("w+") for _ in range(2)]
        self.proc = subprocess.Popen(command, stdout=self.streams[0], stderr=self.streams[1], text=True, env=env)

    def result(self, timeout=300):
        """Its subprocess.CompletedProcess, once it has ended."""
        self.proc.wait(timeout=timeout)
        stdout, stderr = (stream.seek(0) or stream.read() for stream in self.streams)
        return subprocess.CompletedProcess(self.command, self.proc.returncode, stdout, stderr)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in self.streams:
            stream.close()


@pytest.fixture(scope="session")
def hub():
    """The loopback Hub (HF_ENDPOINT points at it): add repos with hub.add_file(...)."""
    return HUB


@pytest.fixture(scope="session")
def gcs():
    """A local Cloud Storage emulator (tests/gcs_emulator.py) holding one bucket; returns its name."""
    server = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "gcs_emulator.py"), str(GCS_PORT),
                               GCS_BUCKET], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", GCS_PORT), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the Cloud Storage emulator did not start")
            time.sleep(0.2)
    yield GCS_BUCKET
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture(scope="module", autouse=True)
def fresh_compilations():
    """The suite runs in one process: drop each module's compiled programs when it ends, so that
    executables and their code mappings do not pile up over the whole run (a 45-minute run compiles
    hundreds of programs; vm.max_map_count and memory are finite)."""
    yield
    if "jax" in sys.modules:
        import gc
        sys.modules["jax"].clear_caches()
        gc.collect()
