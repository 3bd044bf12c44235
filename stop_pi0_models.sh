#!/usr/bin/env bash
# Stop exactly the model servers start_pi0_models.sh started (its PID files): SIGTERM, then
# SIGKILL for any still alive after STOP_GRACE_S seconds (default 30). A PID file whose process
# is gone, or is no longer a gpu_worker (the PID was reused), is removed without killing anything.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/pids.sh
. scripts/pids.sh
RUN_DIR=${RUN_DIR:-run}
STOP_GRACE_S=${STOP_GRACE_S:-30}



pids=()
shopt -s nullglob
for pidfile in "$RUN_DIR"/pi0_gpu*.pid; do
  pid=$(cat "$pidfile")
  if is_ours "$pid"; then
    echo "stopping $(basename "$pidfile" .pid) (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    pids+=("$pid")
  else
    echo "$(basename "$pidfile" .pid): no gpu_worker with pid $pid; removing stale PID file"
    rm -f "$pidfile"
  fi
done

deadline=$((SECONDS + STOP_GRACE_S))
for pid in "${pids[@]}"; do
  while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
  if alive "$pid"; then
    echo "pid $pid still alive after ${STOP_GRACE_S}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
done
for pidfile in "$RUN_DIR"/pi0_gpu*.pid; do rm -f "$pidfile"; done
rm -f "$RUN_DIR/model_servers.env"
echo "stopped ${#pids[@]} model server(s)"
