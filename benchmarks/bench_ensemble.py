"""What an ensemble of folds costs a user: `medseg predict` with one fold (`-f 0`) against every fold
of a model folder, on the demo's three sample MRIs and on a folder of real cases, each a fresh
process (start-up, model loading, TTA and writing included, as a user runs it); plus the size on
disk of the weights, and the model's cross-validation (MODEL/crossval/summary.json, written by
`medseg crossval`) when there is one.

    .venv/bin/python benchmarks/bench_ensemble.py -m runs/hippocampus_cv5 [--cases 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from _common import (
    REPO,
    add_common_args,
    default_data_root,
    fmt,
    guard_busy,
    header_lines,
    log,
    machine_info,
    median,
    medseg_python,
    run_measured,
    write_results,
)  # fmt: skip


def _folder(data: Path, n: int, dst: Path) -> Path:
    """The first ``n`` images of ``data/imagesTr`` copied to ``dst`` (the shared source is only read)."""
    dst.mkdir(parents=True, exist_ok=True)
    for img in sorted((data / "imagesTr").glob("*_0000.nii.gz"))[:n]:
        shutil.copyfile(img, dst / img.name)
    return dst


def _time(model: Path, folds: list[str], images: Path, out: Path, repeats: int, log_file: Path) -> dict:
    cli = [str(medseg_python()), "-m", "medseg", "predict", "-m", str(model), "-i", str(images)]
    cli += [a for f in folds for a in ("-f", f)]
    runs = [run_measured([*cli, "-o", str(out / str(r)), "--overwrite"], log_file=log_file) for r in range(repeats)]
    return {"wall_s": median([r["wall_s"] for r in runs]), "rss_mb": max(r["tree_rss_mb"] for r in runs)}


def _unseen_dice(model: Path, folds: list[str], data: Path) -> dict[str, float]:
    """Mean Dice of the union of predicted labels against ``data``'s masks (cases no fold trained
    on, e.g. another site's whole-hippocampus masks) for each fold alone and for the ensemble."""
    import numpy as np

    from medseg.inference.predictor import Predictor
    from medseg.io.image import read_image

    predictors = {f"fold {f}": Predictor.from_folder(model, folds=[f]) for f in folds}
    predictors[f"{len(folds)}-fold ensemble"] = Predictor.from_folder(model, folds=folds)
    dice = {k: [] for k in predictors}
    for path in sorted((data / "imagesTr").glob("*_0000.nii.gz")):
        image, meta = read_image(path)
        ref = read_image(data / "labelsTr" / path.name.replace("_0000.nii.gz", ".nii.gz"))[0] > 0
        for name, predictor in predictors.items():
            seg = predictor.predict_array(image[None].astype(np.float32), meta)[0] > 0
            dice[name].append(2 * (seg & ref).sum() / max(seg.sum() + ref.sum(), 1))
    log(f"unseen cases: {len(dice[name])} from {data}")
    return {k: float(np.mean(v)) for k, v in dice.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", type=Path, required=True, help="Model folder with several folds.")
    ap.add_argument("--data", type=Path, default=default_data_root() / "msd_hippocampus")
    ap.add_argument("--cases", type=int, default=20, help="Images in the folder run.")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--unseen", type=Path, default=default_data_root() / "ixi_hippocampus_target",
                    help="Cases no fold trained on, scored by the Dice of the union of labels ('' to skip).")  # fmt: skip
    add_common_args(ap, workdir_default="medseg_bench_ensemble")
    args = ap.parse_args()
    info = machine_info()
    guard_busy(info, args.allow_busy, args.quick)
    sys.path.insert(0, str(REPO))
    from medseg.evaluation.crossval import numeric_folds

    folds = list(numeric_folds(args.model))
    n = 2 if args.quick else args.cases
    inputs = {
        "demo: 3 sample MRIs (examples/hippocampus)": REPO / "examples" / "hippocampus" / "images",
        f"folder: {n} MSD hippocampus MRIs": _folder(args.data, n, args.workdir / "images"),
    }
    lines = header_lines("Fold ensemble vs one fold: time and memory of `medseg predict`", info, {}, args.quick)
    lines += ["| input | folds | wall time (s) | peak RSS (MB) | vs one fold |", "|---|---|---:|---:|---:|"]
    for what, images in inputs.items():
        one = _time(args.model, [folds[0]], images, args.workdir / "one", args.repeats, args.workdir / "log.txt")
        log(f"{what}: one fold {one['wall_s']:.1f} s")
        every = _time(args.model, folds, images, args.workdir / "all", args.repeats, args.workdir / "log.txt")
        log(f"{what}: {len(folds)} folds {every['wall_s']:.1f} s")
        lines.append(f"| {what} | 1 (`-f {folds[0]}`) | {fmt(one['wall_s'], 1)} | {fmt(one['rss_mb'], 0)} | 1.00× |")
        ratio = every["wall_s"] / one["wall_s"]
        lines.append(
            f"| {what} | {len(folds)} | {fmt(every['wall_s'], 1)} | {fmt(every['rss_mb'], 0)} | {ratio:.2f}× |"
        )
    size = {f: (args.model / f"fold_{f}" / "model.safetensors").stat().st_size / 1e6 for f in folds}
    lines += [
        "",
        f"Weights on disk: {size[folds[0]]:.1f} MB per fold, {sum(size.values()):.1f} MB for {len(folds)} folds.",
    ]
    cv = args.model / "crossval" / "summary.json"
    if cv.is_file():
        s = json.loads(cv.read_text())
        per = ", ".join(f"{k} {v['dice']:.4f}" for k, v in s["mean"].items())
        lines.append(
            f"Cross-validation ({s['num_cases']} cases): mean Dice {s['foreground_mean']['dice']:.4f} ({per})."
        )
    if (args.unseen / "imagesTr").is_dir():
        lines += ["", f"Accuracy on cases no fold trained on (`{args.unseen.name}`, Dice of the union of labels):", ""]
        lines += ["| model | mean Dice |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in _unseen_dice(args.model, folds, args.unseen).items()]
    write_results("ensemble", lines, args.quick, args.out)


if __name__ == "__main__":
    main()
