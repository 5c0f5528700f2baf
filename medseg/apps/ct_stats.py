"""``medseg ct-stats``: per-structure volume and attenuation of a CT label map, from files."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np

FORMATS = ("medseg", "totalsegmentator")
MODALITIES = ("auto", "ct", "other")


def ct_statistics_files(
    image: str | Path,
    seg: str | Path,
    output: str | Path,
    *,
    class_map: str | Path | dict | None = None,
    model: str | Path | None = None,
    fmt: str = "medseg",
    erode_mm: float = 0.0,
    exclude_masks_at_border: bool = True,
    metric: str = "mean",
    modality: str = "auto",
    overwrite: bool = False,
) -> dict:
    """Read ``image`` and ``seg`` (any format medseg reads), write statistics to ``output``.

    ``fmt="medseg"`` writes JSON plus a CSV beside it (one row per structure);
    ``fmt="totalsegmentator"`` writes TotalSegmentator's ``statistics.json`` layout exactly.
    Structure names: the model's (``model``, or recorded by ``medseg predict`` beside ``seg``),
    which ``class_map`` must fit, or ``class_map`` alone; every value of ``seg`` must be named
    (:func:`medseg.ct.class_maps.class_map_for_label_map`). ``modality``: ``ct`` reports HU,
    ``other`` the image's own units, ``auto`` decides from the image (air near -1000 means CT).
    """
    from medseg.ct.class_maps import class_map_for_label_map
    from medseg.errors import DatasetError
    from medseg.io.image import check_writable_dir, read_image
    from medseg.outputs import check_new_outputs

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, not {modality!r}")
    output = Path(output)
    check_writable_dir(output.parent)
    check_new_outputs([output] + ([output.with_suffix(".csv")] if fmt == "medseg" else []), overwrite=overwrite)
    labels = class_map_for_label_map(class_map, seg, model=model)
    ct, ct_meta = read_image(image)
    lab, lab_meta = read_image(seg)
    if lab.shape != ct.shape:
        raise DatasetError(seg, f"label shape {lab.shape} differs from the image's {ct.shape} ({image})")
    if not np.allclose(lab_meta.spacing, ct_meta.spacing, rtol=1e-3, atol=1e-4):
        raise DatasetError(seg, f"label spacing {lab_meta.spacing} differs from the image's {ct_meta.spacing}")
    if lab.dtype.kind == "f" and not np.array_equal(lab, np.round(lab)):
        raise DatasetError(seg, "label map holds non-integer values")
    if modality == "auto":
        from medseg.apps.ct_tool import looks_like_ct

        hounsfield = looks_like_ct(ct)
        if not hounsfield:
            print(
                f"medseg: warning: {image}: not a CT in HU (no air near -1000); intensities are in the image's "
                "own units (intensity_* fields; --modality ct if it is a CT)",
                file=sys.stderr,
            )
    else:
        hounsfield = modality == "ct"
    return write_statistics(
        ct,
        lab,
        ct_meta.spacing,
        labels,
        output,
        fmt=fmt,
        erode_mm=erode_mm,
        exclude_masks_at_border=exclude_masks_at_border,
        metric=metric,
        sources={"image": str(image), "seg": str(seg)},
        seg_name=str(seg),
        hounsfield=hounsfield,
    )


def write_statistics(
    ct: np.ndarray,
    seg: np.ndarray,
    spacing,
    labels: dict[str, int],
    output: Path,
    *,
    fmt: str = "medseg",
    erode_mm: float = 0.0,
    exclude_masks_at_border: bool = True,
    metric: str = "mean",
    sources: dict | None = None,
    seg_name: str = "label map",
    hounsfield: bool = True,
) -> dict:
    """Statistics of arrays already in memory, written as ``fmt`` (see :func:`ct_statistics_files`).

    ``hounsfield``: the image is a CT in HU (fields ``hu_*``); False: ``intensity_*`` fields."""
    from medseg.ct.class_maps import unnamed_values_problem
    from medseg.ct.statistics import structure_statistics, totalsegmentator_statistics
    from medseg.errors import DatasetError
    from medseg.io.jsonio import write_text_atomic

    seg = seg.astype(np.int64, copy=False)
    problem = unnamed_values_problem(seg, labels)  # they would silently drop out of the table
    if problem:
        raise DatasetError(seg_name, problem)
    if fmt == "totalsegmentator":
        stats = totalsegmentator_statistics(
            ct, seg, spacing, labels, exclude_masks_at_border=exclude_masks_at_border, metric=metric
        )
        write_text_atomic(output, json.dumps(stats, indent=4))
        return stats
    stats = structure_statistics(
        ct, seg, spacing, labels, erode_mm=erode_mm, prefix="hu" if hounsfield else "intensity"
    )
    unit = "HU" if hounsfield else "image units (not a CT in HU)"
    doc = {**(sources or {}), "spacing_zyx_mm": list(spacing), "intensity_unit": unit, "erode_mm": erode_mm}
    doc["structures"] = stats
    write_text_atomic(output, json.dumps(doc, indent=2) + "\n")
    buf = io.StringIO()
    fields = ["structure"] + list(next(iter(stats.values())).keys()) if stats else ["structure"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for name, row in stats.items():
        writer.writerow({"structure": name} | {k: "" if v is None else v for k, v in row.items()})
    write_text_atomic(output.with_suffix(".csv"), buf.getvalue())
    return stats
