"""Per-structure volume and attenuation statistics of a CT label map.

Two layouts:

* :func:`structure_statistics` (medseg's): voxel count, volume in mm³ and mL, mean / median / std /
  min / max / percentiles of the HU values, whether the structure touches the image border
  (likely cut off), optionally on a mask eroded by ``erode_mm`` so partial-volume voxels at the
  organ surface do not bias attenuation.
* :func:`totalsegmentator_statistics`: exactly TotalSegmentator's ``statistics.json``
  (``{name: {"volume": mm³, "intensity": HU}}``, every class of the map, zeros for absent or
  border-touching structures, HU truncated to int16 first, 5-decimal rounding) so scripts written
  for TotalSegmentator keep working. Checked against TotalSegmentator's own code in
  ``tests/test_ct_statistics.py``.

Both work per structure inside its bounding box (``scipy.ndimage.find_objects``), so 117 classes on a
512×512×900 CT cost a few passes over the volume, not 117.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BORDER_VOXELS = 3  # TotalSegmentator: a mask within 3 voxels of any face is incomplete
PERCENTILES = (5, 25, 75, 95)


def _boxes(seg: np.ndarray, labels: dict[str, int]) -> list:
    top = max(labels.values(), default=0)
    seg = seg if seg.dtype.kind in "iu" else seg.astype(np.int64)
    return ndimage.find_objects(np.clip(seg, 0, top).astype(np.int32, copy=False), max_label=top) if top else []


def touches_border(box: tuple[slice, ...], shape: tuple[int, ...], margin: int = BORDER_VOXELS) -> bool:
    """True if the bounding box comes within ``margin`` voxels of any face of the volume."""
    return any(s.start < margin or s.stop > n - margin for s, n in zip(box, shape))


def _ball(radius_mm: float, spacing) -> np.ndarray:
    r = [max(0, int(np.floor(radius_mm / s))) for s in spacing]
    grid = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    return sum((g * s / radius_mm) ** 2 for g, s in zip(grid, spacing)) <= 1.0


def _hu_summary(values: np.ndarray, prefix: str = "hu") -> dict:
    if values.size == 0:
        return {f"{prefix}_{k}": None for k in ("mean", "median", "std", "min", "max")} | {
            f"{prefix}_p{p}": None for p in PERCENTILES
        }
    v = values.astype(np.float64)
    pct = np.percentile(v, PERCENTILES)
    return {
        f"{prefix}_mean": float(v.mean()),
        f"{prefix}_median": float(np.median(v)),
        f"{prefix}_std": float(v.std()),
        f"{prefix}_min": float(v.min()),
        f"{prefix}_max": float(v.max()),
    } | {f"{prefix}_p{p}": float(x) for p, x in zip(PERCENTILES, pct)}


def structure_statistics(
    ct: np.ndarray,
    seg: np.ndarray,
    spacing,
    labels: dict[str, int],
    *,
    erode_mm: float = 0.0,
    prefix: str = "hu",
) -> dict[str, dict]:
    """medseg's per-structure statistics for every structure of ``labels`` (absent ones: 0 voxels).

    ``ct`` and ``seg`` share one grid; ``spacing`` in mm, same axis order as the arrays.
    ``prefix`` names the intensity fields: ``hu_mean`` ... for a CT in HU, ``intensity_mean`` ...
    for an image whose values are not HU (an MR), so no table calls MR signal "HU".
    """
    if ct.shape != seg.shape:
        raise ValueError(f"image shape {ct.shape} and label shape {seg.shape} differ")
    voxel_mm3 = float(np.prod(spacing))
    boxes = _boxes(seg, labels)
    ball = _ball(erode_mm, spacing) if erode_mm > 0 else None
    out: dict[str, dict] = {}
    for name, value in labels.items():
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is None:
            row = {"label": value, "voxels": 0, "volume_mm3": 0.0, "volume_ml": 0.0, "touches_border": False}
            row |= _hu_summary(np.empty(0), prefix)
            if ball is not None:
                row |= {"voxels_eroded": 0} | _hu_summary(np.empty(0), f"{prefix}_eroded")
            out[name] = row
            continue
        mask = seg[box] == value
        n = int(mask.sum())
        row = {
            "label": value,
            "voxels": n,
            "volume_mm3": n * voxel_mm3,
            "volume_ml": n * voxel_mm3 / 1000.0,
            "touches_border": touches_border(box, seg.shape),
        }
        row |= _hu_summary(ct[box][mask], prefix)
        if ball is not None:
            # erode inside a box padded by the ball radius; outside the image counts as background
            pad = [(k // 2, k // 2) for k in ball.shape]
            eroded = ndimage.binary_erosion(np.pad(mask, pad), structure=ball)
            eroded = eroded[tuple(slice(a, a + s) for (a, _), s in zip(pad, mask.shape))]
            row |= {"voxels_eroded": int(eroded.sum())} | _hu_summary(ct[box][eroded], f"{prefix}_eroded")
        out[name] = row
    return out


def totalsegmentator_statistics(
    ct: np.ndarray,
    seg: np.ndarray,
    spacing,
    labels: dict[str, int],
    *,
    exclude_masks_at_border: bool = True,
    metric: str = "mean",
) -> dict[str, dict]:
    """TotalSegmentator's ``statistics.json`` content, value for value.

    As TotalSegmentator does: intensities are the image cast to int16, the voxel volume is the
    product of the header's float32 spacings, a structure within 3 voxels of a face gets
    volume 0 and intensity 0 unless ``exclude_masks_at_border`` is False, and the intensity is
    rounded to 5 decimals.
    """
    if metric not in ("mean", "median"):
        raise ValueError(f"metric must be 'mean' or 'median', not {metric!r}")
    if ct.shape != seg.shape:
        raise ValueError(f"image shape {ct.shape} and label shape {seg.shape} differ")
    sp = np.asarray(spacing, dtype=np.float32)
    vox_vol = sp[0] * sp[1] * sp[2]  # float32, as nibabel's header zooms
    ct16 = ct.astype(np.int16)
    boxes = _boxes(seg, labels)
    stats: dict[str, dict] = {}
    for name, value in labels.items():
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is None:
            stats[name] = {"volume": 0.0, "intensity": 0.0}
            continue
        if exclude_masks_at_border and touches_border(box, seg.shape):
            stats[name] = {"volume": 0.0, "intensity": 0.0}
            continue
        values = ct16[box][seg[box] == value].astype(np.float64)
        volume = np.int64(values.size) * vox_vol
        intensity = values.mean() if metric == "mean" else np.median(values)
        stats[name] = {"volume": float(volume), "intensity": float(np.round(intensity, 5))}
    return stats
