#!/usr/bin/env bash
# Create .venv (once), install mimkit with its test extras into it, then run the given command inside it.
#   bash scripts/bootstrap.sh mimkit demo
#   bash scripts/bootstrap.sh pytest -q
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $($PYTHON --version)" >&2
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import mimkit, torch, torchvision, timm, pytest" >/dev/null 2>&1; then
  echo "[bootstrap] installing PyTorch and mimkit into .venv (first run only; PyTorch is large)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # Any recent PyTorch works; pip picks the newest release this machine may install.
  .venv/bin/python -m pip install -q "torch>=2.4" "torchvision>=0.19"
  .venv/bin/python -m pip install -q -e ".[test]"
fi
export PATH="$PWD/.venv/bin:$PATH"
exec "$@"
