#!/usr/bin/env bash
# Check dependencies, GPUs, ports and model servers; print what is wrong and how to fix it.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
RUN_DIR=${RUN_DIR:-run}
if [ -z "${GPU_PORTS:-}${MODEL_SERVERS:-}" ] && [ -f "$RUN_DIR/model_servers.env" ]; then
  # shellcheck disable=SC1091
  . "$RUN_DIR/model_servers.env" && export GPU_PORTS
fi
if ! "$PYTHON" -c "import pi0_reward_server" 2>/dev/null; then
  echo "FAIL  the project is not installed for $PYTHON"
  echo "      fix: bash scripts/install.sh"
  exit 1
fi
exec "$PYTHON" -m pi0_reward_server.check "$@"
