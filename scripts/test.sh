#!/usr/bin/env bash
# The test command: set up (idempotent), make sure PostgreSQL and Redis run, then pytest everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
. .venv/bin/activate
ruff check .
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
