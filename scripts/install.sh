#!/usr/bin/env bash
# Create ./.venv (once) with CPU torch and medseg installed in editable mode. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import medseg, torch, pytest" >/dev/null 2>&1 || [ pyproject.toml -nt .venv/.medseg-installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # torch pinned first: an open range would pull a multi-GB CUDA build
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import medseg, torch, pytest"
  touch .venv/.medseg-installed
fi
