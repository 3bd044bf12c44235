#!/usr/bin/env bash
# BitBully, the perfect Connect Four solver that the self-play strength tests and
# bench/bench_selfplay_strength.py check positions against (the pyproject extra
# "selfplay-reference"). AGPL-3.0 (its opening books, bitbully-databases: MIT): a
# test and benchmark tool only, installed beside the project, never imported by it.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pip install -q "bitbully==0.0.79"
.venv/bin/python -c "import bitbully; print('Connect Four reference solver ready: bitbully', bitbully.__version__)"
