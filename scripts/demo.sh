#!/usr/bin/env bash
# Set up and run the main job on the embedded default: a CPU model server hosting the
# shipped models, and a seeded CartPole evaluation of the served policy that prints its score.
#   bash scripts/demo.sh [extra gym_eval flags, e.g. --episodes 50]
set -euo pipefail
cd "$(dirname "$0")/.."
SKIP_OPENPI_CLIENT=1 bash scripts/install.sh
mkdir -p logs
PORT=${PORT:-0}
LOG=logs/demo_gpu_worker.log
.venv/bin/python -m gpu_worker --port "$PORT" >"$LOG" 2>&1 &
SERVER_PID=$!
trap 'kill -TERM $SERVER_PID 2>/dev/null; wait $SERVER_PID 2>/dev/null || true' EXIT

for _ in $(seq 1 600); do
  if ! kill -0 $SERVER_PID 2>/dev/null; then echo "model server exited; see $LOG" >&2; cat "$LOG" >&2; exit 1; fi
  PORT=$(sed -n 's/.*listening on ws:\/\/[^:]*:\([0-9]*\).*/\1/p' "$LOG" | head -n1)
  if [ -n "$PORT" ] && .venv/bin/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
      "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1; then break; fi
  sleep 0.1
done
echo "model server ready on ws://127.0.0.1:$PORT (log: $LOG)"
.venv/bin/python -m gpu_worker.gym_eval --url "ws://127.0.0.1:$PORT" --episodes 20 "$@"
