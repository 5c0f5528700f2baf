#!/usr/bin/env python3
"""Accuracy at equal wall-clock budget: nnU-Net v2 and medseg trained for the same minutes on this machine.

Both frameworks train on the same training cases of MSD hippocampus (208 cases; a seeded split
holds out ``--test-cases`` cases, default 42, written as ``splits_final.json`` fold 0 for both
tools), each with its own default plan, for ``--budget`` minutes of training (default 18: one
epoch of nnU-Net's default schedule on 2 cores). Each tool then predicts the held-out cases the
way it does after training (its final validation, mirror TTA) and both prediction folders are
scored by the same code (``medseg evaluate``: Dice, HD95 per class, native geometry).

How the budget is applied, the same for both: epochs of ``--iterations`` (default 50) iterations,
with each tool's per-epoch validation batches scaled down in its default proportion (nnU-Net 50
per 250 iterations -> 10, medseg 20 per 250 -> 4);
after the first epoch the number of epochs is set to what fits in the budget, so that the poly
learning-rate schedule reaches its end when the time does (a user who has 18 minutes would do
the same; nnU-Net's default 1000-epoch schedule cut after 18 minutes stays at lr ~0.01).

  peer:   nnUNetv2_plan_and_preprocess -d 4 -c 3d_fullres; nnUNetv2_train 4 3d_fullres 0
          -tr nnUNetTrainer_MedsegBudget -device cpu   (nnUNetTrainer + the budget above)
  medseg: medseg plan / preprocess; medseg train -f 0 --time-budget MIN --iterations 50

Planning and preprocessing are not part of the budget (bench_preprocess.py times them); the
final validation (prediction of the held-out cases) is not either.

    python3 benchmarks/bench_accuracy.py [--budget 18] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_preprocess import NNUNET_CHECK, make_raw  # noqa: E402

NAME = "accuracy"
DS_ID, DS_NAME = 4, "Hippocampus"
TRAINER = "nnUNetTrainer_MedsegBudget"
TRAINER_SOURCE = '''"""Written by medseg's benchmarks/bench_accuracy.py: nnUNetTrainer on a wall-clock budget."""
import json
import os
import time

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class {name}(nnUNetTrainer):
    """After the first epoch, num_epochs (and the poly schedule's length) = what fits in the budget."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = int(os.environ["MEDSEG_BENCH_ITERS"])
        # validation batches in nnU-Net's default proportion (50 per 250 training iterations)
        self.num_val_iterations_per_epoch = max(1, round(50 * self.num_iterations_per_epoch / 250))
        self.budget_s = 60 * float(os.environ["MEDSEG_BENCH_BUDGET_MIN"])

    def plot_network_architecture(self):
        pass

    def run_training(self):
        self.on_train_start()
        t_start = time.time()
        while self.current_epoch < self.num_epochs:
            t0 = time.time()
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val = [self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val)
            self.on_epoch_end()
            if self.current_epoch == 1:
                # the nearest whole number of epochs (nnU-Net's epochs are long: flooring could waste most of one)
                self.num_epochs = max(1, round(self.budget_s / (time.time() - t0)))
                self.lr_scheduler.max_steps = self.num_epochs
                self.print_to_log_file(f"time budget: {{self.num_epochs}} epochs")
        train_s = time.time() - t_start
        self.on_train_end()
        with open(os.path.join(self.output_folder, "budget_run.json"), "w") as fh:
            json.dump({{"epochs": self.num_epochs, "iterations_per_epoch": self.num_iterations_per_epoch,
                       "batch_size": self.batch_size, "train_seconds": round(train_s, 1)}}, fh)
'''


def split(names: list[str], n_test: int) -> tuple[list[str], list[str]]:
    shuffled = sorted(names)
    random.Random(2024).shuffle(shuffled)
    return sorted(shuffled[n_test:]), sorted(shuffled[:n_test])


def run_nnunet(args, nn_py: Path, raw_root: Path, splits: list[dict], logs: Path) -> dict:
    work = args.workdir / "nnunet"
    pre, res = work / "nnUNet_preprocessed", work / "nnUNet_results"
    for p in (pre, res):
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
    env = {**os.environ, "nnUNet_raw": str(raw_root), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(res),
           "nnUNet_compile": "f", "MEDSEG_BENCH_ITERS": str(args.iterations),
           "MEDSEG_BENCH_BUDGET_MIN": str(args.budget)}  # fmt: skip
    site = next((nn_py.parent.parent / "lib").glob("python*/site-packages/nnunetv2"))
    (site / "training" / "nnUNetTrainer" / f"{TRAINER}.py").write_text(TRAINER_SOURCE.format(name=TRAINER))
    b = nn_py.parent
    C.log("nnU-Net: plan + preprocess (not timed)")
    C.run_measured([b / "nnUNetv2_plan_and_preprocess", "-d", DS_ID, "-c", "3d_fullres", "--no_pbar"], env=env,
                   log_file=logs / "nnunet.log")  # fmt: skip
    (pre / f"Dataset{DS_ID:03d}_{DS_NAME}" / "splits_final.json").write_text(json.dumps(splits))
    C.log(f"nnU-Net: training for {args.budget} min + its final validation")
    run = C.run_measured([b / "nnUNetv2_train", DS_ID, "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"], env=env,
                         log_file=logs / "nnunet.log")  # fmt: skip
    fold = res / f"Dataset{DS_ID:03d}_{DS_NAME}" / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    info = json.loads((fold / "budget_run.json").read_text())
    plans = json.loads((pre / f"Dataset{DS_ID:03d}_{DS_NAME}" / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    info.update(run=run, pred=str(fold / "validation"), patch=cfg["patch_size"],
                features=cfg["architecture"]["arch_kwargs"]["features_per_stage"])  # fmt: skip
    return info


def run_medseg(args, raw: Path, splits: list[dict], logs: Path) -> dict:
    ws, out = args.workdir / "medseg_ws", args.workdir / "medseg_model"
    for p in (ws, out):
        shutil.rmtree(p, ignore_errors=True)
    medseg = C.medseg_python().parent / "medseg"
    C.log("medseg: plan + preprocess (not timed)")
    C.run_measured([medseg, "plan", raw, "-w", ws], log_file=logs / "medseg.log")
    C.run_measured([medseg, "preprocess", raw, "-w", ws], log_file=logs / "medseg.log")
    plan_file = next(ws.glob("preprocessed/*/plan.json"))
    (plan_file.parent / "splits_final.json").write_text(json.dumps(splits))
    C.log(f"medseg: training for {args.budget} min + its final validation")
    val_its = max(1, round(20 * args.iterations / 250))  # medseg's default proportion (20 per 250)
    run = C.run_measured([medseg, "train", raw, "-w", ws, "-f", "0", "--time-budget", args.budget, "--iterations",
                          args.iterations, "--val-iterations", val_its, "-o", out],
                         log_file=logs / "medseg.log")  # fmt: skip
    history = [json.loads(x) for x in (out / "fold_0" / "training_log.jsonl").read_text().splitlines() if x]
    cfg = json.loads(plan_file.read_text())["configurations"]["3d_fullres"]
    return {"epochs": len(history), "iterations_per_epoch": args.iterations, "batch_size": cfg.get("batch_size"),
            "train_seconds": round(sum(h["seconds"] for h in history), 1), "run": run,
            "pred": str(out / "fold_0" / "validation"), "patch": cfg.get("patch_size"),
            "features": cfg.get("model_kwargs", {}).get("features")}  # fmt: skip


def evaluate(pred: str, raw: Path, logs: Path, tag: str) -> dict:
    out = logs.parent / f"eval_{tag}.json"
    C.run_measured([C.medseg_python().parent / "medseg", "evaluate", "--pred", pred, "--ref", raw / "labelsTr",
                    "--labels", raw / "dataset.json", "-o", out], log_file=logs / "evaluate.log")  # fmt: skip
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(ap, workdir_default="medseg_bench_accuracy")
    ap.add_argument("--data", type=Path, default=C.default_data_root())
    ap.add_argument("--budget", type=float, default=18.0, help="training minutes per framework")
    ap.add_argument("--iterations", type=int, default=50, help="iterations per epoch (both)")
    ap.add_argument("--test-cases", type=int, default=42)
    ap.add_argument("--cases", type=int, default=None, help="use only the first N cases (default: all 208)")
    ap.add_argument("--only", choices=("nnunet", "medseg"), default=None, help="run one side (debugging)")
    args = ap.parse_args()
    if args.quick:
        args.budget, args.iterations, args.test_cases, args.cases = 1.0, 5, 4, 16
        args.workdir = args.workdir.with_name(args.workdir.name + "_quick")
    info = C.machine_info()
    C.guard_busy(info, args.allow_busy, args.quick)
    nn_py = C.ensure_venv("nnunetv2", NNUNET_CHECK, rebuild=args.rebuild_venv)
    logs = args.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    raw_root = args.workdir / "nnUNet_raw"
    raw = raw_root / f"Dataset{DS_ID:03d}_{DS_NAME}"
    make_raw(args.data / "msd_hippocampus", raw, args.cases)
    names = sorted(p.name[: -len(".nii.gz")] for p in (raw / "labelsTr").glob("*.nii.gz"))
    train, test = split(names, args.test_cases)
    splits = [{"train": train, "val": test}]
    results = {}
    sides = [args.only] if args.only else ["nnunet", "medseg"]
    for side in sides:
        r = run_nnunet(args, nn_py, raw_root, splits, logs) if side == "nnunet" else run_medseg(args, raw, splits, logs)
        r["eval"] = evaluate(r["pred"], raw, logs, side)
        results[side] = r
    (args.workdir / "results.json").write_text(json.dumps(results, indent=1))
    versions = {
        "nnunetv2 env": C.package_versions(nn_py, ["nnunetv2", "torch"]),
        "medseg env": C.package_versions(C.medseg_python(), ["torch", "numpy"]),
    }
    lines = C.header_lines("Accuracy at equal wall-clock budget: nnU-Net v2 vs medseg", info, versions, args.quick)
    lines += [
        f"* MSD hippocampus: {len(train)} training cases, {len(test)} held-out test cases (seeded split, the same "
        f"`splits_final.json` fold 0 for both); training budget **{args.budget:g} min** per framework, epochs of "
        f"{args.iterations} iterations, number of epochs fitted to the budget after the first one (poly LR ends "
        "with the budget); each tool's default plan and augmentation; predictions of the held-out cases = each "
        "tool's final validation (mirror TTA), scored by `medseg evaluate` (native geometry)",
        "",
        "| framework | plan (patch, batch, features) | epochs x its | training s | mean Dice | Anterior Dice "
        "| Posterior Dice | mean HD95 mm | peak PSS GiB (whole run) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side in sides:
        r, m = results[side], results[side]["eval"]["mean"]
        names_ = list(m)
        dice = [m[k]["dice"] for k in names_]
        hd = [m[k]["hd95"] for k in names_ if m[k]["hd95"] is not None]
        lines.append(
            f"| {'nnU-Net v2' if side == 'nnunet' else 'medseg'} | {r['patch']}, {r['batch_size']}, {r['features']} "
            f"| {r['epochs']} x {r['iterations_per_epoch']} | {r['train_seconds']:.0f} | {sum(dice) / len(dice):.4f} | "
            + " | ".join(f"{d:.4f}" for d in dice)
            + f" | {f'{sum(hd) / len(hd):.2f}' if hd else 'n/a'} | {r['run']['tree_pss_mb'] / 1024:.2f} |"
        )
    C.write_results(NAME, lines, args.quick, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
