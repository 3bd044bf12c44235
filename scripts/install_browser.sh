#!/usr/bin/env bash
# A real browser for the dashboard's test: Debian's chromium (browser downloads are not used) and
# Playwright from PyPI, which drives it through its executable_path. Run after scripts/install.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=(); else SUDO=(sudo); fi
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq chromium >/dev/null
fi
.venv/bin/python -m pip install -q -c scripts/lerobot-constraints.txt -e ".[${EXTRAS:-test},browser]"
echo "browser ready: $(chromium --version 2>/dev/null | head -1), playwright $(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("playwright"))')"
