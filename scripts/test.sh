#!/usr/bin/env bash
# The whole test suite, from scratch: install, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/install_libero.sh  # the LIBERO backend's tests run too
bash scripts/install_lerobot.sh  # and the LeRobot policies' (a tiny SmolVLA built offline)
bash scripts/install_trl.sh     # TRL: a real GRPOTrainer run scores with the TRL adapter
bash scripts/install_browser.sh # Debian's chromium and Playwright: the dashboard in a real browser
bash scripts/install_redis.sh    # Debian's redis-server: the Redis job store's tests start their own
bash scripts/install_ray.sh      # Ray: the scale-out tests start local Ray clusters of their own
# BitBully: exact Connect Four values for the self-play strength tests. Optional: the tests that need it skip
# without it, so a failed install (no network, no wheel for this platform) must not stop the suite.
bash scripts/install_selfplay_reference.sh || echo "scripts/install_selfplay_reference.sh failed:" \
    "the self-play tests that need BitBully will be skipped" >&2
export OPENPI_CLIENT_PYTHON=${OPENPI_CLIENT_PYTHON:-$PWD/.venv-openpi/bin/python}
exec .venv/bin/python -m pytest -ra "$@"
