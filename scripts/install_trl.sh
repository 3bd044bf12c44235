#!/usr/bin/env bash
# TRL, for tests/test_trainer_adapters.py's GRPOTrainer run (the adapters need no trainer package).
# Run after scripts/install_lerobot.sh: its constraints keep the transformers both use.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pip install -q -c scripts/lerobot-constraints.txt -e ".[${EXTRAS:-test},trl]"
.venv/bin/python -c "import trl; print(f'TRL ready: trl {trl.__version__}')"
