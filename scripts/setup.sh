#!/usr/bin/env bash
# Installs everything modelpress needs on a fresh Debian machine of this project's kind: system data
# packages, a virtual environment in .venv with the CPU build of torch, and the project with [dev].
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the Fashion-MNIST data set, and Chromium for the dashboard's browser test
# (Playwright drives Debian's Chromium; its own browser download cannot work offline).
if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -x /usr/bin/chromium ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist chromium) >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU wheel first and pinned: a looser pin would pull a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev]'
python - <<'PY'
import sys
import torch
assert torch.__version__.startswith("2.13.0"), f"unexpected torch {torch.__version__}"
print(f"modelpress environment ready: python {sys.version.split()[0]}, torch {torch.__version__}")
PY
