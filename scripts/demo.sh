#!/usr/bin/env bash
# Quick start, step 1: install, then segment the bundled sample hippocampus MRIs with the
# bundled model; writes label maps, volumes.csv (mL), PNG overlays and Dice against the
# manual labels shipped with the samples.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
OUT=${1:-out/hippocampus_demo}
.venv/bin/medseg predict -m hippocampus -i examples/hippocampus/images -o "$OUT" --overlay --overwrite
.venv/bin/medseg evaluate --pred "$OUT" --ref examples/hippocampus/labels --labels examples/hippocampus/dataset.json -o "$OUT/metrics.json"
