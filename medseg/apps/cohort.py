"""``medseg cohort``: many scans -> one table of per-structure volume and attenuation, resumable,
in parallel (local processes by default, Ray across a cluster), plus the TotalSegmentator-paper
analysis of each measure against a covariate such as age.

Layout of the output folder::

    OUT/cases/CASE.json          per-case rows, written atomically when the case is done (resume key)
    OUT/segmentations/CASE.nii.gz  label maps predicted by the model (absent when --segmentations given)
    OUT/failed.json              cases that failed, with the one-line reason (retried on the next run)
    OUT/cohort.csv, cohort.parquet  one row per case and structure (tidy/long format)

A crash loses at most the cases in flight: every finished case is on disk before the next starts.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import DatasetError, MedsegError

MEASURES = ("volume_ml", "hu_mean", "hu_median", "hu_std", "voxels", "touches_border")


@dataclass(frozen=True)
class CohortCase:
    name: str
    image: Path
    seg: Path | None = None
    covariates: dict[str, str] = field(default_factory=dict)


def read_cohort(source: str | Path, *, segmentations: str | Path | None = None) -> list[CohortCase]:
    """Cases from a folder of images (or DICOM series sub-folders) or a CSV with a ``path`` column
    (optional ``case`` and ``seg`` columns; every other column is a covariate). Relative paths in a
    CSV are relative to the CSV's folder."""
    from medseg.io.dataset import cases_from_input
    from medseg.io.image import image_suffix, strip_suffix

    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        with source.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise DatasetError(source, "cohort CSV needs a 'path' column (and optionally case, seg, covariates)")
            cases = []
            for line, row in enumerate(reader, start=2):
                image = (source.parent / row["path"]).resolve() if row["path"] else None
                if image is None or not image.exists():
                    raise DatasetError(source, f"line {line}: image {row['path']!r} not found")
                name = row.get("case") or (image.name if image.is_dir() else strip_suffix(image))
                name = name[:-5] if name.endswith("_0000") and not row.get("case") else name  # nnU-Net channel 0
                seg = (source.parent / row["seg"]).resolve() if row.get("seg") else None
                covs = {k: v for k, v in row.items() if k not in ("path", "case", "seg") and k is not None}
                cases.append(CohortCase(name, image, seg, covs))
    else:
        cases = [CohortCase(c.name, c.images[0]) for c in cases_from_input(source)]
    names = [c.name for c in cases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DatasetError(source, f"case names occur more than once: {', '.join(dupes[:5])}")
    if segmentations is not None:
        seg_dir = Path(segmentations)
        found = {strip_suffix(p): p for p in seg_dir.iterdir() if p.is_file() and image_suffix(p)}
        missing = [c.name for c in cases if c.name not in found and c.seg is None]
        if missing:
            raise DatasetError(seg_dir, f"no label map for case(s) {', '.join(missing[:5])}")
        cases = [c if c.seg else CohortCase(c.name, c.image, found[c.name], c.covariates) for c in cases]
    return cases


# --- one case ----------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(model, folds, device, tta, threads) -> None:
    """Load the model once per worker process (or Ray actor)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if model is not None:
        from medseg.inference.predictor import Predictor

        _WORKER["predictor"] = Predictor.from_folder(model, folds, device=device, tta=tta)


def process_case(case: CohortCase, out_dir: str | Path, labels: dict[str, int], erode_mm: float = 0.0) -> dict:
    """Segment (unless a label map is given), measure, and write ``cases/CASE.json`` atomically."""
    from medseg.ct.statistics import structure_statistics
    from medseg.io.dataset import Case
    from medseg.io.image import label_dtype, read_image, write_image
    from medseg.io.jsonio import write_json

    out_dir, t0 = Path(out_dir), time.perf_counter()
    if case.seg is not None:
        image, meta = read_image(case.image)
        seg, _ = read_image(case.seg)
        if seg.shape != image.shape:
            raise DatasetError(case.seg, f"label map shape {seg.shape} differs from the image's {image.shape}")
    else:
        predictor = _WORKER.get("predictor")
        if predictor is None:
            raise DatasetError(case.image, "no label map given and no model loaded")
        arr, meta = predictor.read_case(Case(case.name, (case.image,), None))
        image = arr[0]
        seg, _ = predictor.predict_array(arr, meta)
        seg_path = out_dir / "segmentations" / f"{case.name}.nii.gz"
        write_image(seg.astype(label_dtype(int(seg.max()))), meta, seg_path)
    from medseg.ct.class_maps import unnamed_values_problem

    problem = unnamed_values_problem(seg, labels)  # unnamed values would silently drop out of the table
    if problem:
        raise DatasetError(case.seg or case.image, problem)
    stats = structure_statistics(image, seg.astype(np.int64, copy=False), meta.spacing, labels, erode_mm=erode_mm)
    rows = []
    for structure, s in stats.items():
        row = {"case": case.name, **case.covariates, "structure": structure}
        row |= {k: s[k] for k in MEASURES}
        if erode_mm > 0:
            row |= {"hu_eroded_mean": s["hu_eroded_mean"], "voxels_eroded": s["voxels_eroded"]}
        rows.append(row)
    result = {"case": case.name, "image": str(case.image), "seconds": round(time.perf_counter() - t0, 3), "rows": rows}
    write_json(out_dir / "cases" / f"{case.name}.json", result)
    return result


def _safe_process(case, out_dir, labels, erode_mm) -> tuple[str, str | None]:
    try:
        process_case(case, out_dir, labels, erode_mm)
        return case.name, None
    except MedsegError as exc:
        return case.name, exc.one_line()


# --- the cohort ------------------------------------------------------------------------------


def _run_local(todo, out_dir, labels, erode_mm, workers, init_args):
    if workers <= 1:
        _init_worker(*init_args)
        for case in todo:
            yield _safe_process(case, out_dir, labels, erode_mm)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(
        workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=init_args
    ) as pool:
        futures = [pool.submit(_safe_process, c, out_dir, labels, erode_mm) for c in todo]
        for fut in as_completed(futures):
            yield fut.result()


def _run_ray(todo, out_dir, labels, erode_mm, workers, init_args, address):
    try:
        import ray
    except ImportError:
        raise MedsegError(None, "--backend ray needs Ray: pip install 'medseg[ray]'") from None
    from ray.util import ActorPool

    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class Worker:  # one model per actor, loaded once
        def __init__(self):
            _init_worker(*init_args)

        def run(self, case):
            return _safe_process(case, out_dir, labels, erode_mm)

    pool = ActorPool([Worker.remote() for _ in range(max(1, workers))])
    yield from pool.map_unordered(lambda actor, case: actor.run.remote(case), todo)


def run_cohort(
    source: str | Path,
    output: str | Path,
    *,
    model: str | Path | None = None,
    segmentations: str | Path | None = None,
    class_map: str | Path | dict | None = None,
    workers: int = 1,
    backend: str = "local",
    ray_address: str | None = None,
    folds=None,
    device: str = "auto",
    tta: bool = True,
    erode_mm: float = 0.0,
    overwrite: bool = False,
    echo=print,
) -> dict:
    """Measure every case of a cohort (skipping those already done, unless ``overwrite``) and write
    the cohort table."""
    import os

    from medseg.ct.class_maps import load_class_map
    from medseg.io.image import check_writable_dir
    from medseg.io.jsonio import write_json

    out_dir = check_writable_dir(output)
    cases = read_cohort(source, segmentations=segmentations)
    if model is None and any(c.seg is None for c in cases):
        raise DatasetError(source, "cases without a label map need a model (-m) or --segmentations")
    if model is not None:  # the model's own labels; a --class-map must fit them
        from medseg.ct.class_maps import fit_class_map
        from medseg.io.checkpoint import load_spec, resolve_model

        folder = resolve_model(model)
        labels = fit_class_map(class_map, load_spec(folder).labels, folder)
    elif class_map is None:
        raise DatasetError(
            source, "no class map: the label maps do not say what their values are; pass --class-map or -m MODEL"
        )
    else:
        labels = load_class_map(class_map)
    done = set() if overwrite else {c.name for c in cases if (out_dir / "cases" / f"{c.name}.json").exists()}
    todo = [c for c in cases if c.name not in done]
    echo(f"cohort: {len(cases)} case(s), {len(done)} already done, {len(todo)} to run ({backend}, {workers} worker(s))")
    failed: dict[str, str] = {}
    if todo:
        threads = max(1, (os.cpu_count() or 1) // max(1, workers))
        init_args = (model if any(c.seg is None for c in todo) else None, folds, device, tta, threads)
        if backend == "local":
            results = _run_local(todo, out_dir, labels, erode_mm, workers, init_args)
        elif backend == "ray":
            results = _run_ray(todo, out_dir, labels, erode_mm, workers, init_args, ray_address)
        else:
            raise MedsegError(None, f"unknown backend {backend!r} (local or ray)")
        from medseg.utils import track

        for name, error in track(results, total=len(todo), description="cohort"):
            if error:
                failed[name] = error
                echo(f"medseg: warning: {error}")
    write_json(out_dir / "failed.json", failed)
    rows = []
    for c in cases:
        f = out_dir / "cases" / f"{c.name}.json"
        if f.exists():
            rows += json.loads(f.read_text())["rows"]
    paths = write_table(rows, out_dir / "cohort.csv")
    echo(f"cohort table: {len(rows)} rows ({len(cases) - len(failed)} cases) -> {', '.join(str(p) for p in paths)}")
    return {"table": paths[0], "rows": rows, "failed": failed, "ran": len(todo), "skipped": len(done)}


def write_table(rows: list[dict], csv_path: Path, *, parquet: bool = True) -> list[Path]:
    """CSV always; Parquet beside it when pyarrow is installed (optional extra ``cohort``)."""
    import io
    import sys

    from medseg.io.image import atomic_target
    from medseg.io.jsonio import write_text_atomic

    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    paths = [write_text_atomic(csv_path, buf.getvalue())]
    if not parquet:
        return paths
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        print(
            "medseg: warning: pyarrow not installed; Parquet table skipped (pip install 'medseg[cohort]')",
            file=sys.stderr,
        )
        return paths
    pq_path = csv_path.with_suffix(".parquet")
    tmp = atomic_target(pq_path)
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in fields} for r in rows]), tmp)
    Path(tmp).replace(pq_path)
    return paths + [pq_path]
