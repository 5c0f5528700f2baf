"""The LIDC nodule OOD protocol: inlier / OOD groups from the radiologists' ratings, a patient split,
and dataset folders (symlinks to ``../shared/data/lidc_nodule_vois``, nothing copied) for training and
evaluation.

Groups (max-voting ratings in ``nodules.csv``): ``solid`` = Texture 5 and Calcification 6 (the inliers);
``calcified`` = Calcification < 6; ``ggo`` = Texture 1-2 (non-solid / ground-glass) and not calcified;
``part_solid`` = Texture 3-4, not calcified: neither inlier nor tail condition, used nowhere.

Split by patient: every patient with an OOD nodule is on the test side (so no OOD VOI shares a patient
with a training VOI), plus a seeded 17 % of the other patients, whose solid nodules are the held-out
inliers. Training uses the solid nodules of the remaining patients only.

    python benchmarks/lidc_ood_split.py -o workspace/lidc_ood   # writes split.json + train/ test/ all_inliers/
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lidc_nodule_vois"
OOD_GROUPS = ("ggo", "calcified")


def nodule_group(row: dict) -> str:
    texture, calcification = int(row["Texture_value"]), int(row["Calcification_value"])
    if calcification < 6:
        return "calcified"
    if texture <= 2:
        return "ggo"
    return "solid" if texture == 5 else "part_solid"


def make_split(rows: list[dict], *, test_fraction: float = 0.17, seed: int = 0) -> dict:
    """``{"train": [cases], "test_inlier": [...], "test_ood": {case: group}}`` (sorted, reproducible)."""
    groups = {r["case"]: nodule_group(r) for r in rows}
    patients: dict[str, list[str]] = {}
    for r in rows:
        patients.setdefault(r["patient_id"], []).append(r["case"])
    with_ood = {p for p, cases in patients.items() if any(groups[c] in OOD_GROUPS for c in cases)}
    others = sorted(set(patients) - with_ood)
    random.Random(seed).shuffle(others)
    test_patients = with_ood | set(others[: round(test_fraction * len(others))])
    side = {c: p in test_patients for p, cases in patients.items() for c in cases}
    return {
        "train": sorted(c for c, g in groups.items() if g == "solid" and not side[c]),
        "test_inlier": sorted(c for c, g in groups.items() if g == "solid" and side[c]),
        "test_ood": {c: g for c, g in sorted(groups.items()) if g in OOD_GROUPS},
        "all_inliers": sorted(c for c, g in groups.items() if g == "solid"),
        "protocol": __doc__.split("\n\n")[1],
    }


def link_dataset(cases: list[str], src: Path, dst: Path) -> Path:
    """A dataset folder of symlinks (imagesTr/labelsTr + dataset.json) holding only ``cases``."""
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for c in cases:
        for sub, name in (("imagesTr", f"{c}_0000.nii.gz"), ("labelsTr", f"{c}.nii.gz")):
            link = dst / sub / name
            if not link.exists():
                link.symlink_to((src / sub / name).resolve())
    meta = json.loads((src / "dataset.json").read_text())
    meta.update(numTraining=len(cases), note=f"{len(cases)} LIDC nodule VOIs, symlinks into {src}")
    (dst / "dataset.json").write_text(json.dumps(meta, indent=2))
    return dst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", type=Path, required=True, help="folder for split.json and the datasets")
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args(argv)
    rows = list(csv.DictReader(open(args.data / "nodules.csv")))
    split = make_split(rows)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "split.json").write_text(json.dumps(split, indent=1))
    link_dataset(split["train"], args.data, args.output / "train")
    link_dataset(split["test_inlier"] + sorted(split["test_ood"]), args.data, args.output / "test")
    link_dataset(split["all_inliers"], args.data, args.output / "all_inliers")
    n_ood = {g: sum(v == g for v in split["test_ood"].values()) for g in OOD_GROUPS}
    print(f"train {len(split['train'])} solid VOIs; test {len(split['test_inlier'])} solid + {n_ood} OOD VOIs")


if __name__ == "__main__":
    main()
