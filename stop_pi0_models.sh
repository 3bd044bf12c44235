#!/usr/bin/env bash
# Stop exactly the model servers start_pi0_models.sh started (its PID files): SIGTERM to each
# server's process group (a MODEL_SERVER_CMD's children too), then SIGKILL for any still alive after
# STOP_GRACE_S seconds (default 30). A PID file whose process is gone, or is no longer the server
# that was started (the PID was reused), is removed without killing anything.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/pids.sh
. scripts/pids.sh
RUN_DIR=${RUN_DIR:-run}
STOP_GRACE_S=${STOP_GRACE_S:-30}



pids=()
shopt -s nullglob
run_dir_abs=$(cd "$RUN_DIR" 2>/dev/null && pwd || echo "$RUN_DIR")
for pidfile in "$RUN_DIR"/pi0_gpu*.pid; do
  pid=$(cat "$pidfile")
  name=$(basename "$pidfile" .pid)
  if is_ours "$pid" "$run_dir_abs:${name#pi0_gpu}"; then
    echo "stopping $name (pid $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    pids+=("$pid")
  else
    echo "$name: no model server of ours with pid $pid; removing stale PID file"
    rm -f "$pidfile"
  fi
done

deadline=$((SECONDS + STOP_GRACE_S))
for pid in "${pids[@]}"; do
  while { alive "$pid" || group_alive "$pid"; } && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
  if alive "$pid" || group_alive "$pid"; then
    echo "pid $pid (or its process group) still alive after ${STOP_GRACE_S}s: SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
done
for pidfile in "$RUN_DIR"/pi0_gpu*.pid; do rm -f "$pidfile"; done
rm -f "$RUN_DIR/model_servers.env"
echo "stopped ${#pids[@]} model server(s)"
