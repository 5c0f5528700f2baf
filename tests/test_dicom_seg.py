"""DICOM-SEG round trip on the real CT series: series in -> SEG out -> read back -> voxel-identical
to the NIfTI label map; segment numbers equal label values; geometry taken from the series."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, require

pytest.importorskip("highdicom")
import pydicom  # noqa: E402

from medseg.ct.class_maps import load_class_map  # noqa: E402
from medseg.io.dicom_seg import read_dicom_seg, series_files  # noqa: E402
from medseg.io.image import read_image  # noqa: E402

TS = SHARED_DATA / "totalsegmentator_examples"
SERIES = TS / "dicom" / "example_ct_dicom"
LABELS = TS / "ct_total" / "labelsTr" / "ts_ct_dicomseries.nii.gz"
CLI = [sys.executable, "-m", "medseg"]


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def seg_file(tmp_path_factory):
    require(SERIES)
    before = _digest(SERIES)
    out = tmp_path_factory.mktemp("seg") / "ct_seg.dcm"
    run = subprocess.run(
        CLI + ["dicom-seg", "-i", str(SERIES), "--seg", str(LABELS), "-o", str(out), "--class-map", "total"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert _digest(SERIES) == before  # the input series is never modified
    return out


def test_round_trip_is_voxel_identical(seg_file):
    back, labels = read_dicom_seg(seg_file, SERIES)
    ref = read_image(LABELS)[0]
    assert back.shape == ref.shape and np.array_equal(back, ref)
    assert len(np.unique(ref)) > 20  # a real multi-organ map, not a trivial one


def test_segments_are_named_and_numbered_by_label_value(seg_file):
    ds = pydicom.dcmread(seg_file)
    assert ds.Modality == "SEG" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    total = load_class_map("total")
    segs = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    assert segs == {v: n for n, v in total.items()}
    assert all(s.SegmentAlgorithmType == "AUTOMATIC" for s in ds.SegmentSequence)


def test_geometry_comes_from_the_series(seg_file):
    ds = pydicom.dcmread(seg_file)
    src = [pydicom.dcmread(f, stop_before_pixels=True) for f in series_files(SERIES)]
    assert ds.FrameOfReferenceUID == src[0].FrameOfReferenceUID and ds.StudyInstanceUID == src[0].StudyInstanceUID
    positions = {tuple(round(float(x), 3) for x in s.ImagePositionPatient) for s in src}
    for frame in ds.PerFrameFunctionalGroupsSequence:
        pos = tuple(round(float(x), 3) for x in frame.PlanePositionSequence[0].ImagePositionPatient)
        assert pos in positions
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert [float(x) for x in shared.PixelMeasuresSequence[0].PixelSpacing] == [float(x) for x in src[0].PixelSpacing]


def test_label_map_off_the_series_grid_is_a_one_line_error(tmp_path):
    require(SERIES)
    from medseg.io.image import write_image

    seg, meta = read_image(LABELS)
    write_image(
        seg[:, ::2, ::2].copy(),
        meta.__class__(meta.spacing, meta.origin, meta.direction, (20, 256, 256)),
        tmp_path / "small.nii.gz",
    )
    out = tmp_path / "x.dcm"
    run = subprocess.run(
        CLI
        + [
            "dicom-seg",
            "-i",
            str(SERIES),
            "--seg",
            str(tmp_path / "small.nii.gz"),
            "-o",
            str(out),
            "--class-map",
            "total",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0 and "Traceback" not in run.stderr and "small.nii.gz" in run.stderr
    assert run.stderr.strip().count("\n") == 0 and not out.exists()


def test_series_without_type2_patient_attributes(tmp_path):
    """TCIA's anonymised series have no PatientBirthDate (type 2: may be absent in practice, must be
    present in a SEG): the SEG gets it empty; the source files are not touched."""
    from medseg.io.dicom_seg import write_dicom_seg

    series = require(SHARED_DATA / "tcia_pgbm_hippocrop_dicom" / "Study1_13_HCropVolume")
    files = [Path(f) for f in series_files(series)]
    assert "PatientBirthDate" not in pydicom.dcmread(files[0], stop_before_pixels=True)
    before = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    arr, _ = read_image(series)
    seg = np.zeros(arr.shape, np.uint8)
    seg[5:10, 20:30, 20:30] = 1
    out = write_dicom_seg(series, seg, {"background": 0, "hippocampus": 1}, tmp_path / "seg.dcm")
    back, names = read_dicom_seg(out, series)
    assert np.array_equal(back, seg) and names == {"hippocampus": 1}
    assert pydicom.dcmread(out).PatientBirthDate == ""
    assert hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest() == before
