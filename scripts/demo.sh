#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone: install, start CPU model servers
# hosting the shipped models, start the reward app (gunicorn), score a batch of CartPole rollout
# tasks through POST /score and print the scores; then stop everything it started.
#   bash scripts/demo.sh [extra example_client.py flags]
# Environment: NUM_CPU_SERVERS (2), BASE_PORT (8000), PORT (6006).
set -euo pipefail
cd "$(dirname "$0")/.."
SKIP_OPENPI_CLIENT=1 bash scripts/install.sh
mkdir -p logs
export NUM_CPU_SERVERS=${NUM_CPU_SERVERS:-2}
PORT=${PORT:-6006}

APP_PID=
OWN_SERVERS=1
if compgen -G "run/pi0_gpu*.pid" >/dev/null; then OWN_SERVERS=0; fi  # servers already running are not ours to stop
cleanup() {
  if [ -n "$APP_PID" ]; then kill -TERM "$APP_PID" 2>/dev/null || true; wait "$APP_PID" 2>/dev/null || true; fi
  if [ "$OWN_SERVERS" = 1 ]; then ./stop_pi0_models.sh >/dev/null || true; fi
}
trap cleanup EXIT

./start_pi0_models.sh
PORT=$PORT HOST=127.0.0.1 ./start_server.sh --production >logs/reward_app.log 2>&1 &
APP_PID=$!
for _ in $(seq 1 300); do
  if ! kill -0 "$APP_PID" 2>/dev/null; then echo "reward app exited; see logs/reward_app.log" >&2; cat logs/reward_app.log >&2; exit 1; fi
  if .venv/bin/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
      "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then break; fi
  sleep 0.2
done
echo "reward app ready on http://127.0.0.1:$PORT (log: logs/reward_app.log)"
.venv/bin/python example_client.py --url "http://127.0.0.1:$PORT" \
  --tasks cartpole cartpole_short gym:CartPole-v1 connect4_match dots_boxes_match --repeat 2 --per-request 5 --max-workers 2 "$@"
echo
echo "pool status:"
.venv/bin/python -c "import json, sys, urllib.request; s = json.load(urllib.request.urlopen(sys.argv[1])); \
print('\n'.join(f\"  {x['url']}  {x['state']}  requests {x['requests']}  errors {x['errors']}  p50 {x['latency_ms']['p50']} ms\" for x in s['servers']))" \
  "http://127.0.0.1:$PORT/pool_status"
