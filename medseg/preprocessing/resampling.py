"""Resampling between spacings, nnU-Net style.

Images: cubic spline (order 3). Labels: linear interpolation of each class's one-hot mask,
then argmax -- this keeps thin structures that nearest-neighbour would break. For
anisotropic data (spacing ratio > 3) the low-resolution axis is resampled separately with
nearest/linear so that cubic interpolation never blurs across thick slices.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

ANISOTROPY_THRESHOLD = 3.0


def new_shape(shape, spacing, target_spacing) -> tuple[int, ...]:
    """Voxels per axis after resampling to ``target_spacing`` (mm); never fewer than one."""
    return tuple(max(1, int(round(s * sp / tsp))) for s, sp, tsp in zip(shape, spacing, target_spacing))


def full_target_spacing(spacing, target_spacing) -> tuple[float, ...]:
    """The (z, y, x) target for an image of ``spacing``: a 2-element (y, x) target (a plan of 2D
    images) resamples only the in-plane axes and keeps z as it is."""
    if len(target_spacing) == len(spacing) - 1:
        return (float(spacing[0]), *map(float, target_spacing))
    return tuple(map(float, target_spacing))


def anisotropic_axis(spacing) -> int | None:
    """The single axis whose spacing is > 3x the finest one, or None."""
    spacing = np.asarray(spacing, dtype=float)
    if spacing.max() / spacing.min() <= ANISOTROPY_THRESHOLD:
        return None
    coarse = np.flatnonzero(spacing / spacing.min() > ANISOTROPY_THRESHOLD)
    return int(coarse[0]) if len(coarse) == 1 else None


def _zoom(x: np.ndarray, shape, order: int) -> np.ndarray:
    if tuple(x.shape) == tuple(shape):
        return x
    factors = [n / o for n, o in zip(shape, x.shape)]
    return ndimage.zoom(x, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)


def _resample_channel(x, shape, order, axis, order_z, clip=False):
    """``clip``: limit the result to the input's range (per slice along ``axis`` for the in-plane pass),
    as nnU-Net's ``skimage.transform.resize`` does; cubic splines otherwise overshoot at sharp edges."""
    if axis is None:
        out = _zoom(x, shape, order)
        return np.clip(out, x.min(), x.max(), out=out) if clip and out is not x else out
    inplane = list(shape)
    inplane[axis] = x.shape[axis]
    tmp = _zoom(x, inplane, order)
    if clip and tmp is not x:
        other = tuple(a for a in range(x.ndim) if a != axis)
        tmp = np.clip(tmp, x.min(axis=other, keepdims=True), x.max(axis=other, keepdims=True))
    return _zoom(tmp, shape, order_z)


def resample_image(
    image: np.ndarray,
    spacing,
    target_spacing,
    *,
    shape=None,
    order: int = 3,
    separate_z_axis: int | None = None,
    order_z: int = 0,
    clip: bool = False,
) -> np.ndarray:
    """Resample a (C, *spatial) float image to ``target_spacing`` (or an explicit ``shape``).

    ``clip``: keep each channel within its input range (nnU-Net's resampling does)."""
    shape = tuple(shape) if shape is not None else new_shape(image.shape[1:], spacing, target_spacing)
    if tuple(image.shape[1:]) == shape:
        return image.astype(np.float32, copy=False)
    return np.stack(
        [_resample_channel(c.astype(np.float32), shape, order, separate_z_axis, order_z, clip) for c in image]
    )


def resample_label(
    label: np.ndarray,
    spacing,
    target_spacing,
    *,
    shape=None,
    num_classes: int | None = None,
    separate_z_axis: int | None = None,
) -> np.ndarray:
    """Resample an integer label map with linear interpolation of each one-hot channel."""
    shape = tuple(shape) if shape is not None else new_shape(label.shape, spacing, target_spacing)
    if tuple(label.shape) == shape:
        return label
    # only the classes present: an absent class interpolates to 0 everywhere and cannot change the argmax
    # (a 117-class CT crop holds a fraction of them; nnU-Net's resize_segmentation does the same)
    classes = [c for c in np.unique(label) if c != 0 and (not num_classes or c < num_classes)]
    best = np.zeros(shape, dtype=np.float32)
    total = np.zeros(shape, dtype=np.float32)
    out = np.zeros(shape, dtype=label.dtype)
    for c in classes:
        prob = _resample_channel((label == c).astype(np.float32), shape, 1, separate_z_axis, 0)
        take = prob > best
        out[take] = c
        best[take] = prob[take]
        total += prob
    out[(1.0 - total) >= best] = 0  # argmax including background's share
    return out


def resample_probabilities(probs: np.ndarray, shape, *, separate_z_axis: int | None = None) -> np.ndarray:
    """Resample (C, *spatial) class probabilities to ``shape`` (linear)."""
    if tuple(probs.shape[1:]) == tuple(shape):
        return probs
    return np.stack([_resample_channel(p, shape, 1, separate_z_axis, 0) for p in probs])
