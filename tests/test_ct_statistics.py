"""CT statistics: TotalSegmentator's statistics.json reproduced exactly (checked against references
written by TotalSegmentator's own code), medseg's richer per-structure table, class maps, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, require

from medseg.ct.class_maps import builtin_class_maps, load_class_map
from medseg.ct.statistics import structure_statistics, totalsegmentator_statistics
from medseg.errors import DatasetError

REF = Path(__file__).parent / "fixtures" / "totalsegmentator_statistics"
CT_TOTAL = SHARED_DATA / "totalsegmentator_examples" / "ct_total"
CLI = [sys.executable, "-m", "medseg"]


def test_builtin_class_maps_have_totalsegmentators_sizes():
    assert {"total", "total_v1", "total_mr"} <= set(builtin_class_maps())
    total, v1 = load_class_map("total"), load_class_map("total_v1")
    assert len(total) == 117 and len(v1) == 104 and len(load_class_map("total_mr")) == 50
    assert total["spleen"] == 1 and total["liver"] == 5 and list(total.values()) == sorted(total.values())
    assert v1["spleen"] == 1 and "costal_cartilages" in total and "costal_cartilages" not in v1


def test_class_map_from_dataset_json_and_either_direction(tmp_path):
    assert load_class_map({"labels": {"background": 0, "a": 2, "b": 1}}) == {"b": 1, "a": 2}
    assert load_class_map({"1": "liver", "2": "spleen"}) == {"liver": 1, "spleen": 2}
    bad = tmp_path / "map.json"
    bad.write_text('{"liver": 1, "spleen": 1}')
    with pytest.raises(DatasetError, match="same value"):
        load_class_map(bad)
    with pytest.raises(DatasetError, match="class map not found"):
        load_class_map(tmp_path / "missing.json")


@pytest.mark.parametrize("ref", sorted(p.name for p in REF.glob("*.json")))
def test_totalsegmentator_format_is_byte_identical_to_totalsegmentators_code(ref, tmp_path):
    case, metric, border = ref[: -len(".json")].split("__")
    image, seg = CT_TOTAL / "imagesTr" / f"{case}_0000.nii.gz", CT_TOTAL / "labelsTr" / f"{case}.nii.gz"
    require(image)
    out = tmp_path / "statistics.json"
    cmd = (
        CLI
        + [
            "ct-stats",
            "-i",
            str(image),
            "--seg",
            str(seg),
            "-o",
            str(out),
            "--class-map",
            "total",
            "--format",
            "totalsegmentator",
            "--metric",
            metric,
        ]
        + (["--include-incomplete"] if border == "include_border" else [])
    )
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.read_text() == (REF / ref).read_text()
    present = sum(v["volume"] > 0 for v in json.loads(out.read_text()).values())
    # the 20-slice DICOM case: every structure is within 3 slices of a face, so all are excluded
    assert present == 0 if (case, border) == ("ts_ct_dicomseries", "exclude_border") else present > 10


def test_medseg_statistics_on_real_ct(tmp_path):
    from medseg.io.image import read_image

    image, seg = (
        CT_TOTAL / "imagesTr" / "ts_ct_dicomseries_0000.nii.gz",
        CT_TOTAL / "labelsTr" / "ts_ct_dicomseries.nii.gz",
    )
    require(image)
    ct, meta = read_image(image)
    lab = read_image(seg)[0].astype(np.int64)
    stats = structure_statistics(ct, lab, meta.spacing, load_class_map("total"), erode_mm=2.0)
    liver = stats["liver"]
    mask = lab == 5
    assert liver["voxels"] == int(mask.sum()) > 1000
    assert liver["volume_ml"] == pytest.approx(mask.sum() * np.prod(meta.spacing) / 1000)
    assert liver["hu_mean"] == pytest.approx(ct[mask].mean())
    assert liver["hu_p5"] <= liver["hu_median"] <= liver["hu_p95"]
    assert 40 < liver["hu_eroded_mean"] < 150  # soft tissue; erosion drops partial-volume surface voxels
    assert 0 < liver["voxels_eroded"] < liver["voxels"]
    assert stats["brain"]["voxels"] == 0 and stats["brain"]["hu_mean"] is None


def test_erosion_by_radius_in_mm_on_an_anisotropic_ball():
    spacing = (2.0, 0.5, 0.5)
    zz, yy, xx = np.meshgrid(*[(np.arange(n) - n // 2) * s for n, s in zip((40, 160, 160), spacing)], indexing="ij")
    r = np.sqrt(zz**2 + yy**2 + xx**2)
    seg = (r <= 30).astype(np.uint8)
    ct = np.where(r <= 27, 50.0, 0.0) + np.where((r > 27) & (r <= 30), -100.0, 0.0)  # a "partial-volume rim"
    s = structure_statistics(ct, seg, spacing, {"ball": 1}, erode_mm=3.0)["ball"]
    assert s["volume_ml"] == pytest.approx(4 / 3 * np.pi * 30**3 / 1000, rel=0.02)
    assert s["voxels_eroded"] * np.prod(spacing) == pytest.approx(4 / 3 * np.pi * 27**3, rel=0.05)
    assert s["hu_mean"] < 20 and s["hu_eroded_mean"] > 45  # z erodes by 1 voxel (2 mm), in-plane by 6 (3 mm)


def test_border_rule_matches_totalsegmentator_definition():
    seg = np.zeros((20, 20, 20), np.uint8)
    seg[3:6, 5:8, 5:8] = 1  # 3 voxels from the face: complete
    seg[10:12, 10:12, 17:19] = 2  # within the last 3 voxels: incomplete
    ct = np.full(seg.shape, 7.6)
    out = totalsegmentator_statistics(ct, seg, (1.0, 1.0, 1.0), {"a": 1, "b": 2, "c": 3})
    assert out == {
        "a": {"volume": 27.0, "intensity": 7.0},
        "b": {"volume": 0.0, "intensity": 0.0},
        "c": {"volume": 0.0, "intensity": 0.0},
    }  # int16 truncation of 7.6, as TotalSegmentator


def test_mismatched_label_map_is_a_one_line_error(tmp_path):
    from medseg.io.image import ImageMeta, write_image

    meta = ImageMeta((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (8, 8, 8))
    write_image(np.zeros((8, 8, 8), np.int16), meta, tmp_path / "ct.nii.gz")
    write_image(
        np.zeros((8, 8, 9), np.uint8),
        ImageMeta((1.0,) * 3, (0.0,) * 3, meta.direction, (8, 8, 9)),
        tmp_path / "seg.nii.gz",
    )
    run = subprocess.run(
        CLI
        + [
            "ct-stats",
            "--class-map",
            "total",
            "-i",
            str(tmp_path / "ct.nii.gz"),
            "--seg",
            str(tmp_path / "seg.nii.gz"),
            "-o",
            str(tmp_path / "out" / "s.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0 and "seg.nii.gz" in run.stderr and "shape" in run.stderr
    assert not (tmp_path / "out" / "s.json").exists()
