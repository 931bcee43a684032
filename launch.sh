#!/usr/bin/env bash
# Start an Echo training run on every worker of a TPU pod, or simulate an N-host pod on this machine.
#
#   bash launch.sh --local 2                 # the demo: synthetic corpus, tiny model, 2 simulated hosts,
#                                            # dashboard, checkpoints, then an inference example (a wav)
#   bash launch.sh --local 2 --steps 50      # any train_pretrain.py flag passes through
#
# On a TPU pod every worker runs the same command (see README, "Training on a TPU pod"):
#   gcloud compute tpus tpu-vm ssh NODE --zone=ZONE --worker=all --command="setsid nohup bash ~/echo/launch.sh \
#       --preset 1.3B --data hf://datasets/ORG/REPO --silence_latent ~/echo/silence.npy >>~/echo/launch.log 2>&1 &"
# (setsid nohup: the run outlives the ssh session; without it a dropped connection checkpoints and stops it.)
#
# Each worker: puts HF_HOME, shard downloads (TMPDIR), the compilation cache and the run on the large
# disk ($ECHO_DISK), starts disk_watchdog.py (one per machine, it holds a lock) and monitor.py (every
# worker starts one; only process 0 writes metrics, so the dashboard with data is on the worker that
# holds process 0, and the others say so), then runs train_pretrain.py, which writes its own log (shown here).
#
# Environment: ECHO_DISK (default /mnt/disks/persist if it exists, else ~/echo-disk; locally ./runs),
# ECHO_MONITOR_PORT (8080), ECHO_MONITOR_TOKEN, ECHO_MIN_FREE_GB (20; locally 2), PYTHON, XLA_FLAGS (kept; a
# simulated host gets one fake CPU device on top).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$HERE/.venv/bin/python" ]]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python3; fi
fi

