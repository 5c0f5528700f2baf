"""Per-class, per-case metrics in physical units (mm), and folder-level reports (JSON + CSV).

Conventions: if both prediction and reference are empty for a class, Dice = IoU = NSD = 1
and HD95 = 0; if exactly one is empty, Dice = IoU = NSD = 0 and HD95 is undefined (None,
left out of the means and counted in ``n_undefined_hd95``).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.errors import DatasetError
from medseg.io.image import read_image
from medseg.io.jsonio import write_json, write_text_atomic
from medseg.io.verify import grid_problem, label_value_problem


def _surface(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1), border_value=0)
    return mask & ~eroded


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of pred to ref's surface, and vice versa.

    Singleton axes are dropped first: a 2D image held as (1, H, W) has its surface on the in-plane
    contour (in 3D every one of its pixels would border the empty slices above and below)."""
    keep = [a for a, n in enumerate(pred.shape) if n > 1] or [0]
    if len(keep) < pred.ndim:
        pred, ref = pred.reshape([pred.shape[a] for a in keep]), ref.reshape([ref.shape[a] for a in keep])
        spacing = [spacing[a] for a in keep]
    both = pred | ref
    idx = np.argwhere(both)
    lo, hi = np.maximum(idx.min(0) - 2, 0), np.minimum(idx.max(0) + 3, both.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    p, r = pred[sl], ref[sl]
    sp, sr = _surface(p), _surface(r)
    dist_to_r = ndimage.distance_transform_edt(~sr, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return dist_to_r[sp], dist_to_p[sr]


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing, nsd_tolerance_mm: float = 1.0) -> dict:
    pred, ref = pred.astype(bool), ref.astype(bool)
    tp = int((pred & ref).sum())
    fp = int((pred & ~ref).sum())
    fn = int((~pred & ref).sum())
    n_pred, n_ref = tp + fp, tp + fn
    if n_pred == 0 and n_ref == 0:
        return {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0, "tp": 0, "fp": 0, "fn": 0, "n_pred": 0, "n_ref": 0}
    dice = 2 * tp / (2 * tp + fp + fn)
    iou = tp / (tp + fp + fn)
    if n_pred == 0 or n_ref == 0:
        hd95, nsd = None, 0.0
    else:
        d_pr, d_rp = surface_distances(pred, ref, spacing)
        hd95 = float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))
        nsd = float(((d_pr <= nsd_tolerance_mm).sum() + (d_rp <= nsd_tolerance_mm).sum()) / (len(d_pr) + len(d_rp)))
    return {
        "dice": float(dice),
        "iou": float(iou),
        "hd95": hd95,
        "nsd": nsd,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "n_pred": n_pred,
        "n_ref": n_ref,
    }


def evaluate_case(
    pred: np.ndarray, ref: np.ndarray, spacing, labels: dict[str, int], nsd_tolerance_mm: float = 1.0
) -> dict[str, dict]:
    return {
        name: binary_metrics(pred == v, ref == v, spacing, nsd_tolerance_mm) for name, v in labels.items() if v != 0
    }


def _mean(values):
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarise(per_case: dict[str, dict[str, dict]]) -> dict:
    classes = sorted({c for m in per_case.values() for c in m})
    mean = {}
    for c in classes:
        rows = [per_case[k][c] for k in per_case if c in per_case[k]]
        mean[c] = {m: _mean(r[m] for r in rows) for m in ("dice", "iou", "hd95", "nsd")}
        mean[c]["n_undefined_hd95"] = sum(r["hd95"] is None for r in rows)
    fg = {m: _mean(mean[c][m] for c in classes) for m in ("dice", "iou", "hd95", "nsd")}
    return {"mean": mean, "foreground_mean": fg, "num_cases": len(per_case), "per_case": per_case}


