"""The dataset checks every command runs (medseg.io.verify.check_dataset): what verify reports,
plan/preprocess/train refuse; cases that passed are recorded and not read again until they change."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import copy_hippo_cases

from medseg.errors import DatasetError
from medseg.io import verify
from medseg.io.image import ImageMeta, read_image, write_image
from medseg.io.verify import check_dataset, geometry_problem

CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004"]


@pytest.fixture
def counted_checks(monkeypatch):
    """The names of the cases ``_check_case`` reads (in this process: ``workers=1``)."""
    calls: list[str] = []
    original = verify._check_case
    monkeypatch.setattr(verify, "_check_case", lambda case, info: calls.append(case.name) or original(case, info))
    return calls


@pytest.mark.realdata
def test_checked_cases_are_recorded_and_only_changed_files_read_again(tmp_path, counted_checks):
    ds = copy_hippo_cases(tmp_path / "ds", CASES)
    record = tmp_path / "ws" / "checked_cases.json"
    assert check_dataset(ds, record=record, workers=1) == 3
    assert counted_checks == CASES
    saved = json.loads(record.read_text())
    assert sorted(saved["cases"]) == CASES and saved["checks"] == verify.CHECKS_VERSION

    counted_checks.clear()
    check_dataset(ds, record=record, workers=1)
    assert counted_checks == [], "unchanged cases were read again"

    label = ds / "labelsTr" / f"{CASES[1]}.nii.gz"
    arr, meta = read_image(label)
    arr = arr.astype(np.float32)
    arr[arr.shape[0] // 2, 0, 0] = 0.5  # a fractional value: cast to uint8 it would silently become 0
    write_image(arr, meta, label)
    with pytest.raises(DatasetError) as exc:
        check_dataset(ds, record=record, workers=1)
    assert counted_checks == [CASES[1]], "only the changed case is read again"
    assert exc.value.path == str(label)
    assert exc.value.reason.startswith("label values [0.5] not in dataset.json labels [0, 1, 2]")
    assert json.loads(record.read_text()) == saved, "a refused dataset must not change the record"

    counted_checks.clear()
    (ds / "dataset.json").write_text((ds / "dataset.json").read_text() + "\n")  # dataset.json changed
    with pytest.raises(DatasetError):
        check_dataset(ds, record=record, workers=1)
    assert counted_checks == CASES[:2]  # all read again, in order, up to the first problem


def test_geometry_problem_names_origin_and_direction():
    ref = ImageMeta((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), shape=(8, 8, 8))
    assert geometry_problem(ref, ref, "a.nii.gz") is None
    shifted = ImageMeta((1.0, 1.0, 1.0), (5.0, 0.0, 0.0), shape=(8, 8, 8))
    assert (
        geometry_problem(shifted, ref, "a.nii.gz")
        == "origin (5.0, 0.0, 0.0) mm differs from a.nii.gz (0.0, 0.0, 0.0) mm"
    )
    flipped = ImageMeta((1.0, 1.0, 1.0), direction=(-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), shape=(8, 8, 8))
    assert "orientation (direction (-1.0," in geometry_problem(flipped, ref, "a.nii.gz")
    assert geometry_problem(ImageMeta((2.0, 1.0, 1.0), shape=(8, 8, 8)), ref, "a").startswith("spacing")
