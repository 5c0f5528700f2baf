"""Out-of-distribution input: is a case far outside the data the model was trained on?

A network answers for any input; a whole-brain scan at 6.5 mm slices through a hippocampus model
trained on 1 mm crops still gets "hippocampus" voxels. At training time the fingerprint's per-case
summaries (:func:`case_summary`) are reduced to a range (:func:`training_range`), stored in
``model.json`` as ``training_data``; at predict time each case's summary is compared with it
(:func:`ood_reasons`) and ``predict`` warns on one line per case. Model folders without
``training_data`` (older medseg, imported nnU-Net models) skip the check.

The thresholds are deliberately generous (a warning should mean something is clearly off):

- **spacing**: on some axis over ``SPACING_FACTOR`` (3x) the largest, or under a third of the
  smallest, training spacing on that axis;
- **extent** (the physical size of the non-zero region, mm): on some axis over ``EXTENT_FACTOR``
  (4x) the largest, or under a quarter of the smallest, training extent on that axis;
- **intensity**, only for channels normalised on an absolute scale (``ct``, ``range:``, ``none``,
  ...; not the per-case ``zscore`` of MRI, whose raw scale is arbitrary): the case's 0.5-99.5
  percentile range lying more than ``INTENSITY_SPANS`` (1) training span beyond the training range;
- **orientation**, only for plans without a canonical orientation (every case is otherwise brought
  to the plan's): an orientation code no training case had.

Spacings and extents are compared in RAS axis order (as the fingerprint stores them), so a sagittal
scan is compared axis by axis with axial training data correctly.
"""

from __future__ import annotations

import numpy as np

from medseg.io.image import ImageMeta
from medseg.preprocessing.cropping import bbox_of
from medseg.preprocessing.orientation import orientation_code, orientation_transform

SPACING_FACTOR = 3.0
EXTENT_FACTOR = 4.0
INTENSITY_SPANS = 1.0
INTENSITY_SAMPLES = 1_000_000  # voxels per channel for the percentiles (a strided subsample)
PER_CASE_SCHEMES = ("zscore", "zscore_masked")  # normalised per case: the raw scale is not compared
AXES = ("z", "y", "x")


def case_summary(image: np.ndarray, meta: ImageMeta) -> dict:
    """Spacing and extent (mm) of the non-zero region per axis in RAS axis order, the orientation
    code, and per channel the (0.5, 99.5) intensity percentiles inside that region.

    ``image``: (C, z, y, x) as read. The same function summarises training cases (fingerprint) and
    cases to predict, so the two are measured alike."""
    image = np.asarray(image)
    bbox = bbox_of(np.any(image != 0, axis=0))  # holes do not move a bounding box: no hole filling
    size = [b - a for a, b in bbox]
    perm = orientation_transform(meta.direction)[0] if image.shape[1] > 1 else [0, 1, 2]
    crop = image[(slice(None),) + tuple(slice(a, b) for a, b in bbox)].reshape(image.shape[0], -1)
    step = max(1, crop.shape[1] // INTENSITY_SAMPLES)
    intensity = []
    for c in range(crop.shape[0]):
        vals = crop[c, ::step].astype(np.float32)
        lo, hi = np.percentile(vals, [0.5, 99.5]) if vals.size else (0.0, 0.0)
        intensity.append([float(lo), float(hi)])
    return {
        "spacing": [float(meta.spacing[p]) for p in perm],
        "extent_mm": [float(size[p] * meta.spacing[p]) for p in perm],
        "orientation": orientation_code(meta.direction),
        "intensity": intensity,
    }


def training_range(summaries: list[dict]) -> dict:
    """The range of the training cases' summaries: what ``model.json`` stores as ``training_data``."""
    spacing = np.array([s["spacing"] for s in summaries], float)
    extent = np.array([s["extent_mm"] for s in summaries], float)
    intensity = np.array([s["intensity"] for s in summaries], float)  # (case, channel, 2)
    return {
        "num_cases": len(summaries),
        "spacing_mm": {"min": spacing.min(0).tolist(), "max": spacing.max(0).tolist()},
        "extent_mm": {"min": extent.min(0).round(2).tolist(), "max": extent.max(0).round(2).tolist()},
        "intensity": [
            {
                "percentile_00_5_min": float(intensity[:, c, 0].min()),
                "percentile_99_5_max": float(intensity[:, c, 1].max()),
            }
            for c in range(intensity.shape[1])
        ],
        "orientations": sorted({s["orientation"] for s in summaries}),
    }


def training_data_from(fingerprint_file) -> dict | None:
    """``training_data`` for model.json from the workspace's fingerprint.json; None when there is no
    fingerprint or it predates the per-case summaries (the model then skips the check)."""
    import json
    from pathlib import Path

    path = Path(fingerprint_file)
    if not path.is_file():
        return None
    try:
        summaries = json.loads(path.read_text()).get("case_summaries")
    except (OSError, ValueError, AttributeError):
        return None
    return training_range(summaries) if summaries else None


def _outside(values, low, high, factor: float, what: str, unit: str = " mm") -> str | None:
    for axis, (v, lo, hi) in enumerate(zip(values, low, high)):
        if v > factor * hi or v < lo / factor:
            name = AXES[axis] if len(values) == 3 else str(axis)
            seen = f"{lo:.3g}" if f"{lo:.3g}" == f"{hi:.3g}" else f"{lo:.3g}-{hi:.3g}"
            return f"{what} {v:.3g}{unit} on axis {name} (training {seen}{unit})"
    return None


def ood_reasons(summary: dict, training: dict, schemes=(), orientation: str | None = None) -> list[str]:
    """Why a case (:func:`case_summary`) is far outside ``training`` (:func:`training_range`); [] if
    it is not. ``schemes``: the plan's normalisation scheme per channel; ``orientation``: the plan's
    canonical orientation (None: cases keep their own, so a new orientation is reported)."""
    reasons = []
    sp, ex = training.get("spacing_mm"), training.get("extent_mm")
    if sp:
        reasons.append(_outside(summary["spacing"], sp["min"], sp["max"], SPACING_FACTOR, "spacing"))
    if ex:
        reasons.append(_outside(summary["extent_mm"], ex["min"], ex["max"], EXTENT_FACTOR, "extent"))
    for c, (rng, scheme) in enumerate(zip(training.get("intensity", []), schemes)):
        if scheme in PER_CASE_SCHEMES or c >= len(summary["intensity"]):
            continue
        lo, hi = rng["percentile_00_5_min"], rng["percentile_99_5_max"]
        margin = INTENSITY_SPANS * max(hi - lo, 1e-6)
        case_lo, case_hi = summary["intensity"][c]
        if case_hi > hi + margin or case_lo < lo - margin:
            reasons.append(f"channel {c} intensities {case_lo:.4g} to {case_hi:.4g} (training {lo:.4g} to {hi:.4g})")
    seen = training.get("orientations")
    if orientation is None and seen and summary["orientation"] not in seen:
        reasons.append(f"orientation {summary['orientation']} (training {', '.join(seen)})")
    return [r for r in reasons if r]


def ood_warning(case_file, reasons: list[str]) -> str:
    """The one line ``predict`` prints for a case far outside the training data."""
    return (
        f"medseg: warning: {case_file}: far outside the model's training data ({'; '.join(reasons)}); "
        "the segmentation may be meaningless"
    )
