#!/usr/bin/env bash
# The optional LeRobot policies: gpu_worker.models.lerobot:LeRobotPolicy hosts a LeRobot checkpoint
# directory (SmolVLA; PI0 / PI0.5 with LeRobot 0.5+ on Python 3.12). Run after scripts/install.sh.
#
# PyPI's lerobot for Python 3.11 tops out at 0.4.4, which pins torch<2.11; its code runs unchanged
# beside torch 2.13, so the extra installs lerobot's import-time needs (pinned by
# scripts/lerobot-constraints.txt) and then lerobot itself with --no-deps. Set TORCH_SPEC as for
# install.sh on a GPU box; LEROBOT_SPEC to install another lerobot (e.g. lerobot==0.5.1 on Python 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
constraints=(-c scripts/lerobot-constraints.txt)
if [ -n "${TORCH_SPEC:-}" ]; then constraints=(); fi  # a CUDA torch brings its own matching torchvision
.venv/bin/python -m pip install -q "${constraints[@]}" -e ".[${EXTRAS:-test},lerobot]"
.venv/bin/python -m pip install -q --no-deps "${LEROBOT_SPEC:-lerobot==0.4.4}"
.venv/bin/python - <<'PY'
from gpu_worker.models.lerobot import import_lerobot
lerobot = import_lerobot()
print(f"LeRobot backend ready: lerobot {lerobot.__version__}")
PY
