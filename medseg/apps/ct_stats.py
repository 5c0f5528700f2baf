"""``medseg ct-stats``: per-structure volume and attenuation of a CT label map, from files."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np

FORMATS = ("medseg", "totalsegmentator")


def ct_statistics_files(
    image: str | Path,
    seg: str | Path,
    output: str | Path,
    *,
    class_map: str | Path | dict = "total",
    fmt: str = "medseg",
    erode_mm: float = 0.0,
    exclude_masks_at_border: bool = True,
    metric: str = "mean",
) -> dict:
    """Read ``image`` and ``seg`` (any format medseg reads), write statistics to ``output``.

    ``fmt="medseg"`` writes JSON plus a CSV beside it (one row per structure);
    ``fmt="totalsegmentator"`` writes TotalSegmentator's ``statistics.json`` layout exactly.
    """
    from medseg.ct.class_maps import load_class_map
    from medseg.errors import DatasetError
    from medseg.io.image import check_writable_dir, read_image

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    output = Path(output)
    check_writable_dir(output.parent)
    labels = load_class_map(class_map)
    ct, ct_meta = read_image(image)
    lab, lab_meta = read_image(seg)
    if lab.shape != ct.shape:
        raise DatasetError(seg, f"label shape {lab.shape} differs from the image's {ct.shape} ({image})")
    if not np.allclose(lab_meta.spacing, ct_meta.spacing, rtol=1e-3, atol=1e-4):
        raise DatasetError(seg, f"label spacing {lab_meta.spacing} differs from the image's {ct_meta.spacing}")
    if lab.dtype.kind == "f" and not np.array_equal(lab, np.round(lab)):
        raise DatasetError(seg, "label map holds non-integer values")
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
) -> dict:
    """Statistics of arrays already in memory, written as ``fmt`` (see :func:`ct_statistics_files`)."""
    from medseg.ct.statistics import structure_statistics, totalsegmentator_statistics
    from medseg.io.jsonio import write_text_atomic

    seg = seg.astype(np.int64, copy=False)
    unknown = sorted(set(np.unique(seg).tolist()) - {0} - set(labels.values()))
    if unknown:
        print(f"medseg: warning: {seg_name}: label values {unknown} are not in the class map; ignored", file=sys.stderr)
    if fmt == "totalsegmentator":
        stats = totalsegmentator_statistics(
            ct, seg, spacing, labels, exclude_masks_at_border=exclude_masks_at_border, metric=metric
        )
        write_text_atomic(output, json.dumps(stats, indent=4))
        return stats
    stats = structure_statistics(ct, seg, spacing, labels, erode_mm=erode_mm)
    doc = {**(sources or {}), "spacing_zyx_mm": list(spacing), "erode_mm": erode_mm, "structures": stats}
    write_text_atomic(output, json.dumps(doc, indent=2) + "\n")
    buf = io.StringIO()
    fields = ["structure"] + list(next(iter(stats.values())).keys()) if stats else ["structure"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for name, row in stats.items():
        writer.writerow({"structure": name} | {k: "" if v is None else v for k, v in row.items()})
    write_text_atomic(output.with_suffix(".csv"), buf.getvalue())
    return stats
