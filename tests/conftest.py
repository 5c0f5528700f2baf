"""Shared fixtures. Real data comes from ../shared/data (present on developer machines and in CI), or
from the folder in ``MEDSEG_SHARED_DATA``; without it, the few small real cases shipped in
``tests/fixtures`` (see their SOURCE.md) stand in, so a fresh clone runs the important real-data tests."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
BUNDLED_DATA = REPO / "tests" / "fixtures"  # small real cases shipped with the repository


@pytest.fixture(autouse=True, scope="session")
def _execution_cache(tmp_path_factory):
    """Execution choices (medseg.execution) cached in the session's temporary folder, not in ~/.cache."""
    import medseg.execution

    medseg.execution.CACHE_FILE = tmp_path_factory.mktemp("execution") / "execution.json"
    yield


@pytest.fixture(autouse=True)
def _no_execution_timing(request, monkeypatch):
    """Outside tests marked ``execution_timing``, the automatic choice does not time networks (seconds
    per new model in a suite that builds hundreds): a fixed preference instead, bf16 autocast contiguous
    as before the fast path. tests/test_execution.py tests the fast path itself."""
    if request.node.get_closest_marker("execution_timing"):
        return
    import medseg.execution

    order = {"contiguous": 1.0, "channels_last": 2.0}

    def fixed(ex, *args):  # pre-cast "cannot run" -> its autocast twin: the path before the fast path
        return float("inf") if ex.precast else order[ex.layout] + (ex.precision == "float32")

    monkeypatch.setattr(medseg.execution, "_time_or_inf", fixed)


def real_data(name: str) -> Path:
    """``SHARED_DATA/name`` when the shared data are there, else the copy of a few of its cases in
    ``tests/fixtures/name`` (if the repository ships one); tests then ``require`` the files they use."""
    shared, bundled = SHARED_DATA / name, BUNDLED_DATA / name
    return shared if shared.is_dir() or not bundled.is_dir() else bundled


HIPPO_SHARED = SHARED_DATA / "msd_hippocampus"  # all 208 development cases: for tests that need many
HIPPO = real_data("msd_hippocampus")  # at least HIPPO_CASES (tests/fixtures ships exactly these)

# A fixed handful of real hippocampus cases for end-to-end tests
HIPPO_CASES = [
    "hippocampus_001",
    "hippocampus_003",
    "hippocampus_004",
    "hippocampus_006",
    "hippocampus_007",
    "hippocampus_008",
    "hippocampus_011",
    "hippocampus_015",
    "hippocampus_017",
    "hippocampus_019",
]


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path} (see MEDSEG_SHARED_DATA in README.md)")
    return path


def copy_cases(source: Path, root: Path, cases) -> Path:
    """A copy of real single-channel cases of the dataset ``source`` in nnU-Net layout at ``root`` (the
    shared source is only read)."""
    require(source)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for c in cases:
        shutil.copyfile(source / "imagesTr" / f"{c}_0000.nii.gz", root / "imagesTr" / f"{c}_0000.nii.gz")
        shutil.copyfile(source / "labelsTr" / f"{c}.nii.gz", root / "labelsTr" / f"{c}.nii.gz")
    d = json.loads((source / "dataset.json").read_text())
    d["numTraining"] = len(cases)
    (root / "dataset.json").write_text(json.dumps(d, indent=2))
    return root


def copy_hippo_cases(root: Path, cases) -> Path:
    """A copy of real hippocampus cases in nnU-Net layout at ``root`` (the shared source is only read)."""
    return copy_cases(HIPPO, root, cases)


@pytest.fixture(scope="session")
def hippo_dataset(tmp_path_factory) -> Path:
    """A 10-case copy of the real MSD hippocampus dataset in nnU-Net layout (read-only source untouched)."""
    require(HIPPO)
    return copy_hippo_cases(tmp_path_factory.mktemp("hippo") / "Dataset004_Hippocampus", HIPPO_CASES)


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def rng():
    return np.random.default_rng(0)


class TrainingInterrupted(Exception):
    """Raised by :func:`crash_training_at` in place of a killed process."""


def crash_training_at(monkeypatch, epoch: int):
    """Make ``Trainer.train_epoch`` raise TrainingInterrupted at ``epoch``; returns a function that undoes it."""
    from medseg.training.trainer import Trainer

    original = Trainer.train_epoch

    def crashing(self, e, sampler):
        if e == epoch:
            raise TrainingInterrupted
        return original(self, e, sampler)

    monkeypatch.setattr(Trainer, "train_epoch", crashing)
    return lambda: monkeypatch.setattr(Trainer, "train_epoch", original)


@pytest.fixture
def isolated_registries():
    """Entries a test registers (models, tasks, losses, ...) are removed again afterwards, so that
    registry-driven tests elsewhere (``medseg models``, the model zoo) see only the real ones."""
    from medseg.augment.presets import AUGMENTATIONS
    from medseg.models import registry as models
    from medseg.preprocessing.normalization import NORMALIZATIONS
    from medseg.tasks import TASKS
    from medseg.training.losses import LOSSES
    from medseg.training.optim import OPTIMIZERS
    from medseg.training.schedules import SCHEDULES

    models.list_models()  # load the built-ins first (the lazy loaders run once)
    named = (AUGMENTATIONS, NORMALIZATIONS, TASKS, LOSSES, OPTIMIZERS, SCHEDULES)
    for registry in named:
        registry.names()
    registries = [r._entries for r in named]
    registries.append(models._REGISTRY)
    saved = [dict(r) for r in registries]
    yield
    for r, s in zip(registries, saved):
        r.clear()
        r.update(s)


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``medseg ARGS`` through the real entry point (its error handling included), in-process:
    (exit code, stdout, stderr)."""
    from medseg.cli import main

    monkeypatch.setattr(sys, "argv", ["medseg", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err
