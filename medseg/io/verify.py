"""The dataset checks: ``medseg verify`` reports every problem at once; ``plan``, ``preprocess`` and
``train`` run the same checks through :func:`check_dataset` and refuse the first problem.

A case that passed is recorded (its files' path, size and modification time, and dataset.json's) in
the workspace, so later commands read only files that changed since.
"""

from __future__ import annotations

import json
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
CHECKS_VERSION = 1  # raise when a check is added: older records of checked cases are then ignored


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


def _rounded(values) -> tuple[float, ...]:
    return tuple(round(float(v), 3) + 0.0 for v in values)  # + 0.0: no "-0.0"


def geometry_problem(meta: ImageMeta, ref: ImageMeta, ref_name: str) -> str | None:
    """Like :func:`grid_problem`, and also the origin and direction: a label (or channel) with a
    shifted origin or a flipped axis lies elsewhere in the patient though its array fits.

    Shared by verify, plan/preprocess/train (label and channels vs channel 0) and predict (channels).
    """
    reason = grid_problem(meta, ref, ref_name)
    if reason:
        return reason
    if not np.allclose(meta.origin, ref.origin, atol=ORIGIN_ATOL_MM):
        return f"origin {_rounded(meta.origin)} mm differs from {ref_name} {_rounded(ref.origin)} mm"
    if not np.allclose(meta.direction, ref.direction, atol=DIRECTION_ATOL):
        return f"orientation (direction {_rounded(meta.direction)}) differs from {ref_name} ({_rounded(ref.direction)})"
    return None


def nonfinite_problem(arr: np.ndarray) -> str | None:
    """NaN/Inf voxels poison normalisation statistics and network outputs."""
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        return f"{int((~np.isfinite(arr)).sum())} non-finite voxel(s) (NaN/Inf)"
    return None


def label_value_problem(arr: np.ndarray, labels: dict[str, int]) -> str | None:
    """Values in a label map that dataset.json does not define (silently dropped otherwise), checked
    on the values as stored: a 0.5 or a -1 would become 0 or 255 once cast to an integer label."""
    allowed = sorted(set(labels.values()))
    unknown = sorted(set(np.unique(arr).tolist()) - set(allowed))
    unknown = [int(v) if float(v).is_integer() else float(v) for v in unknown]
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
        expected = f"{case.image_case}_{i:04d}{info.file_ending}"
        if f.name != expected:
            problems.append(Problem(str(f.parent / expected), "missing channel file"))
            break
    one_file = single_file_channels(info.file_ending, range(len(case.images)))  # RGB in _0000
    if len(case.images) < info.num_channels and not problems and not one_file:
        problems.append(
            Problem(
                str(case.images[0].parent / f"{case.image_case}_{len(case.images):04d}{info.file_ending}"),
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
        reason = geometry_problem(meta, rm, rf.name)
        if reason:
            problems.append(Problem(str(f), reason))
    natural = is_natural_image(info.file_ending)
    if natural and counts and len(counts) == len(case.images) and len(case.images) <= info.num_channels:
        from medseg.io.channels import channel_count_problem

        found = channel_count_problem(
            [f for f, _ in counts], [c for _, c in counts], info.num_channels, "dataset.json declares"
        )
        if found:
            problems.append(Problem(str(found[0]), found[1]))
    return problems


def _stray_labels(folder: Path, info: DatasetInfo, cases: list[Case]) -> list[Problem]:
    label_dir = folder / "labelsTr"
    if not label_dir.is_dir():
        return []
    names = {c.name for c in cases}
    return [
        Problem(str(f), "label without image")
        for f in sorted(label_dir.iterdir())
        if f.name.endswith(info.file_ending) and f.name[: -len(info.file_ending)] not in names
    ]


def _list_for_checking(folder: Path) -> tuple[DatasetInfo, list[Case]]:
    info = load_dataset_json(folder)
    img_dir = folder / "imagesTr"
    if img_dir.is_dir() and not any(p for p in img_dir.iterdir() if not p.name.startswith(".")):
        raise DatasetError(img_dir, "folder is empty")
    return info, list_cases(folder, info, strict=False)


def _checked_cases(cases: list[Case], info: DatasetInfo, workers: int | None, progress: bool = False):
    """Yield (case, problems) in order, the cases read by ``workers`` processes."""
    from medseg.utils import default_workers, track

    workers = min(workers or default_workers(), len(cases))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = pool.map(_check_case, cases, [info] * len(cases), chunksize=4)
            try:
                yield from zip(cases, track(results, total=len(cases), description="check", enabled=progress))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # a refused case stops the rest
    else:
        for c in track(cases, description="check", enabled=progress):
            yield c, _check_case(c, info)


def verify_dataset(folder: str | Path, *, workers: int | None = None) -> tuple[int, list[Problem]]:
    """Return (number of cases, problems). Raises DatasetError only if nothing can be checked."""
    folder = Path(folder)
    info, cases = _list_for_checking(folder)
    problems = _stray_labels(folder, info, cases)
    for _, ps in _checked_cases(cases, info, workers):
        problems.extend(ps)
    return len(cases), problems


def _stat(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _case_key(case: Case) -> list:
    return [_stat(f) for f in (*case.images, *([case.label] if case.label else []))]


def check_dataset(
    folder: str | Path, *, record: str | Path | None = None, workers: int | None = None, progress: bool = False
) -> int:
    """Refuse a dataset that ``verify`` would report: raise its first problem as a DatasetError
    (one line: the file and the reason). Returns the number of cases.

    The gate in front of every command that reads a raw dataset (plan, preprocess, train), so that
    none of them trains on data verify refuses. ``record`` (a JSON file in the workspace) lists the
    cases that passed, keyed by their files' path, size and modification time (and dataset.json's):
    unchanged cases are not read again. It is written only when every case passes, so a refused
    dataset leaves no file behind.
    """
    from medseg.io.jsonio import write_json

    folder = Path(folder)
    info, cases = _list_for_checking(folder)
    stray = _stray_labels(folder, info, cases)
    if stray:
        raise DatasetError(stray[0].path, stray[0].reason)
    header = {"checks": CHECKS_VERSION, "dataset_json": _stat(folder / "dataset.json")}
    done: dict = {}
    if record is not None and Path(record).is_file():
        try:
            old = json.loads(Path(record).read_text())
            if {k: old.get(k) for k in header} == header:
                done = old.get("cases", {})
        except (OSError, ValueError, AttributeError):
            done = {}  # an unreadable record only costs a re-check
    keys = {c.name: _case_key(c) for c in cases if c.label is not None}
    todo = [c for c in cases if c.name not in keys or done.get(c.name) != keys[c.name]]
    for _, problems in _checked_cases(todo, info, workers, progress):
        if problems:
            raise DatasetError(problems[0].path, problems[0].reason)
    if record is not None and (todo or set(done) != set(keys)):
        write_json(record, {**header, "cases": keys})
    return len(cases)
