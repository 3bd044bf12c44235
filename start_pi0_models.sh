#!/usr/bin/env bash
# Start one gpu_worker model server per GPU on ports BASE_PORT, BASE_PORT+1, ... (each pinned
# with CUDA_VISIBLE_DEVICES), or NUM_CPU_SERVERS CPU servers when no GPU is found.
# Idempotent: a server whose PID file points at a live server this script started is left alone.
#
# Any openpi-compatible server can stand in for gpu_worker: MODEL_SERVER_CMD is a command template
# run with bash in its own process group, with {port}, {gpu} (the GPU index; empty on the CPU) and
# {host} filled in, e.g. openpi's own server:
#   MODEL_SERVER_CMD='cd /opt/openpi && exec uv run scripts/serve_policy.py --port {port} policy:checkpoint
#     --policy.config=pi05_libero --policy.dir=/ckpt/pi05_libero'
# It gets the same pinning, PID file, log, health wait (GET /healthz answers 200; a WebSocket-only
# server's 426 counts too) and stop as gpu_worker. The process sees its GPU as cuda:0 ({gpu} is the
# host's index, for names and logs); openpi's serve_policy.py binds 0.0.0.0 whatever {host} says.
#
# --supervise: run each server under a supervisor (python -m gpu_worker.supervise) that restarts it when it
# exits, with backoff doubling from SUPERVISE_BACKOFF_INITIAL_S (1) to SUPERVISE_BACKOFF_MAX_S (30), and gives
# up after more than SUPERVISE_MAX_RESTARTS (5) runs in a row shorter than SUPERVISE_STABLE_S (300) seconds.
# The PID file then holds the supervisor's PID; stop_pi0_models.sh stops it and its server together.
#
# Environment (all optional):
#   BASE_PORT=8000  NUM_CPU_SERVERS=2  NUM_GPUS=<detected by nvidia-smi>  HOST=127.0.0.1
#   MODEL_SERVER_CMD='... {port} ...'                         run this instead of gpu_worker (above)
#   GPU_WORKER_ARGS="--model NAME=module:Class[@CKPT] ..."   extra arguments for every server
#   GPU_WORKER_CONFIG=path.toml                                a config file for every server
#   PYTHON=.venv/bin/python  RUN_DIR=run  LOG_DIR=logs  HEALTH_TIMEOUT_S=300
#   OMP_NUM_THREADS (CPU servers: default cores / servers)
set -euo pipefail
cd "$(dirname "$0")"
supervise=0
for arg in "$@"; do
  case "$arg" in
    --supervise) supervise=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$arg' (known: --supervise)" >&2; exit 2 ;;
  esac
done
# shellcheck source=scripts/pids.sh
. scripts/pids.sh
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
BASE_PORT=${BASE_PORT:-8000}
HOST=${HOST:-127.0.0.1}
RUN_DIR=${RUN_DIR:-run}
LOG_DIR=${LOG_DIR:-logs}
HEALTH_TIMEOUT_S=${HEALTH_TIMEOUT_S:-300}
mkdir -p "$RUN_DIR" "$LOG_DIR"

if [ -n "${NUM_GPUS:-}" ]; then
  gpus=$NUM_GPUS
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L | grep -c '^GPU ' || true)
else
  gpus=0
fi
if [ "$gpus" -gt 0 ]; then count=$gpus; kind=GPU; else count=${NUM_CPU_SERVERS:-2}; kind=CPU; fi
case "$count" in ''|*[!0-9]*) echo "error: server count '$count' is not a number" >&2; exit 2;; esac
threads_env=()
if [ "$kind" = CPU ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
  # CPU servers share the cores: without a share each, their OpenMP pools spin against each other.
  share=$(( $(nproc) / count )); [ "$share" -ge 1 ] || share=1
  threads_env=(OMP_NUM_THREADS=$share)
fi


port_free() {
  "$PYTHON" - "$HOST" "$1" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError:
    sys.exit(1)
PY
}

extra=()
[ -n "${GPU_WORKER_CONFIG:-}" ] && extra+=(--config "$GPU_WORKER_CONFIG")
if [ -n "${GPU_WORKER_ARGS:-}" ]; then
  read -r -a words <<<"$GPU_WORKER_ARGS"  # split on spaces, no glob expansion
  extra+=("${words[@]}")
fi
if [ -n "${MODEL_SERVER_CMD:-}" ]; then
  if [ "${#extra[@]}" -gt 0 ]; then
    echo "error: GPU_WORKER_ARGS and GPU_WORKER_CONFIG are gpu_worker's; with MODEL_SERVER_CMD put options in the command" >&2
    exit 2
  fi
  case "$MODEL_SERVER_CMD" in
    *"{port}"*) ;;
    *) echo "error: MODEL_SERVER_CMD must contain {port}: each server needs its own port" >&2; exit 2 ;;
  esac