def to_csv(per_case: dict[str, dict[str, dict]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["case", "class", "dice", "iou", "hd95_mm", "nsd", "n_pred", "n_ref"])
    for case, classes in sorted(per_case.items()):
        for c, m in classes.items():
            w.writerow(
                [
                    case,
                    c,
                    f"{m['dice']:.6f}",
                    f"{m['iou']:.6f}",
                    "" if m["hd95"] is None else f"{m['hd95']:.4f}",
                    f"{m['nsd']:.6f}",
                    m["n_pred"],
                    m["n_ref"],
                ]
            )
    return buf.getvalue()


def _inside_roi(path: Path, ref_meta, pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``pred`` and ``ref`` with every voxel outside the mask at ``path`` set to background (0)."""
    if not path.exists():
        raise DatasetError(path, "region-of-interest mask missing for this prediction")
    roi, meta = read_image(path)
    reason = grid_problem(meta, ref_meta, "the reference")
    if reason:
        raise DatasetError(path, reason)
    outside = roi == 0
    return np.where(outside, 0, pred), np.where(outside, 0, ref)


SIDE_OUTPUTS = ("_overlay", "_ood")  # `predict --overlay` pictures, `predict --ood-map` score maps (+ _ood_<score>)


def _side_output(name: str, found: set[str]) -> bool:
    """Whether ``name`` is a side output of predict beside case ``CASE`` (not a prediction)."""
    if any(name.endswith(s) and name[: -len(s)] in found for s in SIDE_OUTPUTS):
        return True
    base, sep, _ = name.rpartition("_ood_")
    return bool(sep) and base in found


def evaluate_folder(
    pred_dir: str | Path,
    ref_dir: str | Path,
    labels: dict[str, int],
    *,
    names=None,
    file_ending: str = ".nii.gz",
    nsd_tolerance_mm: float = 1.0,
    output: str | Path | None = None,
    progress: bool = False,
    roi_masks: str | Path | None = None,
) -> dict:
    """Compare every ``pred_dir/CASE.ext`` to ``ref_dir/CASE.ext``; writes JSON (+ CSV beside it).

    ``roi_masks``: a folder of masks ``CASE.ext`` on the reference's grid (non-zero = inside);
    metrics count only the voxels inside (both label maps are set to background outside), as is
    customary for retinal vessels within DRIVE's field of view."""
    from medseg.utils import track

    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    roi_dir = Path(roi_masks) if roi_masks is not None else None
    if roi_dir is not None and not roi_dir.is_dir():
        raise DatasetError(roi_dir, "region-of-interest mask folder not found")
    if names is None:
        found = {p.name[: -len(file_ending)] for p in pred_dir.glob(f"*{file_ending}") if not p.name.startswith(".")}
        names = sorted(n for n in found if not _side_output(n, found))
    if not names:
        raise DatasetError(pred_dir, f"no predictions ending in {file_ending}")
    per_case = {}
    for name in track(names, description="evaluate", enabled=progress):
        ref_path = ref_dir / f"{name}{file_ending}"
        if not ref_path.exists():
            raise DatasetError(ref_path, "reference segmentation missing for this prediction")
        pred_path = pred_dir / f"{name}{file_ending}"
        pred, pm = read_image(pred_path)
        ref, rm = read_image(ref_path)
        reason = grid_problem(pm, rm, f"reference {ref_path.name}")
        if reason:  # metrics in mm need one voxel grid
            raise DatasetError(pred_path, reason)
        for path, arr in ((pred_path, pred), (ref_path, ref)):  # other values would silently count as background
            reason = label_value_problem(arr, labels)
            if reason:
                raise DatasetError(path, reason)
        if roi_dir is not None:
            pred, ref = _inside_roi(roi_dir / f"{name}{file_ending}", rm, pred, ref)
        per_case[name] = evaluate_case(pred, ref, rm.spacing, labels, nsd_tolerance_mm)
    summary = summarise(per_case)
    summary["nsd_tolerance_mm"] = nsd_tolerance_mm
    if roi_dir is not None:
        summary["roi_masks"] = str(roi_dir)
    if output:
        output = Path(output)
        write_json(output, summary)
        write_text_atomic(output.with_suffix(".csv"), to_csv(per_case))
    return summary
