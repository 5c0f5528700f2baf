"""Conditioning inputs at prediction time: from the caller's coordinates to each tile's.

Non-spatial conditions (text tokens or embeddings, histograms, scalars) are given per case as
arrays with a leading batch axis of 1 (or none, then one is added) and repeated for every tile of
a batch. Spatial conditions — ``points`` (N, 3) and ``boxes`` (N, 6) in voxel coordinates (z, y, x)
of the input image as it was read — follow the preprocessing (reorientation, crop, resampling),
then each tile's offset and mirror flips, so the model sees them in its own tile's coordinates,
as in training (:func:`medseg.augment.transforms.augment_spatial_conditions`).
"""

from __future__ import annotations

import numpy as np
import torch

from medseg.augment.transforms import boxes_to_corners, corners_to_boxes

SPATIAL = ("points", "boxes")


def _as_points(value, key: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    width = 6 if key == "boxes" else 3
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != width:
        from medseg.errors import MedsegError  # the CLI prints it in one line

        raise MedsegError(
            None, f"condition '{key}' must be (N, {width}) voxel coordinates (z, y, x), got shape {arr.shape}"
        )
    return arr.reshape(-1, 3)


def points_to_preprocessed(points: np.ndarray, props: dict) -> np.ndarray:
    """(N, 3) input voxel coordinates -> coordinates in the preprocessed array (continuous)."""
    p = np.asarray(points, dtype=np.float64)
    record = props.get("orientation")
    if record is not None:  # new axis a is old axis perm[a], reversed where flip[a]
        shape = record["shape"]
        p = np.stack([shape[o] - 1 - p[:, o] if f else p[:, o] for o, f in zip(record["perm"], record["flip"])], axis=1)
    p = p - np.array([b[0] for b in props["bbox"]], dtype=np.float64)
    scale = np.array(props["shape_after_resampling"], float) / np.array(props["shape_after_crop"], float)
    return (p + 0.5) * scale - 0.5


def prepare_conditions(conditions: dict, props: dict, device) -> dict[str, torch.Tensor]:
    """Per-case conditions -> tensors (1, ...) on ``device``; spatial ones in preprocessed coordinates."""
    out = {}
    for key, value in conditions.items():
        if key in SPATIAL:
            pts = points_to_preprocessed(_as_points(value, key), props)
            value = pts.reshape(-1, 6) if key == "boxes" else pts
        t = torch.as_tensor(np.asarray(value))
        t = t.float() if t.is_floating_point() or key in SPATIAL else t
        out[key] = (t[None] if key in SPATIAL or t.ndim == 0 else t).to(device)
    return out


def dense_tiles(dense: dict, tile, starts, flip, squeeze_z: bool, device) -> dict[str, torch.Tensor]:
    """Each dense map (:class:`medseg.data.derived.DenseMap` over the preprocessed array) over the
    tiles starting at ``starts``, at its own resolution, mirrored like the tiles: (B, C, *tile / stride)."""
    out = {}
    for key, m in dense.items():
        cells = [t // s for t, s in zip(tile, m.stride)]
        x = torch.from_numpy(np.stack([m.region(st, cells) for st in starts])).to(device)
        x = x.flip([2 + a for a in flip]) if flip else x
        out[key] = x[:, :, 0] if squeeze_z else x
    return out


def tile_conditions(conditions: dict[str, torch.Tensor], tile, squeeze_z: bool, dense: dict | None = None):
    """The ``tile_conditions(starts, flip)`` callback of the sliding window for these conditions:
    spatial ones shifted to each tile's start and mirrored like the tile; all repeated per tile;
    ``dense`` maps cropped to each tile (:func:`dense_tiles`). ``squeeze_z``: a 2D network on
    (1, h, w) tiles gets 2D coordinates (z dropped)."""

    def for_tiles(starts, flip) -> dict[str, torch.Tensor]:
        out = dense_tiles(dense, tile, starts, flip, squeeze_z, device) if dense else {}
        for key, value in conditions.items():
            reps = [len(starts)] + [1] * (value.ndim - 1)
            if key not in SPATIAL:
                out[key] = value.repeat(*reps) if value.shape[0] == 1 else value
                continue
            start = torch.tensor(starts, dtype=value.dtype, device=value.device)  # (B, 3)
            pts = boxes_to_corners(value) if key == "boxes" else value  # (1, M, 3)
            pts = pts.repeat(len(starts), 1, 1) - start[:, None, :]
            for axis in flip:
                pts[..., axis] = tile[axis] - 1 - pts[..., axis]
            if key == "boxes":
                pts = corners_to_boxes(pts, 3)
                out[key] = pts[..., [1, 2, 4, 5]] if squeeze_z else pts
            else:
                out[key] = pts[..., 1:] if squeeze_z else pts
        return out

    device = next(iter(conditions.values())).device if conditions else "cpu"
    return for_tiles
