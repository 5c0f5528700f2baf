#!/usr/bin/env bash
# Quick start, step 2: install, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -q -rs -p no:cacheprovider "$@"  # -rs: say why a test skipped
