"""``medseg ct``: one command from a CT (file, DICOM series folder or zip) to named structure masks,
statistics, previews and DICOM-SEG, with any medseg model folder (trained by medseg or imported
from nnU-Net / TotalSegmentator).

A model folder may hold a lower-resolution variant in ``MODEL/fast/`` (itself a model folder):
``--fast`` uses it instead, and ``--roi-subset`` uses it to find the requested structures first,
then runs the full model only on that region (TotalSegmentator's approach).
"""

from __future__ import annotations

import difflib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from medseg.errors import DatasetError

ROI_MARGIN_MM = 20.0


def _warn(msg: str) -> None:
    print(f"medseg: warning: {msg}", file=sys.stderr)


def check_roi_subset(names: list[str], labels: dict[str, int]) -> dict[str, int]:
    unknown = [n for n in names if n not in labels]
    if unknown:
        hints = {n: difflib.get_close_matches(n, list(labels), n=3) for n in unknown}
        detail = "; ".join(f"{n!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for n, h in hints.items())
        raise DatasetError(None, f"--roi-subset: unknown structure {detail}; the model knows {len(labels)} structures")
    return {n: labels[n] for n in names}


def looks_like_ct(image: np.ndarray) -> bool:
    """CT in HU has air near -1000 somewhere in the field of view; MR and PET have no negatives."""
    return bool(np.percentile(image, 0.5) < -300)


def _fast_variant(folder: Path) -> Path | None:
    fast = folder / "fast"
    return fast if (fast / "model.json").is_file() else None


def _roi_box(seg: np.ndarray, values: list[int], spacing, margin_mm: float) -> tuple[slice, ...] | None:
    idx = np.argwhere(np.isin(seg, values))
    if not len(idx):
        return None
    lo, hi = idx.min(0), idx.max(0) + 1
    pad = [int(np.ceil(margin_mm / s)) for s in spacing]
    return tuple(slice(max(0, a - p), min(n, b + p)) for a, b, p, n in zip(lo, hi, pad, seg.shape))


def segment_ct(
    input: str | Path,
    output: str | Path,
    model: str | Path,
    *,
    fast: bool = False,
    roi_subset: list[str] | None = None,
    multilabel: bool = False,
    statistics: bool = False,
    stats_format: str = "medseg",
    preview: bool = False,
    dicom_seg: bool = False,
    class_map: str | Path | None = None,
    device: str = "auto",
    tta: bool = True,
    overwrite: bool = False,
    echo=print,
) -> dict:
    """Segment one CT; returns the paths written and the structure volumes.

    ``output``: a folder (one mask per structure, or ``segmentation.nii.gz`` with ``multilabel``;
    side outputs ``statistics.json``, ``preview.png``, ``segmentation.dcm`` inside it) or, with
    ``multilabel``, an image file ``seg.nii.gz`` (side outputs beside it: ``seg_statistics.json``,
    ``seg_preview.png``, ``seg.dcm``). Outputs that exist are refused unless ``overwrite``
    (:mod:`medseg.outputs`); ``class_map`` must fit the model's labels."""
    from medseg.apps.ct_stats import write_statistics
    from medseg.ct.class_maps import fit_class_map
    from medseg.inference.predictor import Predictor
    from medseg.io.checkpoint import resolve_model
    from medseg.io.image import check_writable_dir, read_image
    from medseg.outputs import check_new_outputs

    t0 = time.perf_counter()
    input, output = Path(input), Path(output)
    single_file = multilabel and output.name.endswith((".nii.gz", ".nii", ".nrrd", ".mha"))
    out_dir = check_writable_dir(output.parent if single_file else output)
    folder = resolve_model(model)
    fast_folder = _fast_variant(folder)
    if fast and fast_folder is None:
        raise DatasetError(folder, "--fast: this model has no fast variant (a model folder in MODEL/fast/)")
    main = Predictor.from_folder(fast_folder if fast else folder, device=device, tta=tta)
    labels = fit_class_map(class_map, main.spec.labels, fast_folder if fast else folder)
    subset = check_roi_subset(roi_subset, labels) if roi_subset else None
    wanted = subset or labels

    targets, planned = _planned_outputs(
        output, out_dir, list(wanted), single_file=single_file, multilabel=multilabel,
        statistics=statistics, stats_format=stats_format, preview=preview, dicom_seg=dicom_seg,
    )  # fmt: skip
    check_new_outputs(planned, overwrite=overwrite)  # before predicting: a refusal costs nothing

    ct, meta = read_image(input)
    is_ct = looks_like_ct(ct)
    if not is_ct:
        _warn(f"{input}: does not look like a CT in Hounsfield units (no air near -1000 HU; an MR?); "
              "a CT model will segment it poorly")  # fmt: skip
    locator = (
        Predictor.from_folder(fast_folder, device=device, tta=False) if subset and not fast and fast_folder else None
    )
    seg = _predict_ct(main, locator, ct, meta, subset, input)
    result = {"outputs": _write_masks(seg, meta, wanted, targets["labels"], multilabel=multilabel)}
    spacing_ml = float(np.prod(meta.spacing)) / 1000.0
    counts = np.bincount(seg.ravel().astype(np.int64), minlength=max(wanted.values()) + 1)
    result["structures"] = {n: counts[v] * spacing_ml for n, v in wanted.items() if counts[v]}
    if statistics:
        result["statistics"] = targets["statistics"]
        write_statistics(
            ct, seg, meta.spacing, wanted, result["statistics"], fmt=stats_format,
            sources={"image": str(input), "model": str(folder)}, hounsfield=is_ct,
        )  # fmt: skip
    if preview:
        result["preview"] = _preview(ct, seg, meta, wanted, targets["preview"], hounsfield=is_ct)
    if dicom_seg:
        result["dicom_seg"] = _write_dicom_seg(input, seg, wanted, targets["dicom_seg"])
    result["seconds"] = round(time.perf_counter() - t0, 2)
    top = sorted(result["structures"].items(), key=lambda kv: -kv[1])[:8]
    echo(f"{input.name}: {len(result['structures'])} of {len(wanted)} structures found in {result['seconds']} s "
         f"({'fast' if fast else 'full'} model, {main.device}) -> {out_dir}")  # fmt: skip
    for n, ml in top:
        echo(f"  {n:30s} {ml:10.1f} mL")
    return result


def _planned_outputs(
    output: Path, out_dir: Path, names: list[str], *, single_file: bool, multilabel: bool, statistics: bool,
    stats_format: str, preview: bool, dicom_seg: bool,
) -> tuple[dict, list[Path]]:  # fmt: skip
    """Where each output goes (``labels``: the multilabel file or the folder of masks) and the list
    of files this run will write (checked before predicting)."""
    from medseg.outputs import side_output, stem

    def side(name: str) -> Path:
        return side_output(output, name, into_folder=not single_file)

    targets = {
        "labels": output if single_file else out_dir / "segmentation.nii.gz" if multilabel else out_dir,
        "statistics": side("statistics.json"),
        "preview": side("preview.png"),
        "dicom_seg": output.with_name(f"{stem(output)}.dcm") if single_file else out_dir / "segmentation.dcm",
    }
    planned = [targets["labels"]] if multilabel else [out_dir / f"{name}.nii.gz" for name in names]
    if statistics:
        planned += [targets["statistics"]]
        planned += [targets["statistics"].with_suffix(".csv")] if stats_format == "medseg" else []
    planned += [targets["preview"]] if preview else []
    planned += [targets["dicom_seg"]] if dicom_seg else []
    return targets, planned


def _predict_ct(main, locator, ct: np.ndarray, meta, subset: dict | None, input: Path) -> np.ndarray:
    """The label map of ``ct`` by ``main``; with a ``locator`` (the fast model) only inside the box
    around the ``subset`` structures it finds (plus a margin); labels outside ``subset`` cleared."""
    from medseg.io.image import label_dtype

    image = ct[None].astype(np.float32)
    region = None
    if locator is not None:
        # by name: the fast model may number its classes differently (e.g. a 117-class 3 mm model
        # locating structures for a 24-class part model)
        located = [locator.labels[n] for n in subset if locator.labels.get(n)]
        if located:
            coarse, _ = locator.predict_array(image, meta)
            region = _roi_box(coarse, located, meta.spacing, ROI_MARGIN_MM)
        if region is None:
            _warn(f"{input}: the fast model found none of {', '.join(subset)}; running on the whole scan")
    if region is not None:
        seg = np.zeros(ct.shape, dtype=label_dtype(main.spec.num_classes - 1))  # as the predictor returns
        crop, _ = main.predict_array(np.ascontiguousarray(image[(slice(None), *region)]), _crop_meta(meta, region))
        seg[region] = crop
    else:
        seg, _ = main.predict_array(image, meta)
    if subset:
        seg = np.where(np.isin(seg, list(subset.values())), seg, 0).astype(seg.dtype)
    return seg


def _write_masks(seg: np.ndarray, meta, wanted: dict, target: Path, *, multilabel: bool) -> list[Path]:
    """One label-map file ``target``, or one binary mask per structure in the folder ``target``."""
    from medseg.io.image import write_image

    if multilabel:
        return [write_image(seg, meta, target)]

    def one(item):
        name, value = item
        return write_image((seg == value).astype(np.uint8), meta, target / f"{name}.nii.gz")

    with ThreadPoolExecutor(4) as pool:  # zlib releases the GIL
        return list(pool.map(one, wanted.items()))


def _crop_meta(meta, region):
    """Geometry for predicting a sub-volume: only spacing and shape matter to the predictor."""
    import dataclasses

    return dataclasses.replace(meta, shape=tuple(s.stop - s.start for s in region))


def _preview(ct, seg, meta, labels: dict[str, int], path: Path, *, hounsfield: bool = True) -> Path:
    from medseg.evaluation.report import overlay_png

    # a CT: the soft-tissue window (-400..600 HU); anything else: overlay_png's percentile window
    ct_window = np.clip(ct.astype(np.float32), -400, 600) if hounsfield else ct.astype(np.float32)
    counts = np.bincount(seg.ravel().astype(np.int64), minlength=max(labels.values(), default=0) + 1)
    # every present structure, biggest first: the legend names as many as fit, then "+N more"
    present = sorted(((n, v) for n, v in labels.items() if counts[v]), key=lambda kv: -counts[kv[1]])
    return overlay_png(ct_window, seg, meta.spacing, path, size=320, labels=dict(present))


def _write_dicom_seg(input: Path, seg, labels, path: Path) -> Path | None:
    import shutil

    from medseg.io.dicom_seg import write_dicom_seg
    from medseg.io.dicom_series import series_in_folder, unpack_zip

    if input.is_file() and input.suffix.lower() == ".zip":
        folder = unpack_zip(input)
        try:
            (files,) = series_in_folder(folder).values()
            return write_dicom_seg(Path(files[0]).parent, seg, labels, path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    if input.is_dir():
        return write_dicom_seg(input, seg, labels, path)
    _warn(f"{input}: --dicom-seg needs a DICOM series input; skipped")
    return None
