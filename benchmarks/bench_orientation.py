"""Canonical orientation on scans stored in another voxel order: the bundled hippocampus model
(trained on R-A-S crops) on the 80 IXI crops (stored P-S-R), with the plan's orientation (RAS)
and with reorientation forced off (None, the behaviour before plan schema 2).

Scored as the IXI masks are defined (whole hippocampus): Dice of the union of the predicted labels
(> 0) against the mask, per case, in each case's own voxel grid. Writes a JSON report.

    .venv/bin/python benchmarks/bench_orientation.py [--data DIR] [--no-tta] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from medseg.utils import cpu_description

REPO = Path(__file__).resolve().parents[1]


def _commit() -> str:
    run = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return run.stdout.strip() + (" (+ uncommitted changes in the tree)" if dirty else "")


def _union_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    p, r = pred > 0, ref > 0
    return float(2 * (p & r).sum() / max(p.sum() + r.sum(), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ixi_hippocampus_target")
    ap.add_argument(
        "--no-tta", action="store_true", help="predict without mirror TTA (default: TTA, as medseg predict)"
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "orientation.json")
    args = ap.parse_args()

    from medseg.inference.predictor import Predictor
    from medseg.io.image import read_image
    from medseg.preprocessing.orientation import orientation_code

    planned = Predictor.from_folder("hippocampus", device="cpu", tta=not args.no_tta)
    weights = {f: m.state_dict() for f, m in zip(planned.folds, planned.models)}
    spec_off = replace(planned.spec, plan=replace(planned.spec.plan, orientation=None))
    predictors = {
        str(planned.plan.orientation): planned,
        "None": Predictor(spec_off, weights, device="cpu", tta=not args.no_tta),
    }
    images = sorted((args.data / "imagesTr").glob("*_0000.nii.gz"))
    if not images:
        raise SystemExit(f"no images in {args.data / 'imagesTr'}")
    per_case, codes, t0 = {}, {}, time.perf_counter()
    for n, path in enumerate(images, 1):
        case = path.name[: -len("_0000.nii.gz")]
        image, meta = read_image(path)
        ref, _ = read_image(args.data / "labelsTr" / f"{case}.nii.gz")
        codes[orientation_code(meta.direction)] = codes.get(orientation_code(meta.direction), 0) + 1
        per_case[case] = {}
        for name, predictor in predictors.items():
            seg, _ = predictor.predict_array(image[None].astype(np.float32), meta)
            assert seg.shape == ref.shape
            per_case[case][name] = round(_union_dice(seg, ref), 4)
        print(
            f"[{n}/{len(images)}] {case}: " + "  ".join(f"{k}: {v:.3f}" for k, v in per_case[case].items()), flush=True
        )
    summary = {}
    for name in predictors:
        d = np.array([per_case[c][name] for c in per_case])
        summary[name] = {"mean": round(float(d.mean()), 4), "median": round(float(np.median(d)), 4),
                         "min": round(float(d.min()), 4), "max": round(float(d.max()), 4)}  # fmt: skip
    report = {
        "benchmark": "orientation",
        "command": "python benchmarks/bench_orientation.py" + (" --no-tta" if args.no_tta else ""),
        "model": "hippocampus (bundled)",
        "data": str(args.data),
        "num_cases": len(per_case),
        "input_orientations": codes,
        "tta": not args.no_tta,
        "metric": "Dice of union of predicted labels (>0) vs mask, input grid",
        "summary": summary,
        "per_case": per_case,
        "seconds": round(time.perf_counter() - t0, 1),
        "cpu": cpu_description(),
        "medseg_commit": _commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("num_cases", "input_orientations", "summary", "seconds")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