fi
run_dir_abs=$(cd "$RUN_DIR" && pwd)
probe_host=$HOST
case "$HOST" in 0.0.0.0|::|"") probe_host=127.0.0.1 ;; esac

ports=()
for ((i = 0; i < count; i++)); do
  port=$((BASE_PORT + i))
  pidfile="$RUN_DIR/pi0_gpu$i.pid"
  log="$LOG_DIR/pi0_gpu$i.log"
  ports+=("$port")
  tag="$run_dir_abs:$i"
  if [ -f "$pidfile" ] && is_ours "$(cat "$pidfile")" "$tag"; then
    echo "server $i already running (pid $(cat "$pidfile"), port $port)"
    continue
  fi
  if ! port_free "$port"; then
    echo "error: port $port is in use by another process; set BASE_PORT or stop it" >&2
    exit 1
  fi
  if [ "$kind" = GPU ]; then devices=$i; else devices=""; fi
  # PI0_MODEL_SERVER_TAG marks the process (and its children) as this script's server i: the stop script
  # checks it before signalling, so a PID reused by another process is never killed.
  launch=(env "${threads_env[@]}" CUDA_VISIBLE_DEVICES=$devices PYTHONUNBUFFERED=1 PI0_MODEL_SERVER_TAG="$tag")
  if [ "$supervise" = 1 ]; then
    launch+=("$PYTHON" -m gpu_worker.supervise --backoff-initial-s "${SUPERVISE_BACKOFF_INITIAL_S:-1}"
             --backoff-max-s "${SUPERVISE_BACKOFF_MAX_S:-30}" --max-restarts "${SUPERVISE_MAX_RESTARTS:-5}"
             --stable-s "${SUPERVISE_STABLE_S:-300}" --)
  fi
  if [ -n "${MODEL_SERVER_CMD:-}" ]; then
    cmd=${MODEL_SERVER_CMD//\{port\}/$port}
    cmd=${cmd//\{gpu\}/$devices}
    cmd=${cmd//\{host\}/$HOST}
    echo "starting $kind server $i on $HOST:$port: $cmd (log $log)"
    setsid nohup "${launch[@]}" bash -c "$cmd" >>"$log" 2>&1 </dev/null &
  else
    echo "starting $kind server $i on $HOST:$port (log $log)"
    setsid nohup "${launch[@]}" "$PYTHON" -m gpu_worker --host "$HOST" --port "$port" "${extra[@]}" >>"$log" 2>&1 </dev/null &
  fi
  echo $! >"$pidfile"
done

deadline=$((SECONDS + HEALTH_TIMEOUT_S))
for ((i = 0; i < count; i++)); do  # every server, also one found running but still loading
  port=$((BASE_PORT + i))
  pid=$(cat "$RUN_DIR/pi0_gpu$i.pid")
  until "$PYTHON" - "http://$probe_host:$port/healthz" >/dev/null 2>&1 <<'PY'
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError as exc:
    sys.exit(exc.code != 426)  # 426 Upgrade Required: a WebSocket-only server without /healthz, up
PY
  do
    if ! alive "$pid"; then
      echo "error: server $i (port $port) exited; last lines of $LOG_DIR/pi0_gpu$i.log:" >&2
      tail -n 20 "$LOG_DIR/pi0_gpu$i.log" >&2
      exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "error: server $i (port $port) not healthy after ${HEALTH_TIMEOUT_S}s; see $LOG_DIR/pi0_gpu$i.log" >&2
      exit 1
    fi
    sleep 0.2
  done
  echo "server $i healthy on port $port"
done
joined=$(IFS=,; echo "${ports[*]}")
echo "GPU_PORTS=$joined" >"$RUN_DIR/model_servers.env"
echo "all $count $kind model server(s) up: GPU_PORTS=$joined"
