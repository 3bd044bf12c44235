#!/usr/bin/env bash
# The ray extra: Ray from PyPI (pinned; ~80 MB wheel, no dashboard), for scale-out and its tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if .venv/bin/python -c "import ray, sys; sys.exit(ray.__version__ != '2.60.0')" 2>/dev/null; then
    exit 0
fi
.venv/bin/pip install --quiet 'ray==2.60.0'
