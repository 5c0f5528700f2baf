"""Image I/O through SimpleITK: NIfTI, NRRD, MetaImage and DICOM series.

Arrays are numpy in (z, y, x) order; ``spacing`` and ``origin`` are given in the same
(z, y, x) order in millimetres, ``direction`` is the 3x3 ITK direction matrix (x, y, z
columns, as ITK stores it). Keeping one convention everywhere avoids the classic
x/z swap bugs between SimpleITK and nibabel.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import ImageReadError, OutputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def image_suffix(path: str | Path) -> str | None:
    """Return the recognised image suffix of ``path`` (".nii.gz", ".nrrd", ...) or None."""
    name = str(path).lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def strip_suffix(path: str | Path) -> str:
    """File name without its image suffix: ``case_0000.nii.gz`` -> ``case_0000``."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix else name


@dataclass(frozen=True)
class ImageMeta:
    """Geometry of an image. spacing/origin in (z, y, x) order, mm."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    shape: tuple[int, int, int] = field(default=(0, 0, 0))

    def to_json(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction), "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> "ImageMeta":
        return cls(tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]), tuple(d["shape"]))


def is_dicom_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    import SimpleITK as sitk

    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def _read_sitk(path: Path):
    import SimpleITK as sitk

    if path.is_dir():
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise ImageReadError(path, "folder holds no DICOM series")
        if len(series) > 1:
            raise ImageReadError(path, f"folder holds {len(series)} DICOM series; pass one series folder")
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        return reader.Execute()
    if image_suffix(path) is None:
        raise ImageReadError(path, f"unsupported file type (expected one of {', '.join(IMAGE_SUFFIXES)} or a DICOM folder)")
    return sitk.ReadImage(str(path))


def read_image(path: str | Path, *, allow_4d: bool = False) -> tuple[np.ndarray, ImageMeta]:
    """Read a 3D image; raise ImageReadError with a one-line reason on any problem."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty")
    try:
        img = _read_sitk(path)
    except ImageReadError:
        raise
    except Exception as exc:  # SimpleITK raises RuntimeError with a multi-line ITK dump
        first = next((ln.strip() for ln in str(exc).splitlines() if "ERROR" in ln or "error" in ln), "")
        hint = "truncated or corrupt" if path.is_file() else "unreadable"
        raise ImageReadError(path, f"cannot read image ({hint}){': ' + first[:120] if first else ''}") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(path, f"has {img.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar 3D image")
    if img.GetDimension() != 3:
        if img.GetDimension() == 4 and not allow_4d:
            raise ImageReadError(path, f"is 4D (size {img.GetSize()}); expected a 3D image (split channels into _0000, _0001, ...)")
        if img.GetDimension() == 2:
            raise ImageReadError(path, f"is 2D (size {img.GetSize()}); expected a 3D image")
        if img.GetDimension() not in (3, 4):
            raise ImageReadError(path, f"is {img.GetDimension()}D; expected a 3D image")
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)
    if arr.ndim == 3 and 1 in arr.shape and min(arr.shape) == 1 and sum(s > 1 for s in arr.shape) < 3:
        raise ImageReadError(path, f"is effectively 2D (shape {arr.shape}); expected a 3D image")
    meta = ImageMeta(
        spacing=tuple(float(s) for s in reversed(img.GetSpacing()[:3])),
        origin=tuple(float(o) for o in reversed(img.GetOrigin()[:3])),
        direction=tuple(float(d) for d in np.array(img.GetDirection()).reshape(img.GetDimension(), -1)[:3, :3].ravel()),
        shape=tuple(int(s) for s in arr.shape[-3:]),
    )
    return arr, meta


def _sitk_image(array: np.ndarray, meta: ImageMeta):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in reversed(meta.spacing)))
    img.SetOrigin(tuple(float(o) for o in reversed(meta.origin)))
    img.SetDirection(tuple(meta.direction))
    return img


def atomic_target(path: Path) -> Path:
    """A temp path in the same folder as ``path`` with the same suffix, for write-then-rename."""
    suffix = image_suffix(path) or path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def ensure_writable_dir(folder: str | Path) -> Path:
    """Create ``folder`` if needed and check it can be written; raise OutputError otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".medseg-write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise OutputError(folder, f"output folder is not writable ({exc.strerror or exc})") from None
    return folder


def write_image(array: np.ndarray, meta: ImageMeta, path: str | Path, *, compress: bool = True) -> Path:
    """Write atomically: a half-written file never appears under the final name."""
    import SimpleITK as sitk

    path = Path(path)
    ensure_writable_dir(path.parent)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    tmp = atomic_target(path)
    try:
        sitk.WriteImage(_sitk_image(array, meta), str(tmp), compress)
        os.replace(tmp, path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(path, f"cannot write image ({exc})") from None
    return path
