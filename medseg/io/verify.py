"""``medseg verify``: check every case of a raw dataset and report all problems at once."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import DatasetError, MedsegError
from medseg.io.dataset import Case, DatasetInfo, list_cases, load_dataset_json, single_file_channels
from medseg.io.image import ImageMeta, is_natural_image, read_image, read_image_channels

SPACING_RTOL = 1e-3
ORIGIN_ATOL_MM = 1e-2
DIRECTION_ATOL = 1e-3


def grid_problem(meta: ImageMeta, ref: ImageMeta, ref_name: str) -> str | None:
    """Why an image does not share the voxel grid (shape, spacing) of ``ref``; None if it does.

    Shared by verify, plan/preprocess (image vs label, channel vs channel), predict (channels)
    and evaluate (prediction vs reference), so every command words the problem the same way.
    """
    if meta.shape != ref.shape:
        return f"shape {meta.shape} differs from {ref_name} {ref.shape}"
    if not np.allclose(meta.spacing, ref.spacing, rtol=SPACING_RTOL):
        return (
            f"spacing {tuple(round(s, 4) for s in meta.spacing)} differs from "
            f"{ref_name} {tuple(round(s, 4) for s in ref.spacing)}"
        )
    return None


def nonfinite_problem(arr: np.ndarray) -> str | None:
    """NaN/Inf voxels poison normalisation statistics and network outputs."""
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        return f"{int((~np.isfinite(arr)).sum())} non-finite voxel(s) (NaN/Inf)"
    return None


def label_value_problem(arr: np.ndarray, labels: dict[str, int]) -> str | None:
    """Values in a label map that dataset.json does not define (silently dropped otherwise)."""
    allowed = sorted(set(labels.values()))
    unknown = sorted(set(np.unique(arr).tolist()) - set(allowed))
    if unknown:
        return f"label values {unknown[:10]} not in dataset.json labels {allowed}"
    return None


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _check_case(case: Case, info: DatasetInfo) -> list[Problem]:
    problems: list[Problem] = []
    ref = None
    for i, f in enumerate(case.images):
        expected = f"{case.name}_{i:04d}{info.file_ending}"
        if f.name != expected:
            problems.append(Problem(str(f.parent / expected), "missing channel file"))
            break
    one_file = single_file_channels(info.file_ending, range(len(case.images)))  # RGB in _0000
    if len(case.images) < info.num_channels and not problems and not one_file:
        problems.append(
            Problem(
                str(case.images[0].parent / f"{case.name}_{len(case.images):04d}{info.file_ending}"),
                "missing channel file",
            )
        )
    files = list(case.images) + ([case.label] if case.label else [])
    if case.label is None:
        problems.append(
            Problem(
                str(case.images[0].parent.parent / "labelsTr" / f"{case.name}{info.file_ending}"), "missing label file"
            )
        )
    counts = []
    for f in files:
        is_label = f == case.label
        try:
            arr, meta = read_image(f) if is_label else read_image_channels(f)
        except MedsegError as exc:
            problems.append(Problem(exc.path or str(f), exc.reason))
            continue
        if not is_label:
            counts.append((f, arr.shape[0]))
        reason = label_value_problem(arr, info.labels) if is_label else nonfinite_problem(arr)
        if reason:
            problems.append(Problem(str(f), reason))
        if ref is None:
            ref = (f, meta)
            continue
        rf, rm = ref
        reason = grid_problem(meta, rm, rf.name)
        if reason:
            problems.append(Problem(str(f), reason))
        elif not np.allclose(meta.origin, rm.origin, atol=ORIGIN_ATOL_MM):
            problems.append(Problem(str(f), f"origin differs from {rf.name}"))
        elif not np.allclose(meta.direction, rm.direction, atol=DIRECTION_ATOL):
            problems.append(Problem(str(f), f"orientation (direction) differs from {rf.name}"))
    natural = is_natural_image(info.file_ending)
    if natural and counts and len(counts) == len(case.images) and len(case.images) <= info.num_channels:
        from medseg.io.channels import channel_count_problem

        found = channel_count_problem(
            [f for f, _ in counts], [c for _, c in counts], info.num_channels, "dataset.json declares"
        )
        if found:
            problems.append(Problem(str(found[0]), found[1]))
    return problems


def verify_dataset(folder: str | Path, *, workers: int | None = None) -> tuple[int, list[Problem]]:
    """Return (number of cases, problems). Raises DatasetError only if nothing can be checked."""
    from medseg.utils import default_workers

    folder = Path(folder)
    info = load_dataset_json(folder)
    img_dir = folder / "imagesTr"
    if img_dir.is_dir() and not any(p for p in img_dir.iterdir() if not p.name.startswith(".")):
        raise DatasetError(img_dir, "folder is empty")
    cases = list_cases(folder, info, strict=False)
    problems: list[Problem] = []
    label_dir = folder / "labelsTr"
    if label_dir.is_dir():
        names = {c.name for c in cases}
        for f in sorted(label_dir.iterdir()):
            if f.name.endswith(info.file_ending) and f.name[: -len(info.file_ending)] not in names:
                problems.append(Problem(str(f), "label without image"))
    workers = min(workers or default_workers(), len(cases))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for ps in pool.map(_check_case, cases, [info] * len(cases), chunksize=4):
                problems.extend(ps)
    else:
        for c in cases:
            problems.extend(_check_case(c, info))
    return len(cases), problems
