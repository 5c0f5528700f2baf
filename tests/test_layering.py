"""Layering: inference and checkpoint I/O never import training code (nnU-Net's inference imports
its trainer; a shipped model must run without the training stack). Checked in a fresh interpreter,
since other tests have long since imported everything into this one."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import importlib, json, pkgutil, sys
import medseg.inference
mods = ["medseg.io.checkpoint"] + [f"medseg.inference.{m.name}" for m in pkgutil.iter_modules(medseg.inference.__path__)]
for name in mods:
    importlib.import_module(name)
from medseg.inference.predictor import Predictor
Predictor.from_folder("hippocampus", device="cpu")  # construction too: lazy imports count
print(json.dumps({"imported": mods, "training": sorted(m for m in sys.modules if m.startswith("medseg.training"))}))
"""


def test_inference_and_checkpoint_io_never_import_training():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "medseg.inference.predictor" in result["imported"]
    assert result["training"] == [], f"inference imported training modules: {result['training']}"
