"""Image I/O through SimpleITK: NIfTI, NRRD, MetaImage and DICOM series; 2D PNG/BMP/TIFF through
Pillow (medseg.io.natural_image), held as (1, H, W) volumes.

Arrays are numpy in (z, y, x) order; ``spacing`` and ``origin`` are given in the same
(z, y, x) order in millimetres, ``direction`` is the 3x3 ITK direction matrix (x, y, z
columns, as ITK stores it). Keeping one convention everywhere avoids the classic
x/z swap bugs between SimpleITK and nibabel.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import ImageReadError, OutputError
from medseg.io.nifti_checks import check_nifti, unreadable_reason

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# 2D natural images (nnU-Net's NaturalImage2DIO): read with Pillow as one (1, H, W) slice per channel
NATURAL_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
IMAGE_SUFFIXES = VOLUME_SUFFIXES + NATURAL_SUFFIXES
# spacing (z, y, x) of a natural image: it has no physical size, so one unit per pixel; z is 1 too (not
# nnU-Net's 999) so no axis counts as anisotropic and resampling, export and surface metrics stay on
# their isotropic paths. z never matters otherwise: a 2D plan resamples y and x only.
NATURAL_SPACING = (1.0, 1.0, 1.0)


def label_dtype(max_label: int) -> np.dtype:
    """The dtype of a label map whose largest label value is ``max_label`` (labels are non-negative;
    a model with K classes has ``max_label = K - 1``): uint8 up to 255, uint16 up to 65535 (NIfTI,
    NRRD, MHA, 16-bit PNG/TIFF and DICOM-SEG all store it), uint32 beyond, so no label ever wraps."""
    if max_label <= 255:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16 if max_label <= 65535 else np.uint32)


def image_suffix(path: str | Path) -> str | None:
    """Return the recognised image suffix of ``path`` (".nii.gz", ".nrrd", ...) or None."""
    name = str(path).lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def is_natural_image(path: str | Path) -> bool:
    """A 2D natural-image file name (.png, .bmp, .tif, .tiff), or a file_ending such as ".png"."""
    return str(path).lower().endswith(NATURAL_SUFFIXES)


def prediction_ending(file_ending: str) -> str:
    """The ending label maps are written with for a dataset of ``file_ending``: a natural-image dataset
    keeps its own (PNG in, PNG out, as nnU-Net does); volumes are written as .nii.gz."""
    return file_ending if is_natural_image(file_ending) else ".nii.gz"


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
        return {
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
            "shape": list(self.shape),
        }

    @classmethod
    def from_json(cls, d: dict) -> ImageMeta:
        return cls(tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]), tuple(d["shape"]))


@contextlib.contextmanager
def quiet_native_stderr():
    """Keep ITK/GDCM/MetaIO messages, which C++ prints straight to file descriptor 2, off the
    user's terminal: the CLI promises one line per error. Yields a list that receives the
    captured text, so a caller can still use it to explain a failure."""
    captured: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (embedded interpreters)
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


def is_dicom_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    import SimpleITK as sitk

    with quiet_native_stderr():  # GDCM warns "No Series were found" for every plain folder
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def _read_sitk(path: Path):
    import SimpleITK as sitk

    if path.is_dir():
        with quiet_native_stderr():
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise ImageReadError(path, "folder holds no DICOM series")
        if len(series) > 1:
            raise ImageReadError(path, f"folder holds {len(series)} DICOM series; pass one series folder")
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])
        from medseg.io.dicom_series import check_series

        check_series(path, list(files))
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        return reader.Execute()
    if image_suffix(path) is None:
        raise ImageReadError(
            path, f"unsupported file type (expected one of {', '.join(IMAGE_SUFFIXES)} or a DICOM folder)"
        )
    return sitk.ReadImage(str(path))


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty")


def read_image_channels(path: str | Path) -> tuple[np.ndarray, ImageMeta]:
    """Read an image as (C, z, y, x): C = 3 for an RGB(A) natural image, 1 for everything else."""
    path = Path(path)
    _check_readable(path)
    if path.is_file() and is_natural_image(path):
        from medseg.io.natural_image import read_natural_image

        return read_natural_image(path)
    arr, meta = read_image(path)
    return arr[None], meta


def read_image(path: str | Path, *, allow_4d: bool = False) -> tuple[np.ndarray, ImageMeta]:
    """Read a 3D image (a 2D natural image as (1, H, W)); raise ImageReadError with a one-line reason
    on any problem. An RGB natural image is refused here: read it with :func:`read_image_channels`."""
    path = Path(path)
    _check_readable(path)
    if path.is_file() and is_natural_image(path):
        from medseg.io.natural_image import read_natural_image

        arr, meta = read_natural_image(path)
        if arr.shape[0] != 1:
            raise ImageReadError(path, f"is an RGB image ({arr.shape[0]} colour channels); expected one channel")
        return arr[0], meta
    if path.is_file() and path.suffix.lower() == ".zip":
        return _read_zip(path, allow_4d=allow_4d)
    try:
        with quiet_native_stderr():
            img = _read_sitk(path)
    except ImageReadError:
        raise
    except Exception as exc:  # SimpleITK raises RuntimeError with a multi-line ITK dump
        raise ImageReadError(path, unreadable_reason(path, str(exc))) from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(
            path, f"has {img.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar 3D image"
        )
    if img.GetDimension() != 3:
        if img.GetDimension() == 4 and not allow_4d:
            raise ImageReadError(
                path, f"is 4D (size {img.GetSize()}); expected a 3D image (split channels into _0000, _0001, ...)"
            )
        if img.GetDimension() == 2:
            raise ImageReadError(path, f"is 2D (size {img.GetSize()}); expected a 3D image")
        if img.GetDimension() not in (3, 4):
            raise ImageReadError(path, f"is {img.GetDimension()}D; expected a 3D image")
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)
    if path.is_file():
        arr = check_nifti(path, arr)
    if arr.ndim == 3 and 1 in arr.shape and min(arr.shape) == 1 and sum(s > 1 for s in arr.shape) < 3:
        raise ImageReadError(path, f"is effectively 2D (shape {arr.shape}); expected a 3D image")
    meta = ImageMeta(
        spacing=tuple(float(s) for s in reversed(img.GetSpacing()[:3])),
        origin=tuple(float(o) for o in reversed(img.GetOrigin()[:3])),
        direction=tuple(float(d) for d in np.array(img.GetDirection()).reshape(img.GetDimension(), -1)[:3, :3].ravel()),
        shape=tuple(int(s) for s in arr.shape[-3:]),
    )
    return arr, meta


def _read_zip(path: Path, *, allow_4d: bool) -> tuple[np.ndarray, ImageMeta]:
    """A zip holding one DICOM series (any folder depth) or one image file."""
    import shutil

    from medseg.io.dicom_series import series_in_folder, unpack_zip

    folder = unpack_zip(path)
    try:
        series = series_in_folder(folder)
        if len(series) > 1:
            raise ImageReadError(path, f"zip holds {len(series)} DICOM series; pass a zip of one series")
        if series:
            (files,) = series.values()
            arr, meta = read_image(Path(files[0]).parent, allow_4d=allow_4d)
        else:
            images = [p for p in folder.rglob("*") if p.is_file() and image_suffix(p)]
            if len(images) != 1:
                raise ImageReadError(path, f"zip holds no DICOM series and {len(images)} image files; expected one")
            arr, meta = read_image(images[0], allow_4d=allow_4d)
    except ImageReadError as exc:
        if exc.path and exc.path.startswith(str(folder)):  # name the zip, not the temporary folder
            raise ImageReadError(path, exc.reason) from None
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
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
    from medseg.io.atomic import temp_file_beside

    return temp_file_beside(path, f".part{image_suffix(path) or path.suffix}")


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


def check_output_apart(output: str | Path, source: str | Path) -> None:
    """Refuse an output folder that could overwrite or mix with the inputs: for a folder of inputs,
    an output that is that folder, lies inside it or contains it; for one input file, its own folder
    (``scan.nii.gz`` would be replaced by its label map)."""
    out, src = Path(output).absolute().resolve(), Path(source).absolute().resolve()
    if src.is_file():
        clash = out == src.parent
    else:
        clash = out == src or src in out.parents or out in src.parents
    if clash:
        raise OutputError(
            output, f"output folder must be apart from the input {source} (it could overwrite the inputs)"
        )


def check_writable_dir(folder: str | Path) -> Path:
    """Fail early if ``folder`` could not be created or written, without creating anything:
    a command that fails later (bad model, bad input) then leaves no empty folder behind."""
    folder = Path(folder)
    existing = folder.absolute()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(folder, f"output folder is not writable ({existing} is not a folder)")
    try:
        tempfile.TemporaryFile(dir=existing, prefix=".medseg-write-test-").close()
    except OSError as exc:
        raise OutputError(folder, f"output folder is not writable ({existing}: {exc.strerror or exc})") from None
    return folder


def write_image(array: np.ndarray, meta: ImageMeta, path: str | Path, *, compress: bool = True) -> Path:
    """Write atomically: a half-written file never appears under the final name.

    SimpleITK writes under the final file name into a private temp folder beside ``path`` (so a
    detached .mhd/.nhdr header names its data file correctly); the files are then renamed into
    place, data file first and header last. The temp folder is removed even on Ctrl-C.
    """
    import SimpleITK as sitk

    path = Path(path)
    if is_natural_image(path):  # PNG/BMP/TIFF: a 2D label map at the input's size; no geometry to keep
        from medseg.io.natural_image import write_natural_image

        return write_natural_image(array, path)
    if array.ndim != 3:  # SimpleITK would silently turn a 4D (c, z, y, x) array into a vector image
        raise OutputError(path, f"cannot write image: expected a 3D (z, y, x) array, got shape {array.shape}")
    ensure_writable_dir(path.parent)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:  # no float16 pixel type in ITK
        array = array.astype(np.float32)
    from medseg.io.atomic import temp_dir_beside

    tmp_dir = temp_dir_beside(path)
    try:
        sitk.WriteImage(_sitk_image(array, meta), str(tmp_dir / path.name), compress)
        for f in sorted(tmp_dir.iterdir(), key=lambda f: f.name == path.name):
            os.replace(f, path.parent / f.name)
    except Exception as exc:
        raise OutputError(path, f"cannot write image ({exc})") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path
