#!/usr/bin/env bash
# Start the reward app on HOST:PORT (default 0.0.0.0:6006).
#   start_server.sh [--production | --dev] [--no-check]
#   --production  gunicorn, gthread workers, preload_app = False, long timeout (default)
#   --dev         Flask's development server
#   --no-check    start even when no model server answers /healthz
# Model servers: MODEL_SERVERS or GPU_PORTS, else those start_pi0_models.sh recorded in run/.
# REWARD_SERVER_TOKEN=... requires 'Authorization: Bearer <token>' on /score and /pool_status.
set -euo pipefail
cd "$(dirname "$0")"
mode=production
check=1
for arg in "$@"; do
  case "$arg" in
    --production) mode=production ;;
    --dev) mode=dev ;;
    --no-check) check=0 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "error: unknown option '$arg' (expected --production, --dev, --no-check)" >&2; exit 2 ;;
  esac
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
HOST=${HOST:-0.0.0.0}
PORT=${PORT:-6006}
RUN_DIR=${RUN_DIR:-run}
if [ -z "${GPU_PORTS:-}${MODEL_SERVERS:-}" ] && [ -f "$RUN_DIR/model_servers.env" ]; then
  # shellcheck disable=SC1091
  . "$RUN_DIR/model_servers.env"
  export GPU_PORTS
fi
if [ "$check" = 1 ] && [ "${ALLOW_NO_MODEL_SERVERS:-0}" != 1 ]; then
  if ! "$PYTHON" -m pi0_reward_server.check --servers-only; then
    echo "error: no model server is healthy (${MODEL_SERVERS:-${GPU_PORTS:-ws://127.0.0.1:8000}})." >&2
    echo "       start them with ./start_pi0_models.sh, point MODEL_SERVERS/GPU_PORTS at them, or pass --no-check" >&2
    exit 1
  fi
fi
echo "reward app ($mode) on http://$HOST:$PORT  model servers: ${MODEL_SERVERS:-${GPU_PORTS:-ws://127.0.0.1:8000}}"
if [ "$mode" = dev ]; then
  exec "$PYTHON" -m flask --app 'pi0_reward_server.app:create_app()' run --host "$HOST" --port "$PORT" --no-reload
fi
export GUNICORN_BIND=${GUNICORN_BIND:-$HOST:$PORT}
exec "$PYTHON" -m gunicorn -c pi0_reward_server/gunicorn_config.py 'pi0_reward_server.app:create_app()'
