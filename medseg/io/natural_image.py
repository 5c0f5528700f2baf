"""2D natural images (PNG, BMP, TIFF) through Pillow, in nnU-Net's NaturalImage2DIO convention.

A 2D image is held as a volume with a singleton first axis, one channel = (1, H, W) in (z, y, x)
order, so every 3D code path (cropping, normalisation, sliding window, export, metrics) takes it
unchanged. Grey, 16-bit and palette images are one channel; an RGB(A) file is three (alpha dropped):
``dataset.json`` ``channel_names`` {R, G, B} come from the single ``CASE_0000.png``. Spacing is
``NATURAL_SPACING`` (1, 1, 1): pixels have no physical size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medseg.errors import ImageReadError, OutputError
from medseg.io.image import NATURAL_SPACING, ImageMeta, atomic_target, ensure_writable_dir, label_dtype

_ALPHA_MODES = ("LA", "La", "PA")  # grey/palette + alpha: the alpha is dropped, as nnU-Net does


def read_natural_image(path: Path) -> tuple[np.ndarray, ImageMeta]:
    """A 2D image as (C, 1, H, W) in its stored dtype (16-bit stays 16-bit): grey and palette images
    give one channel (palette indices, the label values of an indexed label PNG), RGB(A) three
    (alpha dropped). Geometry: ``NATURAL_SPACING``, origin 0, identity direction."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                raise ImageReadError(path, f"holds {frames} frames/pages; expected one 2D image")
            if im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            arr = np.asarray(im)
            mode = im.mode
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, f"not an image Pillow can read as {path.suffix.lower()}") from None
    except Exception as exc:  # truncated data, broken chunks, bad compression
        raise ImageReadError(path, f"cannot read image (truncated or corrupt: {' '.join(str(exc).split())})") from None
    if arr.dtype == np.bool_:  # mode "1"
        arr = arr.astype(np.uint8)
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)  # "I;16B" arrives big-endian
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        arr = arr[..., :1] if mode in _ALPHA_MODES else arr[..., :3]
        arr = np.moveaxis(arr, -1, 0)
    else:
        raise ImageReadError(path, f"unexpected pixel layout (array of shape {arr.shape})")
    arr = np.ascontiguousarray(arr[:, None])
    return arr, ImageMeta(spacing=NATURAL_SPACING, shape=tuple(int(s) for s in arr.shape[1:]))


_NATURAL_FORMATS = {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}


def write_natural_image(array: np.ndarray, path: Path) -> Path:
    """A (1, H, W) label map as a grey 2D image: uint8, or uint16 when a value exceeds 255 (not BMP)."""

    if array.ndim != 3 or array.shape[0] != 1:
        raise OutputError(
            path, f"cannot write image: a {path.suffix.lower()} file holds one 2D slice, got shape {array.shape}"
        )
    arr = array[0]
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating) and path.suffix.lower() in (".tif", ".tiff"):
        return _write_atomic(np.ascontiguousarray(arr, dtype=np.float32), path)  # a float map (TIFF mode "F")
    if not np.issubdtype(arr.dtype, np.integer):
        if not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
            raise OutputError(path, f"cannot write image: {arr.dtype} values that are not integers")
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    suffix = path.suffix.lower()
    limit = 255 if suffix == ".bmp" else 65535
    if lo < 0 or hi > limit:
        raise OutputError(path, f"cannot write image: values {lo}..{hi} do not fit a {suffix} file (0..{limit})")
    return _write_atomic(np.ascontiguousarray(arr.astype(label_dtype(hi))), path)


def _write_atomic(arr: np.ndarray, path: Path) -> Path:
    from PIL import Image

    suffix = path.suffix.lower()
    ensure_writable_dir(path.parent)
    tmp = atomic_target(path)
    try:
        Image.fromarray(arr).save(tmp, format=_NATURAL_FORMATS[suffix])
        os.replace(tmp, path)
    except Exception as exc:
        raise OutputError(path, f"cannot write image ({exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path
