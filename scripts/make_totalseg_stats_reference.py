"""Write TotalSegmentator's own statistics.json for the real CTs in
../shared/data/totalsegmentator_examples/ct_total, as a checked-in reference for
tests/test_ct_statistics.py (which then needs no TotalSegmentator at test time).

Run with a Python that can import ``totalsegmentator.statistics`` (TotalSegmentator from PyPI; its
statistics code needs only numpy, nibabel and tqdm, no weights), e.g.::

    pip download --no-deps TotalSegmentator==2.18.0 && unzip -q totalsegmentator-2.18.0-*.whl -d ts
    PYTHONPATH=ts python scripts/make_totalseg_stats_reference.py
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import nibabel as nib
import numpy as np
from totalsegmentator.statistics import get_basic_statistics

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "totalsegmentator_examples" / "ct_total"
OUT = REPO / "tests" / "fixtures" / "totalsegmentator_statistics"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        ts_version = version("TotalSegmentator")
    except PackageNotFoundError:  # unpacked wheel on PYTHONPATH
        import totalsegmentator

        ts_version = Path(totalsegmentator.__file__).parent.parent.name
    for image in sorted((DATA / "imagesTr").glob("*_0000.nii.gz")):
        case = image.name[: -len("_0000.nii.gz")]
        seg = nib.load(DATA / "labelsTr" / f"{case}.nii.gz").get_fdata().astype(np.uint8)
        for metric in ("mean", "median"):
            for exclude in (True, False):
                name = f"{case}__{metric}__{'exclude_border' if exclude else 'include_border'}.json"
                get_basic_statistics(
                    seg, image, OUT / name, quiet=True, task="total", exclude_masks_at_border=exclude, metric=metric
                )
                print("wrote", name)
    (OUT / "SOURCE.md").write_text(
        "# TotalSegmentator statistics references\n\n"
        f"Written by `scripts/make_totalseg_stats_reference.py` with `totalsegmentator.statistics."
        f"get_basic_statistics` ({ts_version}, task `total`) on the CTs and TotalSegmentator label maps in "
        "`../shared/data/totalsegmentator_examples/ct_total` (Apache-2.0, TotalSegmentator test files), "
        "for each `metric` (mean/median) and border rule (`exclude_masks_at_border` True/False).\n"
        "`tests/test_ct_statistics.py` checks that `medseg ct-stats --format totalsegmentator` writes the same.\n"
    )
    print(json.dumps(sorted(p.name for p in OUT.glob("*.json"))))


if __name__ == "__main__":
    main()
