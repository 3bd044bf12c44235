#!/usr/bin/env bash
# BitBully, the perfect Connect Four solver that the self-play strength tests and
# bench/bench_selfplay_strength.py check positions against. AGPL-3.0 (its opening
# books, bitbully-databases: MIT): a test and benchmark tool only, installed beside
# the project, never imported by it. The pinned version is written once, in
# pyproject.toml's "selfplay-reference" extra; only that extra's packages are
# installed here (the project's own dependencies are left as they are).
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t requirements < <(.venv/bin/python -c "
import tomllib
print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['selfplay-reference']))")
.venv/bin/python -m pip install -q "${requirements[@]}"
.venv/bin/python -c "import bitbully; print('Connect Four reference solver ready: bitbully', bitbully.__version__)"
