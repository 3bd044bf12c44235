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

shopt -s nullglob
run_dir_abs=$(cd "$RUN_DIR" 2>/dev/null && pwd || echo "$RUN_DIR")
groups=()
tags=()
for pidfile in "$RUN_DIR"/pi0_gpu*.pid; do
  pid=$(cat "$pidfile")
  name=$(basename "$pidfile" .pid)
  tag="$run_dir_abs:${name#pi0_gpu}"
  case "$pid" in ''|*[!0-9]*) echo "$name: PID file holds no PID; removing it"; rm -f "$pidfile"; continue ;; esac
  if is_ours "$pid" "$tag" || group_ours "$pid" "$tag"; then
    # Its process group: a wrapper's children too, and children whose leader already died.
    echo "stopping $name (pid $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    groups+=("$pid")
    tags+=("$tag")
  else
    echo "$name: no model server of ours with pid $pid; removing stale PID file"
    rm -f "$pidfile"
  fi
done

deadline=$((SECONDS + STOP_GRACE_S))
for k in "${!groups[@]}"; do
  pid=${groups[$k]} tag=${tags[$k]}
  while { is_ours "$pid" "$tag" || group_ours "$pid" "$tag"; } && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
  if group_ours "$pid" "$tag"; then  # checked again: never SIGKILL a group that is no longer ours
    echo "pid $pid (or its process group) still alive after ${STOP_GRACE_S}s: SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || true
  elif is_ours "$pid" "$tag"; then
    echo "pid $pid still alive after ${STOP_GRACE_S}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
done
for pidfile in "$RUN_DIR"/pi0_gpu*.pid; do rm -f "$pidfile"; done
rm -f "$RUN_DIR/model_servers.env"
echo "stopped ${#groups[@]} model server(s)"
