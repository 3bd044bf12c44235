#!/usr/bin/env bash
# Create .venv with everything the project and its tests need (CPU torch unless TORCH_SPEC says otherwise),
# and .venv-openpi with the unmodified openpi-client (it pins numpy<2) for the compatibility test.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[${EXTRAS:-test}]"

if [ "${SKIP_OPENPI_CLIENT:-0}" != "1" ]; then
  if [ ! -x .venv-openpi/bin/python ]; then
    "$PYTHON" -m venv .venv-openpi
  fi
  .venv-openpi/bin/python -m pip install -q "openpi-client==0.1.2" typing_extensions
fi
echo "installed: $(.venv/bin/python -c 'import torch, numpy; print("torch", torch.__version__, "numpy", numpy.__version__)')"
