"""Inlier segmentation and OOD localisation on LIDC nodules: plain U-Net vs mask transformer (MaxQuery).

Protocol (benchmarks/lidc_ood_split.py): train on the solid, non-calcified nodule VOIs of 169 patients;
test on the 100 solid VOIs of the held-out patients (inlier Dice) and on the 38 ground-glass and 54
calcified VOIs (OOD, never trained on; every patient with one is on the test side). Same plan (the
nnU-Net plan of the training VOIs, CT window -1000..1000 HU so that calcium is not clipped away), same
budget (epochs x iterations x batch), same seed, fold ``all``. Models:

* ``unet``: the plan's U-Net, Dice + CE with deep supervision; OOD by MSP / max-logit / entropy;
* ``maskformer``: ``maskformer_unet`` on the same U-Net, Dice + CE over decoder layers + QD loss
  (``--loss mask_dice_ce_qd``); OOD by the same baselines and by MaxQuery;
* ``maskformer_noqd``: the same without the QD loss (``--loss mask_dice_ce``, the task's default).

The mask transformers train with their task's recipe (AdamW 3e-4, weight decay 1e-4), the U-Net with
nnU-Net's (SGD 1e-2); same epochs x iterations x batch.

Pixel-level AUROC / AUPR / FPR95 (positives: the OOD lesion voxels; negatives: every other voxel of
the evaluated VOIs, inlier lesions included), for GGO and calcified nodules separately and together,
and the case-level AUROC from the maximum score per VOI. Also parameters and s/case of the two networks.

    .venv/bin/python benchmarks/bench_ood.py                  # ~60 min on 2 cores (trains 3 models)
    .venv/bin/python benchmarks/bench_ood.py --parts evaluate # reuse the trained models
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, header_lines, log, machine_info, medseg_python, package_versions, write_results  # noqa: E402

WORK = REPO / "workspace" / "lidc_ood"
WINDOW = "0=range:-1000,1000"
MODELS = {  # name -> extra `medseg train` options
    "unet": ["--arch", "unet"],
    "maskformer": ["--arch", "maskformer_unet", "--loss", "mask_dice_ce_qd"],
    "maskformer_noqd": ["--arch", "maskformer_unet", "--loss", "mask_dice_ce"],
}
SCORES = {"unet": ["msp", "maxlogit", "entropy"], "maskformer": ["maxquery", "msp", "maxlogit", "entropy"]}
SCORES["maskformer_noqd"] = SCORES["maskformer"]


def medseg(*args: str, log_file: Path | None = None) -> None:
    cmd = [str(medseg_python()), "-m", "medseg", *args]
    log(" ".join(cmd[2:]))
    with open(log_file, "a") if log_file else open("/dev/null", "w") as out:
        subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT if log_file else None, cwd=REPO)


def prepare(work: Path) -> dict:
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "lidc_ood_split.py"), "-o", str(work)], check=True)
    ws = work / "ws"
    if not (ws / "preprocessed" / "train" / "plan.json").exists():
        medseg("plan", str(work / "train"), "-w", str(ws), "--normalization", WINDOW)
    medseg("preprocess", str(work / "train"), "-w", str(ws))
    return json.loads((work / "split.json").read_text())


def train(work: Path, name: str, epochs: int, iterations: int) -> Path:
    out = work / "models" / name
    if (out / "fold_all" / "model.safetensors").exists() and not (out / "fold_all" / "training_state.pt").exists():
        return out  # trained (a finished run drops its resumable state)
    resume = ["--resume"] if out.exists() else []
    medseg(
        "train", str(work / "train"), "-w", str(work / "ws"), "-f", "all", *MODELS[name], "--epochs", str(epochs),
        "--iterations", str(iterations), "--checkpoint-every", "5", "--no-validation", "-o", str(out), *resume,
        log_file=work / f"train_{name}.log",
    )  # fmt: skip
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=["train", "evaluate"], choices=["train", "evaluate"])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--work", type=Path, default=WORK)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    split = prepare(args.work)
    if "train" in args.parts:
        for name in args.models:
            train(args.work, name, args.epochs, args.iterations)
    if "evaluate" in args.parts:
        from _ood_eval import evaluate_models  # noqa: E402

        results = evaluate_models(args.work, split, args.models, SCORES)
        info = machine_info()
        results.update(machine=info, seconds=round(time.perf_counter() - t0, 1),
                       recipe={"epochs": args.epochs, "iterations": args.iterations, "window": WINDOW})  # fmt: skip
        lines = header_lines("LIDC nodules: inlier Dice and OOD localisation", info,
                             {"medseg": package_versions(medseg_python(), ["torch"])}, False)  # fmt: skip
        write_results("ood", lines + results.pop("markdown"), False)
        (RESULTS / "ood.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
