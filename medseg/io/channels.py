"""All channels of one case as one (C, z, y, x) array: the single reader behind plan, preprocess
and predict, so each refuses the same problems with the same one-line error naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.errors import DatasetError, MedsegError
from medseg.io.image import ImageMeta, is_natural_image, read_image_channels


def read_case_channels(
    images,
    expected_channels: int | None = None,
    *,
    error: type[MedsegError] = DatasetError,
    needs: str = "dataset.json declares",
) -> tuple[np.ndarray, ImageMeta]:
    """Read the channel files of a case into (C, z, y, x) float32; geometry from the first file.

    A file gives one channel, or three for an RGB(A) natural image (nnU-Net's convention: one
    ``CASE_0000.png`` supplies channels R, G, B). ``expected_channels`` (None: no check) must equal
    the channels read in all. Channels off the first file's voxel grid (shape, spacing, origin, direction) and NaN/Inf intensities raise
    ``error`` naming the file (either would silently corrupt a plan, the cache or a prediction); a
    wrong channel count raises DatasetError, worded with ``needs`` ("the model needs", ...).
    """
    from medseg.io.verify import geometry_problem, nonfinite_problem

    images = [Path(f) for f in images]
    if not images:
        raise DatasetError(None, "case has no image files")
    natural = any(is_natural_image(f) for f in images)
    if expected_channels is not None and not natural and len(images) != expected_channels:
        raise DatasetError(images[0], f"{len(images)} channel(s) given; {needs} {expected_channels}")
    arrays, meta, first = [], None, images[0]
    for f in images:
        arr, m = read_image_channels(f)
        reason = nonfinite_problem(arr) or (geometry_problem(m, meta, f"channel 0 ({first.name})") if meta else None)
        if reason:
            raise error(f, reason)
        meta = meta or m
        arrays.append(arr.astype(np.float32, copy=False))
    if expected_channels is not None:
        counts = [a.shape[0] for a in arrays]
        problem = channel_count_problem(images, counts, expected_channels, needs)
        if problem:
            raise DatasetError(*problem)
    return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)), meta


def channel_count_problem(images, counts, expected: int, needs: str) -> tuple[Path, str] | None:
    """(file, reason) when the channels of a case's files do not add up to ``expected``: an RGB file
    where grey channels are declared, a grey file where one file must supply all (RGB) channels."""
    total = sum(counts)
    if total == expected:
        return None
    rgb = [(f, c) for f, c in zip(images, counts) if c > 1]
    if rgb and total > expected:
        f, c = rgb[0]
        return f, f"is an RGB image ({c} channels); {needs} {expected} channel(s)"
    if len(images) == 1 and expected > 1:
        return images[0], f"is a grey image (1 channel); {needs} {expected} channels (an RGB image, or one file each)"
    return images[0], f"{total} channel(s) in {len(images)} file(s); {needs} {expected}"
