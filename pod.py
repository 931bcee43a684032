"""Joining, watching and leaving a pod: every host of a TPU pod (or of a simulated one, several
processes on this machine) runs the same trainer, and these are the few things they do together
beyond JAX's collectives.

- init_distributed: a simulated pod meets on 127.0.0.1 (rendezvous) before jax.distributed starts,
  so that a missing host is one sentence; a TPU pod is found by JAX's cluster detection.
- watch_peers / leave_pod: the first host that meets an error tells the others through JAX's
  key-value store, and every host stops within seconds with the same sentence; part: the hosts
  leave together at the normal end.
- gather_json, failed_hosts, check_shared_directory: small agreements between hosts.
"""

import atexit
import json
import os
import random
import socket
import sys
import threading
import time
import traceback

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import multihost

DISTRIBUTED_TIMEOUT_S = 300  # default seconds for every host to join


class PodError(Exception):
    """Hosts that cannot work together (one missing, a directory one of them cannot see); main()
    prints it as one sentence on every host."""


HEARTBEAT_TIMEOUT_S = 45  # a host silent this long is lost: JAX stops the others (within 90 s in all)


def init_distributed(timeout):
    """Join the other hosts: a local simulated pod (ECHO_COORDINATOR, ECHO_NUM_PROCESSES,
    ECHO_PROCESS_ID), or a TPU pod, which JAX's cluster detection finds (launch.sh sets ECHO_TPU_POD
    on every worker; GKE sets TPU_WORKER_HOSTNAMES), then watch the others for errors (watch_peers).
    Single-host runs skip this. Returns whether this host joined a pod."""
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
        raise PodError(f"could not join the other hosts within {timeout} s ({type(e).__name__}); check that "
                       "every worker started and can reach the coordinator") from None
    watch_peers()
    return True


PEER_FAILURE_KEY = "echo/failed"  # key-value store entry: the sentence of the first host that met an error
PEER_SEEN_KEY = "echo/failure_seen/"  # + process index: that host has printed the sentence and is stopping
# What a collective raises when a peer's connection drops (gloo on the simulated pod): a lost host,
# not a defect of this one.
PEER_LOST_SIGNS = ("Connection reset by peer", "Connection closed by peer")
leaving_pod = threading.Lock()  # held by the thread (main or watch_peers) that ends this host after an error


peers_watched = threading.Event()  # cleared: the watcher's thread ends within a second (stop_watching)
watchers = []


def watch_peers():
    """On a pod, end this host the moment another one reports an error (leave_pod), instead of leaving
    it in a collective until the heartbeat timeout: a bad flag, a full disk or a damaged shard on one
    host stops every host within seconds, each with the same sentence."""
    client = multihost.get_jax_distributed_client()

    def watch():
        while peers_watched.is_set():
            try:
                sentence = client.blocking_key_value_get(PEER_FAILURE_KEY, 1000)
            except Exception as e:  # the 1 s wait ran out (look again), or the client is shutting down
                if "DEADLINE_EXCEEDED" in str(e):
                    continue
                return
            leave_pod(sentence)

    peers_watched.set()
    watchers.append(threading.Thread(target=watch, name="watch-peers", daemon=True))
    watchers[-1].start()
    # Stop the watcher before JAX shuts the client down at exit (registered later, so it runs first):
    # a thread left waiting in the client then aborts the process.
    atexit.register(stop_watching)


def stop_watching():
    peers_watched.clear()
    for thread in watchers:
        thread.join()


def part():
    """The normal end of a run on a pod: every host meets the others a last time (JAX's shutdown
    barrier) and then works alone, so that what only process 0 still does (the final weights-only
    export) holds no other host. Nothing to do off a pod."""
    if jax.distributed.is_initialized():
        stop_watching()
        jax.distributed.shutdown()


def leave_pod(sentence, tell_others=False, with_traceback=False):
    """End this host of a pod after an error: print the sentence, tell the other hosts (tell_others:
    this host met it), wait (10 s at most) until every host has printed it, and exit without JAX's
    shutdown barrier, which would wait for hosts that are gone. Never returns. Process 0 leaves
    last: the coordination service lives in it, and the others' JAX clients abort them the moment
    it goes."""
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
    return jax.process_count() > 1 and jax.default_backend() == "cpu"


def coordinator_port():
    """A port P for a simulated pod's ECHO_COORDINATOR whose rendezvous port P + 1 is free too, below
    Linux's ephemeral range: the kernel hands P + 1 of an ephemeral P to outgoing connections."""
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
                raise PodError(f"cannot listen on {host}:{address[1]}, the port after ECHO_COORDINATOR's, where the "
                               f"hosts meet first ({e.strerror}); choose a coordinator port whose next port is free") \
                    from None
            server.listen(processes)
            server.settimeout(0.5)
            joined = set()
            while len(joined) < processes - 1:
                if time.monotonic() > deadline:
                    raise PodError(missing(len(joined) + 1))
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
            raise PodError(missing("fewer than all"))
        time.sleep(0.5)


def gather_json(value):
    """A small JSON-able value from every process, as a list (one collective)."""
    encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([len(encoded)], np.int64))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(encoded)] = encoded
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]


def failed_hosts(ok):
    """The indices of the hosts whose `ok` is False (a collective every host joins; [0] or [] alone)."""
    if jax.process_count() == 1:
        return [] if ok else [0]
    every = np.asarray(multihost_utils.process_allgather(np.asarray([ok]))).reshape(-1)
    return [int(i) for i in np.flatnonzero(~every)]


def check_shared_directory(directory):
    """Every host must see the same checkpoint directory (gs://, or a shared mount): process 0 writes
    a token into it and every host looks for it, before anything compiles."""
    process = jax.process_index()
    token = np.frombuffer(os.urandom(8), np.uint8) if process == 0 else np.zeros(8, np.uint8)
    token = bytes(np.asarray(multihost_utils.broadcast_one_to_all(token)).astype(np.uint8)).hex()
    marker = epath.Path(directory) / f".hosts-{token}"
    if process == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    multihost_utils.sync_global_devices("checkpoint directory written")
    blind = failed_hosts(marker.exists())
    multihost_utils.sync_global_devices("checkpoint directory checked")
    if process == 0:
        marker.unlink()
    if blind:
        raise PodError(f"host(s) {', '.join(map(str, blind))} do not see process 0's --checkpoint_dir {directory}: "
                       "every host must write to the same place; use gs://BUCKET/PATH or a directory on a "
                       "shared mount (NFS, Filestore)")
