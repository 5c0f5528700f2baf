"""Dataset fingerprint: what the planner needs to know about a dataset.

Per case: spacing, shape before and after cropping to non-zero, foreground intensity
samples per channel (for CT normalisation) and class voxel counts.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medseg.errors import DatasetError
from medseg.io.dataset import Case, DatasetInfo, list_cases, load_dataset_json
from medseg.io.image import label_dtype, read_image
from medseg.preprocessing.cropping import crop_to_nonzero
from medseg.preprocessing.orientation import CANONICAL, orientation_transform

SAMPLES_PER_CASE = 10_000


@dataclass
class Fingerprint:
    dataset_name: str
    spacings: list[list[float]]
    shapes_after_crop: list[list[int]]
    crop_fraction: float  # median (cropped volume / original volume)
    intensity: list[dict]  # per channel: mean, std, percentile_00_5, percentile_99_5, min, max
    class_fraction: dict[str, float]  # mean fraction of voxels per label value
    num_cases: int
    # per case: spacing, extent (mm), orientation, intensity percentiles (medseg.planning.ood.case_summary),
    # reduced to the model's training range (model.json "training_data"); None in older fingerprints
    case_summaries: list[dict] | None = None

    def save(self, path: str | Path) -> Path:
        from medseg.io.jsonio import write_json

        return write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> Fingerprint:
        return cls(**json.loads(Path(path).read_text()))


def load_case(case: Case, num_channels: int | None = None) -> tuple[np.ndarray, np.ndarray | None, object]:
    """Read all channels (C, z, y, x) and the label of a case; geometry from channel 0.

    Raises DatasetError naming the file if a channel or the label is off channel 0's voxel grid
    (shape, spacing, origin, direction), an image holds NaN/Inf (either would silently corrupt the
    plan or the cache), the files do not give ``num_channels`` channels (an RGB file where
    dataset.json declares one, ...), or a label value would change in the cast to an integer label
    (0.5, -1). The full set of checks runs before, in :func:`medseg.io.verify.check_dataset`.
    """
    from medseg.io.channels import read_case_channels
    from medseg.io.verify import geometry_problem

    image, meta = read_case_channels(case.images, num_channels)
    label = None
    if case.label is not None:
        label, lm = read_image(case.label)
        reason = geometry_problem(lm, meta, case.images[0].name)
        if reason:
            raise DatasetError(case.label, reason)
        cast = label.astype(label_dtype(max(int(label.max()), 0)), copy=False)
        if cast is not label and not np.array_equal(cast, label):
            bad = np.unique(label[cast != label])[:10].tolist()
            raise DatasetError(case.label, f"label values {bad} are not non-negative integers")
        label = cast
    return image, label, meta


def _case_stats(case: Case, seed: int, num_channels: int | None = None) -> dict:
    from medseg.planning.ood import case_summary

    image, label, meta = load_case(case, num_channels)
    summary = case_summary(image, meta)
    full = int(np.prod(image.shape[1:]))
    image, label, _, _ = crop_to_nonzero(image, label)
    rng = np.random.default_rng(seed)
    fg = label > 0 if label is not None else np.ones(image.shape[1:], bool)
    samples = []
    for c in range(image.shape[0]):
        vals = image[c][fg]
        if vals.size > SAMPLES_PER_CASE:
            vals = rng.choice(vals, SAMPLES_PER_CASE, replace=False)
        samples.append(vals.astype(np.float32))
    counts = np.bincount(label.ravel(), minlength=1) if label is not None else np.zeros(1)
    # axis order as preprocessed: 3D plans reorient to RAS; single slices (2D data, 2D plans) keep theirs
    perm = orientation_transform(meta.direction, CANONICAL)[0] if image.shape[1] > 1 else [0, 1, 2]
    return {
        "spacing": [float(meta.spacing[p]) for p in perm],
        "shape": [int(image.shape[1:][p]) for p in perm],
        "crop": float(np.prod(image.shape[1:]) / full),
        "samples": samples,
        "counts": counts / max(counts.sum(), 1),
        "summary": summary,
    }


def compute_fingerprint(
    dataset_folder: str | Path, *, workers: int | None = None, progress: bool = True, record: str | Path | None = None
) -> Fingerprint:
    """``record``: the workspace's record of checked cases (see :func:`medseg.io.verify.check_dataset`,
    which refuses a dataset ``medseg verify`` would report before anything is computed)."""
    from medseg.io.verify import check_dataset
    from medseg.utils import default_workers, track

    folder = Path(dataset_folder)
    check_dataset(folder, record=record, workers=workers, progress=progress)
    info: DatasetInfo = load_dataset_json(folder)
    cases = list_cases(folder, info)

    workers = workers or default_workers()
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            stats = list(
                track(
                    pool.map(_case_stats, cases, range(len(cases)), [info.num_channels] * len(cases), chunksize=4),
                    total=len(cases),
                    description="fingerprint",
                    enabled=progress,
                )
            )
    else:
        stats = [
            _case_stats(c, i, info.num_channels)
            for i, c in track(list(enumerate(cases)), description="fingerprint", enabled=progress)
        ]
    intensity = []
    for c in range(info.num_channels):
        vals = np.concatenate([s["samples"][c] for s in stats]) if stats else np.zeros(1)
        intensity.append(
            {
                "mean": float(vals.mean()),
                "std": float(vals.std()),
                "percentile_00_5": float(np.percentile(vals, 0.5)),
                "percentile_99_5": float(np.percentile(vals, 99.5)),
                "min": float(vals.min()),
                "max": float(vals.max()),
            }
        )
    nlab = max(len(s["counts"]) for s in stats)
    frac = np.mean([np.pad(s["counts"], (0, nlab - len(s["counts"]))) for s in stats], axis=0)
    return Fingerprint(
        dataset_name=info.name,
        spacings=[s["spacing"] for s in stats],
        shapes_after_crop=[s["shape"] for s in stats],
        crop_fraction=float(np.median([s["crop"] for s in stats])),
        intensity=intensity,
        class_fraction={str(i): float(f) for i, f in enumerate(frac)},
        num_cases=len(stats),
        case_summaries=[s["summary"] for s in stats],
    )