LOCAL_HOSTS=""
if [[ "${1:-}" == "--local" ]]; then
  LOCAL_HOSTS="${2:-}"
  if ! [[ "$LOCAL_HOSTS" =~ ^[1-9][0-9]*$ ]]; then
    echo "launch.sh: error: --local needs a number of hosts, e.g. --local 2" >&2
    exit 2
  fi
  shift 2
  # The demo when no training flag is given: a few minutes on a CPU, a global batch of about 32 that
  # splits evenly over the hosts, a final full eval of 32 held-out texts (not 128: seconds, not a minute).
  [[ $# -eq 0 ]] && set -- --preset tiny --data synthetic --synthetic_corpus words --steps 60 --checkpoint_every 30 \
    --eval_every 30 --full_eval_samples 32 --global_batch_size $(((32 + LOCAL_HOSTS - 1) / LOCAL_HOSTS * LOCAL_HOSTS))
  ECHO_DISK="${ECHO_DISK:-$HERE/runs}"
  MIN_FREE_GB="${ECHO_MIN_FREE_GB:-2}"
else
  if [[ -z "${ECHO_DISK:-}" ]]; then
    if [[ -d /mnt/disks/persist ]]; then ECHO_DISK=/mnt/disks/persist; else ECHO_DISK="$HOME/echo-disk"; fi
  fi
  MIN_FREE_GB="${ECHO_MIN_FREE_GB:-20}"
fi

# Where the run writes: the flags' values if given, else under ECHO_DISK.
flag_value() {  # flag_value NAME DEFAULT "$@": the last --NAME value (--NAME V or --NAME=V)
  local name="$1" value="$2"; shift 2
  while [[ $# -gt 0 ]]; do
    case "$1" in
      "--$name") value="${2:-}"; shift ;;
      "--$name="*) value="${1#*=}" ;;
    esac
    shift
  done
  printf '%s' "$value"
}
RUN_DIR=$(flag_value run_dir "$ECHO_DISK/run" "$@")
METRICS=$(flag_value metrics_file "$RUN_DIR/metrics.jsonl" "$@")
LOG_DIR="$RUN_DIR/logs"
mkdir -p "$ECHO_DISK" "$RUN_DIR" "$LOG_DIR"

export HF_HOME="${HF_HOME:-$ECHO_DISK/hf}"
export TMPDIR="$ECHO_DISK/tmp"  # the data pipeline's shard downloads land here, on the large disk
export USE_TF=0  # Hugging Face libraries must not import TensorFlow beside JAX (train_pretrain.py mocks it too)
mkdir -p "$HF_HOME" "$TMPDIR"
CACHE=(--compile_cache_dir "$ECHO_DISK/jax_cache")
# A gs:// checkpoint directory has the compilation cache beside it, where every host reads what
# process 0 wrote (the trainer's default); a worker's local disk would serve process 0 alone.
[[ "$(flag_value checkpoint_dir "" "$@")" == gs://* ]] && CACHE=()
[[ -n "$(flag_value compile_cache_dir "" "$@")" ]] && CACHE=()
TRAIN=("$HERE/train_pretrain.py" --run_dir "$RUN_DIR" "${CACHE[@]}" "$@")

start_companions() {
  "$PYTHON" "$HERE/disk_watchdog.py" --paths "$ECHO_DISK" --min-free-gb "$MIN_FREE_GB" --metrics-file "$METRICS" \
    --lock-file "$ECHO_DISK/.disk_watchdog.lock" >>"$LOG_DIR/disk_watchdog.log" 2>&1 &
  WATCHDOG_PID=$!
  "$PYTHON" "$HERE/monitor.py" --metrics "$METRICS" --port "${ECHO_MONITOR_PORT:-8080}" \
    >>"$LOG_DIR/monitor.log" 2>&1 &
  MONITOR_PID=$!
  echo "launch.sh: dashboard on http://127.0.0.1:${ECHO_MONITOR_PORT:-8080}/ (log $LOG_DIR/monitor.log); disk watchdog on $ECHO_DISK"
}

if [[ -z "$LOCAL_HOSTS" ]]; then
  # ---- a TPU worker: companions in the background, then this shell becomes the trainer.
  start_companions
  # On a TPU VM (v4: /dev/accel*, v5e and later: /dev/vfio) the trainer joins the pod with
  # jax.distributed.initialize(), which finds the other workers through the metadata server.
  if compgen -G "/dev/accel*" >/dev/null || compgen -G "/dev/vfio/[0-9]*" >/dev/null; then export ECHO_TPU_POD=1; fi
  LOG="$LOG_DIR/train-$(hostname).log"
  echo "launch.sh: $(hostname): training, log $LOG"
  # The trainer writes its log itself and `tail` shows it here: a shutdown that kills the terminal's
  # readers first (as a preemption does, with SIGTERM to every process at once) cannot take the
  # trainer's output away before its checkpoint.
  FROM=$(($(stat -c %s "$LOG" 2>/dev/null || echo 0) + 1))
  "$PYTHON" -u "${TRAIN[@]}" >>"$LOG" 2>&1 &
  TRAINER=$!
  tail -c +"$FROM" --pid="$TRAINER" -F "$LOG" 2>/dev/null &
  TAIL=$!
  # A signal to this script alone (kill, a dropped connection) reaches the trainer, which checkpoints.
  trap 'kill -TERM "$TRAINER" 2>/dev/null || true' TERM INT HUP
  while kill -0 "$TRAINER" 2>/dev/null; do wait "$TRAINER" || true; done  # a trapped signal ends `wait` early
  STATUS=0
  wait "$TRAINER" || STATUS=$?  # the status bash kept for it
  wait "$TAIL" || true  # tail ends with the trainer; the companions keep running
  exit "$STATUS"
fi

# ---- a simulated pod: N processes on 127.0.0.1 (gloo collectives), each with its own fake devices.
# The coordinator's port and the next one (the hosts' rendezvous), both free.
PORT=$(cd "$HERE" && "$PYTHON" -c 'import pod; print(pod.coordinator_port())')
export JAX_PLATFORMS=cpu
# One device per simulated host, each host pinned to a core of its own where there are enough, so
# that the hosts do not slow each other down. Correctness does not depend on timing: the trainer
# keeps every collective out of loops on a CPU pod (model.EchoConfig.unroll_scan; README, "Training
# on a TPU pod"), so each host issues them in program order.
# A user's own XLA flags stay; the device count comes last, so it is the one XLA keeps.
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=1"
CORES=$(nproc)
PIN=()
TRAINER_PIDS=()
WATCHDOG_PID="" MONITOR_PID="" TAIL_PID="" STOPPING=""

GRACE=${ECHO_STOP_GRACE:-300}  # seconds a host gets to checkpoint and exit after SIGTERM, then SIGKILL
FAILED_GRACE=20  # once a host has failed no checkpoint can complete: the others get this long to exit
STOP_TIME=0 FAILED=""
alive() { local pid; for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }
stop_hosts() {  # SIGTERM every host (each checkpoints at its next step); remember when
  [[ -z "$STOPPING" ]] && STOP_TIME=$SECONDS
  STOPPING=1
  local pid
  for pid in "${TRAINER_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
cleanup() {  # on any exit: no process of this run is left behind
  local pid
  if alive "${TRAINER_PIDS[@]}"; then
    stop_hosts
    while alive "${TRAINER_PIDS[@]}" && ((SECONDS - STOP_TIME < GRACE)); do sleep 0.5; done
    for pid in "${TRAINER_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  for pid in $WATCHDOG_PID $MONITOR_PID $TAIL_PID; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${TRAINER_PIDS[@]}" $WATCHDOG_PID $MONITOR_PID $TAIL_PID; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
on_signal() {
  echo "launch.sh: stopping: every host writes a checkpoint at the next step, then exits"
  stop_hosts
}
trap on_signal INT TERM

start_companions
for ((i = 0; i < LOCAL_HOSTS; i++)); do
  command -v taskset >/dev/null && PIN=(taskset -c $((i % CORES)))
  # Its own session: a Ctrl-C in the terminal reaches only this script, which asks every host to
  # checkpoint (SIGTERM) instead of killing them mid-step.
  ECHO_COORDINATOR="127.0.0.1:$PORT" ECHO_NUM_PROCESSES="$LOCAL_HOSTS" ECHO_PROCESS_ID="$i" \
    setsid "${PIN[@]}" "$PYTHON" -u "${TRAIN[@]}" >"$LOG_DIR/host$i.log" 2>&1 &
  TRAINER_PIDS+=($!)
done
echo "launch.sh: $LOCAL_HOSTS simulated hosts on 127.0.0.1:$PORT; logs in $LOG_DIR (host 0 follows)"
tail -n +1 -F "$LOG_DIR/host0.log" 2>/dev/null &
TAIL_PID=$!

# Wait for every host; when one fails, the others would wait for it forever in a collective: stop them.
STATUS=0
declare -A DONE=()
while [[ ${#DONE[@]} -lt ${#TRAINER_PIDS[@]} ]]; do
  for i in "${!TRAINER_PIDS[@]}"; do
    pid=${TRAINER_PIDS[$i]}
    [[ -n "${DONE[$i]:-}" ]] && continue
    if ! kill -0 "$pid" 2>/dev/null; then
      code=0
      wait "$pid" || code=$?
      DONE[$i]=$code
      if [[ $code -ne 0 ]]; then
        if [[ -z "$FAILED" ]]; then  # the first failure's status is the run's: the others follow it
          FAILED=1
          STATUS=$code
          how="exited with status $code"; ((code > 128)) && how="was lost (killed by signal $((code - 128)), status $code)"
          # A checkpoint needs every host: without this one the others can only stop.
          echo "launch.sh: host $i $how (see $LOG_DIR/host$i.log); stopping the others" >&2
          GRACE=$FAILED_GRACE
          stop_hosts
        fi
      fi
    fi
  done
  if [[ -n "$STOPPING" ]] && ((SECONDS - STOP_TIME >= GRACE)) && alive "${TRAINER_PIDS[@]}"; then
    echo "launch.sh: hosts still running $GRACE s after SIGTERM: killing them" >&2
    for pid in "${TRAINER_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    STATUS=1
  fi
  sleep 0.5
done
sleep 0.5  # the last lines of host 0's log reach the console
kill -TERM "$TAIL_PID" 2>/dev/null || true

reached_last_step() {  # did the run's latest start reach its total_steps? (metrics written by process 0)
  "$PYTHON" - "$METRICS" <<'EOF'
import json, sys
rows = []
for line in open(sys.argv[1]):
    try:
        rows.append(json.loads(line))
    except ValueError:
        pass
starts = [r for r in rows if r.get("event") == "start"]
last = max((r["step"] for r in rows if "loss" in r and "event" not in r), default=0)
sys.exit(0 if starts and last >= starts[-1]["total_steps"] else 1)
EOF
}
# A host sent SIGTERM on its own (a preemption) checkpoints every host and they all exit 0: the
# metrics say whether the run finished.
if [[ $STATUS -ne 0 || -n "$STOPPING" ]] || ! reached_last_step; then
  echo "launch.sh: the run stopped before its last step (status $STATUS); rerun the same command to resume" \
    "from its last checkpoint"
  exit "$STATUS"
fi

# ---- the run is complete: speak with the newest checkpoint.
CHECKPOINT_DIR=$(flag_value checkpoint_dir "$RUN_DIR/checkpoints" "$@")
CODEC=()
if [[ -z "${DACVAE_WEIGHTS:-}" ]] && ! "$PYTHON" - <<'EOF' 2>/dev/null
from huggingface_hub import HfApi
HfApi().model_info("facebook/dacvae-watermarked", timeout=10)
EOF
then
  echo "launch.sh: the Hugging Face Hub cannot be reached: the inference example uses RANDOM codec weights" \
    "(dacvae.py init-random), so the wav is noise-like; set DACVAE_WEIGHTS=weights.pth for real audio"
  [[ -f "$RUN_DIR/dacvae-random.pth" ]] || "$PYTHON" "$HERE/dacvae.py" init-random "$RUN_DIR/dacvae-random.pth" --size tiny
  CODEC=(--dacvae_weights "$RUN_DIR/dacvae-random.pth")
fi
echo "launch.sh: inference example with the newest checkpoint in $CHECKPOINT_DIR"
"$PYTHON" "$HERE/inference.py" --checkpoint "$CHECKPOINT_DIR" --text "Hello from a pod." \
  --output "$RUN_DIR/demo.wav" --compile_cache_dir "$ECHO_DISK/jax_cache" "${CODEC[@]}"
echo "launch.sh: wrote $RUN_DIR/demo.wav"
