"""DICOM series that would become silently distorted volumes are refused with one line naming the
folder: a missing slice, uneven spacing, gantry tilt, duplicate positions, several series in one zip.
Built from copies of the real 20-slice CT series (the shared data is only read)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, require

from medseg.errors import ImageReadError
from medseg.io.image import read_image

pydicom = pytest.importorskip("pydicom")
SERIES = SHARED_DATA / "totalsegmentator_examples" / "dicom" / "example_ct_dicom"


def _copy(tmp_path: Path, name: str = "series") -> tuple[Path, list[Path]]:
    require(SERIES)
    dst = tmp_path / name
    shutil.copytree(SERIES, dst)
    files = sorted(
        dst.iterdir(), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
    )
    return dst, files


def _edit(f: Path, **changes) -> None:
    ds = pydicom.dcmread(f)
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(f)


def test_the_real_series_reads(tmp_path):
    arr, meta = read_image(_copy(tmp_path)[0])
    assert arr.shape == (20, 512, 512) and meta.spacing[0] == pytest.approx(2.0)


def test_missing_slice(tmp_path):
    folder, files = _copy(tmp_path)
    files[7].unlink()
    with pytest.raises(ImageReadError, match=r"1 slice\(s\) missing") as err:
        read_image(folder)
    assert err.value.path == str(folder)


def test_inconsistent_spacing(tmp_path):
    folder, files = _copy(tmp_path)
    for f in files[10:]:
        ds = pydicom.dcmread(f)
        _edit(f, ImagePositionPatient=[*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 0.7])
    with pytest.raises(ImageReadError, match="inconsistent slice spacing"):
        read_image(folder)


def test_gantry_tilt(tmp_path):
    folder, files = _copy(tmp_path)
    for i, f in enumerate(files):  # shift each slice along y: sheared stack, orientation unchanged
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        _edit(f, ImagePositionPatient=[x, y + i * 2.0 * np.tan(np.radians(15)), z])
    with pytest.raises(ImageReadError, match=r"gantry tilt of 15\.0 degrees"):
        read_image(folder)


def test_duplicate_positions(tmp_path):
    folder, files = _copy(tmp_path)
    ds = pydicom.dcmread(files[4])
    _edit(files[5], ImagePositionPatient=list(ds.ImagePositionPatient))
    with pytest.raises(ImageReadError, match="share one position"):
        read_image(folder)


def test_zip_of_one_series_reads_like_the_folder(tmp_path):
    folder, _ = _copy(tmp_path)
    z = tmp_path / "ct.zip"
    with zipfile.ZipFile(z, "w") as archive:
        for f in folder.iterdir():
            archive.write(f, f"patient/ct/{f.name}")
    a, ma = read_image(z)
    b, mb = read_image(folder)
    assert np.array_equal(a, b) and ma == mb


def test_zip_with_two_series_is_refused_in_one_line(tmp_path):
    folder, files = _copy(tmp_path)
    other, other_files = _copy(tmp_path, "other")
    uid = pydicom.uid.generate_uid()
    for f in other_files:
        _edit(f, SeriesInstanceUID=uid)
    z = tmp_path / "two.zip"
    with zipfile.ZipFile(z, "w") as archive:
        for d in (folder, other):
            for f in d.iterdir():
                archive.write(f, f"{d.name}/{f.name}")
    run = subprocess.run(
        [sys.executable, "-m", "medseg", "predict", "-m", "hippocampus", "-i", str(z), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "two.zip" in run.stderr and "2 DICOM series" in run.stderr and run.stderr.strip().count("\n") == 0


def test_zip_slip_is_refused(tmp_path):
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as archive:
        archive.writestr("../../escaped.dcm", b"x")
    with pytest.raises(ImageReadError, match="outside the archive"):
        read_image(z)
    assert not (tmp_path.parent / "escaped.dcm").exists()
