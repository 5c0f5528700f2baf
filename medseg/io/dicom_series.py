"""DICOM series checks before a series becomes a volume, and zipped series.

SimpleITK/GDCM stack a series' slices at the spacing of the first two and never complain, so a
series with a missing slice, uneven slice spacing or a tilted gantry becomes a silently distorted
volume (organ volumes wrong by the missing fraction). :func:`check_series` reads only the headers
(``ImagePositionPatient``/``ImageOrientationPatient``) and refuses such series with a one-line
reason naming the folder. :func:`unpack_zip` extracts a zip of one series safely.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from medseg.errors import ImageReadError

SPACING_TOLERANCE = 0.1  # relative deviation of a slice gap from the median gap
TILT_TOLERANCE_DEG = 0.5


def _header(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    try:
        pos = np.array([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
        ori = np.array([float(v) for v in reader.GetMetaData("0020|0037").split("\\")])
    except (RuntimeError, ValueError):
        return None
    return pos, ori


def series_problem(files: list[str]) -> str | None:
    """Why this sorted list of slice files is not a regular volume, or None if it is."""
    headers = [_header(f) for f in files]
    if len(files) < 2 or any(h is None for h in headers):
        return None  # single-frame or multi-frame objects: nothing to compare
    positions = np.stack([h[0] for h in headers])
    orientations = np.stack([h[1] for h in headers])
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        return "slices have different orientations (ImageOrientationPatient); not one volume"
    row, col = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row, col)
    along = positions @ normal
    order = np.argsort(along)
    gaps = np.diff(along[order])
    if np.any(gaps < 1e-3):
        return "two or more slices share one position (duplicate slices or several acquisitions in one series)"
    median = float(np.median(gaps))
    steps = np.diff(positions[order], axis=0)
    cosines = np.abs(steps @ normal) / np.linalg.norm(steps, axis=1)
    tilt = float(np.degrees(np.arccos(np.clip(cosines.min(), -1, 1))))
    if tilt > TILT_TOLERANCE_DEG:
        return f"gantry tilt of {tilt:.1f} degrees (slices are sheared); resample the series to an untilted grid first"
    irregular = np.abs(gaps - median) > SPACING_TOLERANCE * median
    if irregular.any():
        i = int(np.argmax(np.abs(gaps - median)))
        lo, hi = along[order][i], along[order][i + 1]
        missing = round(gaps[i] / median) - 1
        if missing >= 1 and abs(gaps[i] - (missing + 1) * median) < SPACING_TOLERANCE * median:
            return (
                f"{missing} slice(s) missing between positions {lo:.2f} and {hi:.2f} mm (slice spacing {median:.3g} mm)"
            )
        return f"inconsistent slice spacing ({gaps.min():.3g} to {gaps.max():.3g} mm between slices)"
    return None


def check_series(folder: Path, files: list[str]) -> None:
    problem = series_problem(files)
    if problem:
        raise ImageReadError(folder, problem)


def unpack_zip(path: Path) -> Path:
    """Extract a zip (of one DICOM series, or one image file) into a private temporary folder.

    Members with absolute paths or ``..`` are refused, never written outside the folder.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ImageReadError(path, f"not a readable zip file ({exc})") from None
    target = Path(tempfile.mkdtemp(prefix="medseg_zip_"))
    try:
        with archive:
            for info in archive.infolist():
                name = Path(info.filename)
                if name.is_absolute() or ".." in name.parts:
                    raise ImageReadError(path, f"zip member {info.filename!r} points outside the archive; refused")
                if info.is_dir() or name.name.startswith(".") or "__MACOSX" in name.parts:
                    continue
                dest = target / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def series_in_folder(folder: Path) -> dict[str, list[str]]:
    """Every DICOM series below ``folder`` (recursively): series UID -> sorted slice files."""
    import SimpleITK as sitk

    from medseg.io.image import quiet_native_stderr

    found: dict[str, list[str]] = {}
    dirs = [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]
    with quiet_native_stderr():
        for d in dirs:
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(d)):
                found.setdefault(uid, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(d), uid)))
    return found
