"""Crop to the non-zero region (nnU-Net's first preprocessing step) and undo it."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """Voxels that are non-zero in any channel, holes filled. image: (C, *spatial)."""
    mask = np.any(image != 0, axis=0)
    return ndimage.binary_fill_holes(mask)


def bbox_of(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Bounding box [start, stop) per axis; the whole array if the mask is empty."""
    if not mask.any():
        return tuple((0, s) for s in mask.shape)
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append((int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)


def crop_to_nonzero(image: np.ndarray, label: np.ndarray | None = None):
    """Crop (C, *spatial) image (and label) to the non-zero bounding box.

    Returns (image, label, bbox, mask) where ``mask`` is the cropped non-zero mask, used
    for masked normalisation.
    """
    mask = nonzero_mask(image)
    bbox = bbox_of(mask)
    sl = tuple(slice(a, b) for a, b in bbox)
    image = image[(slice(None),) + sl]
    if label is not None:
        label = label[sl]
    return image, label, bbox, mask[sl]


def uncrop(array: np.ndarray, bbox, full_shape, fill=0) -> np.ndarray:
    """Put a cropped (…, *spatial) array back into an array of the original spatial shape."""
    lead = array.shape[: array.ndim - len(full_shape)]
    out = np.full(lead + tuple(full_shape), fill, dtype=array.dtype)
    out[(Ellipsis,) + tuple(slice(a, b) for a, b in bbox)] = array
    return out
