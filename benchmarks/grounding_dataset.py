"""A grounding dataset (docs/grounding.md) from the 51 real FDG-PET sarcoma crops of sts_fdg_petct.

    python benchmarks/grounding_dataset.py -o workspace/grounding/sts [--per-lesion 3] [--labels gtv|weak]

Writes, with symlinks into ../shared/data/sts_fdg_petct (nothing copied):
``imagesTr/<case>_0000.nii.gz`` = the PET (SUV; PET only, because 15 of the 51 crops have no CT),
``sentences.csv`` = ``--per-lesion`` sentences per lesion from :mod:`medseg.reports.generate`
(GENERATED report-style sentences built from each lesion's measured SUVmax and the image number of
its SUVmax voxel, never clinical text; the ``source`` column says so), and ``labelsTr/<id>.nii.gz``:
the manual GTV of the case (``--labels gtv``) or the weak label made from the sentence's facts
(``--labels weak``; sentences without one are left out and counted).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "sts_fdg_petct"


def _link(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.symlink_to(src.resolve())


def build(data: Path, out: Path, *, per_lesion: int = 3, labels: str = "gtv", seed: int = 0) -> dict:
    from medseg.reports.generate import generate_sentences, lesion_facts

    facts = lesion_facts(data)
    rows = generate_sentences(facts, per_lesion=per_lesion, seed=seed)
    pet = {f["case"]: Path(f["pet"]) for f in facts}
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for case, path in pet.items():
        _link(path, out / "imagesTr" / f"{case}_0000.nii.gz")
    kept, dropped = [], []
    for row in rows:
        target = out / "labelsTr" / f"{row['id']}.nii.gz"
        if labels == "gtv":
            gtv = path_of_label(data, pet[row["case"]])
            _link(gtv, target)
        elif not weak_label_file(pet[row["case"]], row, target):
            dropped.append(row["id"])
            continue
        kept.append(row)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["id", "case", "sentence", "suvmax", "image", "generated", "source"])
    writer.writeheader()
    writer.writerows(kept)
    (out / "sentences.csv").write_text(buf.getvalue())
    meta = {"name": "sts_fdg_petct_grounding", "channel_names": {"0": "PET"}, "labels": {"background": 0,
            "lesion": 1}, "numTraining": len(kept), "file_ending": ".nii.gz", "text_encoder": "minilm",
            "note": f"generated sentences (medseg.reports.generate), labels: {labels}; symlinks into {data}"}  # fmt: skip
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    return {"cases": len(pet), "sentences": len(kept), "dropped": dropped}


def path_of_label(data: Path, pet: Path) -> Path:
    split = "labelsTr" if pet.parent.name == "imagesTr" else "labelsTs_petonly"
    return data / split / pet.name.replace("_0001.nii.gz", ".nii.gz")


def weak_label_file(pet_path: Path, row: dict, target: Path) -> bool:
    from medseg.io.image import read_image, write_image
    from medseg.reports.weak_label import weak_label

    pet, meta = read_image(pet_path)
    result = weak_label(pet.astype("float32"), meta, float(row["suvmax"]), int(row["image"]))
    if result.mask is None or not result.mask.any():
        return False
    write_image(result.mask.astype("uint8"), meta, target)
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--per-lesion", type=int, default=3)
    ap.add_argument("--labels", choices=["gtv", "weak"], default="gtv")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if args.output.exists():
        if not args.overwrite:
            raise SystemExit(f"{args.output} exists (use --overwrite)")
        shutil.rmtree(args.output)
    print(build(args.data, args.output, per_lesion=args.per_lesion, labels=args.labels))


if __name__ == "__main__":
    main()
