"""``medseg sam``: box-prompted segmentation of 2D images and 3D volumes, files in, files out.

2D images (PNG, JPEG, BMP, TIFF; grey or RGB) are segmented directly. 3D volumes (NIfTI, NRRD, MHA,
DICOM folders) are segmented slice by slice along ``axis`` (z: axial slices of the stored array, y, x)
inside each 3D box's range, one embedding per slice shared by every box on it. Several boxes give one
label map with labels 1..N in box order (where two overlap, the higher logit wins). Outputs are in the
input's geometry and format (JPEG -> PNG, DICOM -> NIfTI), written atomically.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from medseg.errors import ImageReadError, MedsegError
from medseg.sam.boxes import Box, check_box

JPEG_SUFFIXES = (".jpg", ".jpeg")
AXES = {"z": 0, "y": 1, "x": 2}


def read_prompt_image(path: str | Path):
    """(array, meta, spatial dims): (H, W) or (H, W, 3) for 2D images, (Z, Y, X) for volumes."""
    from medseg.io.image import NATURAL_SPACING, ImageMeta, is_natural_image, read_image

    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "not found")
    if path.is_file() and (is_natural_image(path) or path.suffix.lower() in JPEG_SUFFIXES):
        from medseg.io.natural_image import read_natural_image

        arr, meta = read_natural_image(path)  # (C, 1, H, W)
        img = arr[0, 0] if arr.shape[0] == 1 else np.moveaxis(arr[:, 0], 0, -1)
        return img, ImageMeta(spacing=NATURAL_SPACING, shape=(1, *img.shape[:2])), 2
    arr, meta = read_image(path)
    return arr, meta, 3


def output_suffix(path: Path) -> str:
    from medseg.io.image import image_suffix

    suffix = image_suffix(path)
    if path.suffix.lower() in JPEG_SUFFIXES:
        return ".png"
    return suffix or ".nii.gz"  # a DICOM folder


def _shape_xyz(img: np.ndarray, dims: int) -> tuple[int, ...]:
    return (img.shape[1], img.shape[0]) if dims == 2 else (img.shape[2], img.shape[1], img.shape[0])


def _assign(logits: torch.Tensor, first_label: int = 1) -> np.ndarray:
    """(P, ...) logits -> label map: the best box where its logit > 0, else 0."""
    best, idx = logits.max(0)
    labels = (idx + first_label).to(torch.int64)
    labels[best <= 0] = 0
    return labels.numpy()


def segment_2d(predictor, image: np.ndarray, boxes: list[Box], *, window=None) -> np.ndarray:
    coords = np.array([b.coords for b in boxes], np.float32)
    return _assign(predictor.segment(image, coords, window=window))


def _slice_boxes(box: Box, axis: int) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """A 3D box -> its 2D box on slices along ``axis`` (cols, rows of the slice) and the slice range."""
    x0, y0, z0, x1, y1, z1 = box.coords
    if axis == 0:  # arr[k]: rows y, cols x
        return (x0, y0, x1, y1), (int(round(z0)), int(round(z1)))
    if axis == 1:  # arr[:, j]: rows z, cols x
        return (x0, z0, x1, z1), (int(round(y0)), int(round(y1)))
    return (y0, z0, y1, z1), (int(round(x0)), int(round(x1)))  # arr[:, :, i]: rows z, cols y


def segment_3d(predictor, volume: np.ndarray, boxes: list[Box], *, axis: str = "z", window=None,
               progress: bool = False) -> np.ndarray:
    from medseg.utils import track

    ax = AXES[axis]
    per_slice: dict[int, list[tuple[int, tuple]]] = defaultdict(list)
    for label, box in enumerate(boxes, start=1):
        box2d, (s0, s1) = _slice_boxes(box, ax)
        for s in range(s0, s1 + 1):
            per_slice[s].append((label, box2d))
    out = np.zeros(volume.shape, np.int64)
    for s in track(sorted(per_slice), description=f"sam {axis}-slices", enabled=progress):
        plane = np.take(volume, s, axis=ax)
        labels, coords = zip(*per_slice[s])
        logits = predictor.segment(plane, np.array(coords, np.float32), window=window, key=(id(volume), ax, s))
        lab = _assign(logits)
        lab = np.where(lab > 0, np.array(labels)[np.maximum(lab - 1, 0)], 0)
        index = [slice(None)] * 3
        index[ax] = s
        out[tuple(index)] = lab
    return out


def load_job(image_path: str | Path, boxes: list[Box], output: str | Path, *, axis: str = "z"):
    """Read the image and check the boxes and the output before any model is loaded: (image, meta, dims)."""
    from medseg.io.image import check_output_apart

    image_path, output = Path(image_path), Path(output)
    check_output_apart(output, image_path)
    if axis not in AXES:
        raise MedsegError(None, f"--axis: expected z, y or x, got {axis!r}")
    if not boxes:
        raise MedsegError(image_path, "no box given")
    img, meta, dims = read_prompt_image(image_path)
    for b in boxes:
        check_box(b, _shape_xyz(img, dims), image_path)
    return img, meta, dims


def segment_file(predictor, image_path: str | Path, boxes: list[Box], output: str | Path, *, axis: str = "z",
                 window=None, overlay: bool = False, progress: bool = False, job=None) -> Path:
    """Segment ``image_path`` with ``boxes`` and write the label map to ``output`` (atomically);
    ``job``: what :func:`load_job` returned for them, if already read."""
    from medseg.io.image import label_dtype, write_image

    img, meta, dims = job or load_job(image_path, boxes, output, axis=axis)
    if dims == 2:
        labels = segment_2d(predictor, img, boxes, window=window)[None]
    else:
        labels = segment_3d(predictor, img, boxes, axis=axis, window=window, progress=progress)
    labels = labels.astype(label_dtype(len(boxes)))
    path = write_image(labels, meta, Path(output))
    if overlay:
        write_overlay(img, labels, meta, dims, path)
    return path


def write_overlay(img, labels, meta, dims, path: Path) -> Path:
    from medseg.evaluation.report import overlay_png
    from medseg.io.image import strip_suffix

    grey = img.mean(-1) if dims == 2 and img.ndim == 3 else img
    vol = grey[None] if dims == 2 else grey
    names = {f"box {v}": int(v) for v in np.unique(labels) if v}
    return overlay_png(vol, labels, meta.spacing, path.with_name(strip_suffix(path) + "_overlay.png"), labels=names)


def batch_outputs(boxes: list[Box], folder: Path, out_dir: Path) -> dict[Path, tuple[Path, list[Box]]]:
    """Output file -> (image file, its boxes): one file per ``id``, or one label map per image for rows
    without an id (labels 1..N in row order)."""
    from medseg.io.image import strip_suffix

    jobs: dict[Path, tuple[Path, list[Box]]] = {}
    for b in boxes:
        image = folder / b.image
        if not image.exists():
            raise MedsegError(image, "named in the boxes table but not found")
        stem = image.stem if image.suffix.lower() in JPEG_SUFFIXES else strip_suffix(image)
        name = (b.id or stem) + output_suffix(image)
        jobs.setdefault(out_dir / name, (image, []))[1].append(b)
    return jobs
