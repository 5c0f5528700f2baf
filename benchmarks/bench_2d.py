#!/usr/bin/env python3
"""2D side by side: nnU-Net v2 `2d` and medseg `-c 2d` trained for the same minutes on BUSI and DRIVE.

For each dataset both tools train on the same training cases (the whole training set: fold
``all``) for ``--budget`` minutes of wall-clock training, predict the same test cases through
their CLIs (PNG in, PNG out, mirror TTA on as both default), and both prediction folders are
scored by the same code (``medseg evaluate``, i.e. ``medseg.evaluation.metrics.evaluate_folder``:
Dice per case and mean; DRIVE inside the field-of-view masks with ``--roi-masks``).

  BUSI  (../shared/data/busi_breast_ultrasound, 200 grayscale ultrasound PNGs): a fixed seeded
        160 train / 40 test split stratified by pathology (cases.csv), written to
        benchmarks/results/2d_busi_split.json.
  DRIVE (../shared/data/drive_retina_vessels, RGB fundus PNGs): the official 20 training /
        20 test images; evaluated inside the FOV (fovTs). The 2nd observer's masks, scored the
        same way against the 1st observer's, are reported as the human reference.

  peer:   nnUNetv2_plan_and_preprocess -d ID -c 2d
          nnUNetv2_train ID 2d all -tr nnUNetTrainer_MedsegBudget2D -device cpu
          nnUNetv2_predict -i imagesTs -o PRED -d ID -c 2d -f all -tr nnUNetTrainer_MedsegBudget2D -device cpu
  medseg: medseg plan RAW -w WS; medseg preprocess RAW -w WS -c 2d
          medseg train RAW -w WS -c 2d -f all --time-budget MIN --iterations 50 --val-iterations 4 --no-validation
          medseg predict -m MODEL -i imagesTs -o PRED
  both:   medseg evaluate --pred PRED --ref LABELS -l dataset.json [--roi-masks FOV]

The budget is applied as in bench_accuracy.py, the same for both tools: epochs of
``--iterations`` (default 50) iterations, per-epoch validation batches in each tool's default
proportion (nnU-Net 50 per 250 -> 10, medseg 20 per 250 -> 4); after the first epoch the number of
epochs is set to what fits in the budget, so the poly learning rate ends with the budget
(``medseg train --time-budget``; for nnU-Net a trainer subclass written into its environment,
``nnUNetTrainer`` otherwise at its defaults: plan, network, batch, augmentation with its default
number of worker processes, fp32 on CPU). One addition on nnU-Net's side: if its first epoch
would take more than a quarter of the budget (a large 2D patch and batch on a small CPU), that
epoch is ended there and every epoch gets that many iterations, so that at least ~4 epochs (and
the schedule's decay) fit instead of one epoch overrunning the budget. With fold ``all`` both
tools would "validate" on their own training cases at the end; that final validation is skipped on
both sides (nnU-Net: the subclass; medseg: ``--no-validation``): it changes nothing in the model.

Planning/preprocessing and prediction are timed but are not part of the budget.

    python3 benchmarks/bench_2d.py [--budget 8] [--datasets busi,drive] [--tools nnunet,medseg] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_preprocess import NNUNET_CHECK  # noqa: E402

NAME = "2d"
SPLIT_SEED = 2024
DATASETS = {  # key: (nnU-Net id, nnU-Net name, folder in the shared data root)
    "busi": (901, "BUSI", "busi_breast_ultrasound"),
    "drive": (902, "DRIVE", "drive_retina_vessels"),
}
TOOLS = ("nnunet", "medseg")
ENDING = ".png"
TRAINER = "nnUNetTrainer_MedsegBudget2D"
TRAINER_SOURCE = '''"""Written by medseg's benchmarks/bench_2d.py: nnUNetTrainer on a wall-clock budget (see there)."""
import json
import os
import time

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def _val_iterations(train_iterations):
    # validation batches in nnU-Net's default proportion (50 per 250 training iterations)
    return max(1, round(50 * train_iterations / 250))


class {name}(nnUNetTrainer):
    """After the first epoch, num_epochs (and the poly schedule's length) = what fits in the budget."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = int(os.environ["MEDSEG_BENCH_ITERS"])
        self.num_val_iterations_per_epoch = _val_iterations(self.num_iterations_per_epoch)
        self.budget_s = 60 * float(os.environ["MEDSEG_BENCH_BUDGET_MIN"])
        self.first_epoch_max_s = self.budget_s * float(os.environ.get("MEDSEG_BENCH_FIRST_EPOCH_FRACTION", "0.25"))
        self.epoch_seconds = []
        self.first_epoch_cut = False

    def plot_network_architecture(self):
        pass

    def run_training(self):
        self.on_train_start()
        t_start = time.time()
        while self.current_epoch < self.num_epochs:
            t0 = time.time()
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = []
            for i in range(self.num_iterations_per_epoch):
                outputs.append(self.train_step(next(self.dataloader_train)))
                last = i + 1 == self.num_iterations_per_epoch
                if self.current_epoch == 0 and not last and time.time() - t0 > self.first_epoch_max_s:
                    self.num_iterations_per_epoch = i + 1
                    self.num_val_iterations_per_epoch = _val_iterations(i + 1)
                    self.first_epoch_cut = True
                    self.print_to_log_file(f"time budget: epochs of {{i + 1}} iterations (slow first epoch)")
                    break
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val = [self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val)
            self.on_epoch_end()
            self.epoch_seconds.append(round(time.time() - t0, 2))
            if self.current_epoch == 1:
                # the nearest whole number of epochs (nnU-Net's epochs are long: flooring could waste most of one)
                self.num_epochs = max(1, round(self.budget_s / (time.time() - t0)))
                self.lr_scheduler.max_steps = self.num_epochs
                self.print_to_log_file(f"time budget: {{self.num_epochs}} epochs")
        train_s = time.time() - t_start
        self.on_train_end()
        with open(os.path.join(self.output_folder, "budget_run.json"), "w") as fh:
            json.dump({{"epochs": self.num_epochs, "iterations_per_epoch": self.num_iterations_per_epoch,
                       "val_iterations_per_epoch": self.num_val_iterations_per_epoch,
                       "first_epoch_cut": self.first_epoch_cut, "batch_size": self.batch_size,
                       "epoch_seconds": self.epoch_seconds, "train_seconds": round(train_s, 1),
                       "da_processes": self.num_processes_da if hasattr(self, "num_processes_da") else None}}, fh)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.fold == "all":  # fold 'all' would predict its own training cases: nothing to learn from it
            self.print_to_log_file("final validation skipped (fold all: the validation cases are the training cases)")
            return
        super().perform_actual_validation(save_probabilities)
'''


# ---------------------------------------------------------------------------- data


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk (standard library only)."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG")
    return struct.unpack(">II", head[16:24])


def busi_split(src: Path) -> dict:
    """Seeded 80/20 split stratified by pathology: 160 train / 40 test of the 200 cases."""
    by_class: dict[str, list[str]] = {}
    with open(src / "cases.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            by_class.setdefault(row["pathology"], []).append(row["case"])
    train, test = [], []
    for pathology in sorted(by_class):
        cases = sorted(by_class[pathology])
        random.Random(f"{SPLIT_SEED}-{pathology}").shuffle(cases)
        n_test = round(0.2 * len(cases))
        test += cases[:n_test]
        train += cases[n_test:]
    pathology_of = {c: p for p, cs in by_class.items() for c in cs}
    return {
        "seed": SPLIT_SEED,
        "stratified_by": "pathology (cases.csv)",
        "train": sorted(train),
        "test": sorted(test),
        "pathology": {c: pathology_of[c] for c in sorted(train + test)},
    }


def drive_split(src: Path) -> dict:
    names = lambda d: sorted(p.name[: -len(ENDING)] for p in (src / d).glob(f"*{ENDING}"))  # noqa: E731
    return {"official": "DRIVE training (21-40) / test (01-20)", "train": names("labelsTr"), "test": names("labelsTs")}


def quick_subset(split: dict, n_train: int, n_test: int, key=None) -> dict:
    """The first cases of the full split (per stratum when ``key`` gives one), for --quick."""

    def take(cases, n):
        if key is None:
            return cases[:n]
        groups: dict[str, list[str]] = {}
        for c in cases:
            groups.setdefault(key(c), []).append(c)
        per = max(1, n // len(groups))
        return sorted(c for g in groups.values() for c in g[:per])

    return {**split, "train": take(split["train"], n_train), "test": take(split["test"], n_test)}


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src.resolve())


def make_dataset(key: str, src: Path, split: dict, work: Path) -> dict:
    """nnU-Net raw folder (imagesTr/labelsTr = training cases, imagesTs = test cases) of per-file symlinks,
    read by both tools, plus the evaluation references (test labels, FOV masks, 2nd observer)."""
    ds_id, ds_name, _ = DATASETS[key]
    raw_root = work / "nnUNet_raw"
    raw = raw_root / f"Dataset{ds_id:03d}_{ds_name}"
    ref = work / "reference"
    for p in (raw, ref):
        shutil.rmtree(p, ignore_errors=True)
    ds = json.loads((src / "dataset.json").read_text())
    if ds.get("file_ending") != ENDING:
        raise SystemExit(f"{src}: expected file_ending {ENDING}, got {ds.get('file_ending')}")
    drive = key == "drive"
    for case in split["train"]:
        link(src / "imagesTr" / f"{case}_0000{ENDING}", raw / "imagesTr" / f"{case}_0000{ENDING}")
        link(src / "labelsTr" / f"{case}{ENDING}", raw / "labelsTr" / f"{case}{ENDING}")
    img_dir, lab_dir = ("imagesTs", "labelsTs") if drive else ("imagesTr", "labelsTr")
    for case in split["test"]:
        link(src / img_dir / f"{case}_0000{ENDING}", raw / "imagesTs" / f"{case}_0000{ENDING}")
        link(src / lab_dir / f"{case}{ENDING}", ref / "labels" / f"{case}{ENDING}")
        if drive:
            link(src / "fovTs" / f"{case}{ENDING}", ref / "fov" / f"{case}{ENDING}")
            link(src / "labelsTs_2nd_observer" / f"{case}{ENDING}", ref / "labels_2nd_observer" / f"{case}{ENDING}")
    out = {k: ds[k] for k in ("channel_names", "labels", "file_ending")}
    out["numTraining"] = len(split["train"])
    out["note"] = f"bench_2d.py: {len(split['train'])} training cases of {src.name}; imagesTs = the test cases"
    (raw / "dataset.json").write_text(json.dumps(out, indent=1))
    return {
        "raw_root": raw_root,
        "raw": raw,
        "id": ds_id,
        "name": f"Dataset{ds_id:03d}_{ds_name}",
        "labels": ref / "labels",
        "roi": ref / "fov" if drive else None,
        "second_observer": ref / "labels_2nd_observer" if drive else None,
    }


def check_outputs(pred: Path, images: Path, test: list[str]) -> dict:
    """Every test case predicted, as a PNG of its input's size."""
    missing, wrong = [], []
    for case in test:
        p = pred / f"{case}{ENDING}"
        if not p.is_file():
            missing.append(case)
            continue
        try:
            got, want = png_size(p), png_size(images / f"{case}_0000{ENDING}")
        except ValueError as e:
            wrong.append(f"{case}: {e}")
            continue
        if got != want:
            wrong.append(f"{case}: {got[0]}x{got[1]} != input {want[0]}x{want[1]}")
    return {"ok": not missing and not wrong, "missing": missing, "wrong_size": wrong}


# ---------------------------------------------------------------------------- tools


def run_nnunet(args, nn_py: Path, d: dict, work: Path, logs: Path) -> dict:
    base = work / "nnunet"
    shutil.rmtree(base, ignore_errors=True)
    pre, res, pred = base / "nnUNet_preprocessed", base / "nnUNet_results", base / "pred"
    for p in (pre, res):
        p.mkdir(parents=True)
    env = {**os.environ, "nnUNet_raw": str(d["raw_root"]), "nnUNet_preprocessed": str(pre),
           "nnUNet_results": str(res), "nnUNet_compile": "f", "MEDSEG_BENCH_ITERS": str(args.iterations),
           "MEDSEG_BENCH_BUDGET_MIN": str(args.budget)}  # fmt: skip
    env.pop("nnUNet_n_proc_DA", None)  # its default for this machine (min(12, cores))
    site = next((nn_py.parent.parent / "lib").glob("python*/site-packages/nnunetv2"))
    (site / "training" / "nnUNetTrainer" / f"{TRAINER}.py").write_text(TRAINER_SOURCE.format(name=TRAINER))
    b, log = nn_py.parent, logs / f"{work.name}_nnunet.log"
    log.unlink(missing_ok=True)
    C.log(f"{work.name} nnU-Net: plan + preprocess")
    prep = C.run_measured([b / "nnUNetv2_plan_and_preprocess", "-d", d["id"], "-c", "2d", "--no_pbar"], env=env,
                          log_file=log)  # fmt: skip
    plans = json.loads((pre / d["name"] / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["2d"]
    arch = cfg["architecture"]["arch_kwargs"]
    plan = {"patch": cfg["patch_size"], "batch": cfg["batch_size"], "features": arch["features_per_stage"],
            "network": cfg["architecture"]["network_class_name"].rsplit(".", 1)[-1],
            "normalization": cfg["normalization_schemes"], "median_shape": cfg.get("median_image_size_in_voxels")}  # fmt: skip
    C.log(f"{work.name} nnU-Net: plan {plan['patch']} batch {plan['batch']}; training for {args.budget:g} min")
    train = C.run_measured([b / "nnUNetv2_train", d["id"], "2d", "all", "-tr", TRAINER, "-device", "cpu"], env=env,
                           log_file=log)  # fmt: skip
    fold = res / d["name"] / f"{TRAINER}__nnUNetPlans__2d" / "fold_all"
    budget = json.loads((fold / "budget_run.json").read_text())
    C.log(f"{work.name} nnU-Net: {budget['epochs']} x {budget['iterations_per_epoch']} iterations; predicting")
    predict = C.run_measured([b / "nnUNetv2_predict", "-i", d["raw"] / "imagesTs", "-o", pred, "-d", d["id"], "-c",
                              "2d", "-f", "all", "-tr", TRAINER, "-device", "cpu"], env=env, log_file=log)  # fmt: skip
    try:
        import_params = _nnunet_params(nn_py, fold, env)
    except Exception:  # noqa: BLE001 - informative only
        import_params = None
    return {"plan": plan, "params": import_params, "preprocess": prep, "train": train, "predict": predict,
            "budget_run": budget, "epoch_seconds": budget["epoch_seconds"], "epochs": budget["epochs"],
            "iterations_per_epoch": budget["iterations_per_epoch"],
            "iterations": budget["epochs"] * budget["iterations_per_epoch"],  # a cut first epoch sets the length
            "train_seconds": budget["train_seconds"], "pred": str(pred), "log": str(log)}  # fmt: skip


def _nnunet_params(nn_py: Path, fold: Path, env: dict) -> int | None:
    # PlainConvUNet's decoder holds a reference to the encoder, so the state dict lists the encoder's
    # tensors twice (encoder.* and decoder.encoder.*): count each storage once
    code = ("import sys, torch; sd = torch.load(sys.argv[1], map_location='cpu', weights_only=False)['network_weights']; "
            "u = {v.data_ptr(): v.numel() for v in sd.values() if v.is_floating_point()}; print(sum(u.values()))")  # fmt: skip
    out = subprocess.run([str(nn_py), "-c", code, str(fold / "checkpoint_final.pth")], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    return int(out.stdout.strip()) if out.returncode == 0 else None


def run_medseg(args, d: dict, work: Path, logs: Path) -> dict:
    base = work / "medseg"
    shutil.rmtree(base, ignore_errors=True)
    ws, model, pred = base / "ws", base / "model", base / "pred"
    medseg, log = C.medseg_python().parent / "medseg", logs / f"{work.name}_medseg.log"
    log.unlink(missing_ok=True)
    C.log(f"{work.name} medseg: plan + preprocess")
    p1 = C.run_measured([medseg, "plan", d["raw"], "-w", ws], log_file=log)
    p2 = C.run_measured([medseg, "preprocess", d["raw"], "-w", ws, "-c", "2d"], log_file=log)
    prep = {"wall_s": p1["wall_s"] + p2["wall_s"], "plan_s": p1["wall_s"], "preprocess_s": p2["wall_s"],
            "tree_pss_mb": max(p1["tree_pss_mb"], p2["tree_pss_mb"])}  # fmt: skip
    plan_file = next(ws.glob("preprocessed/*/plan.json"))
    cfg = json.loads(plan_file.read_text())["configurations"]["2d"]
    plan = {"patch": cfg.get("patch_size"), "batch": cfg.get("batch_size"),
            "features": cfg.get("model_kwargs", {}).get("features"), "network": cfg.get("model"),
            "normalization": cfg.get("normalization")}  # fmt: skip
    C.log(f"{work.name} medseg: plan {plan['patch']} batch {plan['batch']}; training for {args.budget:g} min")
    val_its = max(1, round(20 * args.iterations / 250))  # medseg's default proportion (20 per 250)
    train = C.run_measured([medseg, "train", d["raw"], "-w", ws, "-c", "2d", "-f", "all", "--time-budget", args.budget,
                            "--iterations", args.iterations, "--val-iterations", val_its, "--no-validation", "-o",
                            model], log_file=log)  # fmt: skip
    history = [json.loads(x) for x in (model / "fold_all" / "training_log.jsonl").read_text().splitlines() if x]
    C.log(f"{work.name} medseg: {len(history)} x {args.iterations} iterations; predicting")
    predict = C.run_measured([medseg, "predict", "-m", model, "-i", d["raw"] / "imagesTs", "-o", pred], log_file=log)
    params = safetensors_params(model / "fold_all" / "model.safetensors")
    return {"plan": plan, "params": params, "preprocess": prep, "train": train, "predict": predict,
            "epochs": len(history), "iterations_per_epoch": args.iterations, "iterations": len(history) * args.iterations,
            "epoch_seconds": [h["seconds"] for h in history],
            "train_seconds": round(sum(h["seconds"] for h in history), 1), "pred": str(pred), "log": str(log)}  # fmt: skip


def safetensors_params(path: Path) -> int | None:
    """Parameter count from a safetensors header (8-byte length + JSON of shapes), standard library only."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error):
        return None
    total = 0
    for name, t in header.items():
        if name != "__metadata__" and t.get("dtype", "").startswith(("F", "BF")):
            size = 1
            for x in t["shape"]:
                size *= x
            total += size
    return total


MASK_CHECK = """
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
out = {}
for f in sorted(Path(sys.argv[1]).glob("*.png")):
    a = np.asarray(Image.open(f))
    out[f.name] = float((a > 0).mean())
print(json.dumps(out))
"""


def mask_fractions(folder: Path) -> dict[str, float]:
    """Foreground fraction of every PNG mask in ``folder`` (numpy + PIL from medseg's .venv)."""
    proc = subprocess.run([str(C.medseg_python()), "-c", MASK_CHECK, str(folder)], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def evaluate(pred: Path, d: dict, out: Path, log: Path) -> dict:
    """``medseg evaluate`` (evaluate_folder), inside the ROI masks where the dataset has them."""
    cmd = [C.medseg_python().parent / "medseg", "evaluate", "--pred", pred, "--ref", d["labels"], "-l",
           d["raw"] / "dataset.json", "-o", out]  # fmt: skip
    if d["roi"] is not None:
        cmd += ["--roi-masks", d["roi"]]
    out.unlink(missing_ok=True)
    try:
        C.run_measured(cmd, log_file=log)
    except RuntimeError as e:
        return {"error": str(e).strip().splitlines()[-1][:500], "log": str(log)}
    s = json.loads(out.read_text())
    label = next(iter(s["mean"]))  # one foreground class in both datasets
    per_case = {case: m[label]["dice"] for case, m in s["per_case"].items()}
    return {"file": str(out), "class": label, "mean_dice": s["mean"][label]["dice"],
            "median_dice": statistics.median(per_case.values()), "min_dice": min(per_case.values()),
            "mean_hd95": s["mean"][label]["hd95"], "num_cases": s["num_cases"], "per_case_dice": per_case,
            "roi": str(d["roi"]) if d["roi"] else None}  # fmt: skip


# ---------------------------------------------------------------------------- report


def lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _f(x, digits=4):
    return "n/a" if x is None else f"{x:.{digits}f}"


def report(args, info: dict, versions: dict, results: dict) -> list[str]:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in results["lscpu"].splitlines() if ln.startswith("Model name")), "?"
    )
    lines = C.header_lines("2D side by side: nnU-Net v2 `2d` vs medseg `-c 2d` at equal training time", info, versions,
                           args.quick)  # fmt: skip
    lines += [
        f"* lscpu model name: {cpu}; torch threads: all cores in both tools; nnU-Net augmentation workers: its "
        "default (min(12, cores))",
        f"* training budget **{args.budget:g} min** per tool and dataset, epochs of {args.iterations} iterations, "
        "number of epochs fitted after the first one (poly LR ends with the budget); fold `all` (all training "
        "cases); each tool's default plan, augmentation and precision; predictions with each tool's CLI defaults "
        "(mirror TTA); all scored by `medseg evaluate` (`evaluate_folder`)",
        "",
    ]
    for key, r in results["datasets"].items():
        sp = r["split"]
        roi = " inside the FOV masks" if key == "drive" else ""
        lines += [f"## {key.upper()}", "",
                  f"{len(sp['train'])} training / {len(sp['test'])} test cases "
                  + ("(seeded split stratified by pathology, `2d_busi_split.json`)" if key == "busi" else
                     "(official DRIVE split)") + f"; Dice{roi}.", "",
                  "| tool | plan: patch, batch, features | params | epochs x its (= iterations) | training s | "
                  "it/min | predict s (s/case) | mean Dice | median | min | peak PSS train / predict GiB | "
                  "outputs |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for tool in TOOLS:
            t = r.get(tool)
            if not t:
                continue
            if "error" in t:
                lines.append(f"| {tool} | failed: {t['error']} |" + " |" * 10)
                continue
            e, n = t.get("eval", {}), len(sp["test"])
            dice = (f"{_f(e.get('mean_dice'))} | {_f(e.get('median_dice'))} | {_f(e.get('min_dice'))}"
                    if "mean_dice" in e else f"eval failed: {e.get('error', '?')} | | ")  # fmt: skip
            its_min = t["iterations"] / (t["train_seconds"] / 60) if t["train_seconds"] else None
            p, params = t["plan"], f"{t['params'] / 1e6:.2f} M" if t.get("params") else "?"
            lines.append(
                f"| {'nnU-Net v2 `2d`' if tool == 'nnunet' else 'medseg `2d`'} | {p['patch']}, {p['batch']}, "
                f"{p['features']} | {params} | {t['epochs']} x {t['iterations_per_epoch']} (= {t['iterations']}) | {t['train_seconds']:.0f} | "
                f"{_f(its_min, 1)} | {t['predict']['wall_s']:.0f} ({t['predict']['wall_s'] / n:.2f}) | {dice} | "
                f"{t['train']['tree_pss_mb'] / 1024:.2f} / {t['predict']['tree_pss_mb'] / 1024:.2f} | "
                f"{'PNG, input size' if t['outputs']['ok'] else 'PROBLEM: ' + json.dumps(t['outputs'])[:200]} |"
            )
        if r.get("second_observer"):
            e = r["second_observer"]
            if "invalid" in e:
                lines.append(f"| 2nd human observer (vs 1st) | **not usable: {e['invalid']}** (Dice would read "
                             f"{_f(e.get('mean_dice'))}) |" + " |" * 10)  # fmt: skip
            elif "mean_dice" in e:
                lines.append(f"| 2nd human observer (vs 1st) | | | | | | | {_f(e['mean_dice'])} | "
                             f"{_f(e['median_dice'])} | {_f(e['min_dice'])} | | |")  # fmt: skip
            else:
                lines.append(f"| 2nd human observer (vs 1st) | eval failed: {e.get('error')} |" + " |" * 10)
        lines.append("")
        for tool in TOOLS:
            t = r.get(tool)
            if t and t.get("earlier_run"):
                lines.append(f"* {tool}: from an earlier invocation in the same workdir ({t['earlier_run']}, its own "
                             "load conditions)")  # fmt: skip
            if t and "error" not in t:
                extra = (f", first epoch ended early after {t['iterations_per_epoch']} iterations (slow plan)"
                         if t.get("budget_run", {}).get("first_epoch_cut") else "")  # fmt: skip
                lines.append(
                    f"* {tool}: plan+preprocess {t['preprocess']['wall_s']:.0f} s, `train` process "
                    f"{t['train']['wall_s']:.0f} s (training loop {t['train_seconds']:.0f} s{extra}), predict "
                    f"{t['predict']['wall_s']:.0f} s; epoch seconds: first {t['epoch_seconds'][0]}, median "
                    f"{statistics.median(t['epoch_seconds']):.1f}"
                )
        lines.append("")
    return lines


# ---------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(ap, workdir_default="medseg_bench_2d")
    ap.add_argument("--data", type=Path, default=C.default_data_root())
    ap.add_argument("--budget", type=float, default=8.0, help="training minutes per tool and dataset (default 8)")
    ap.add_argument("--iterations", type=int, default=50, help="iterations per epoch (both tools)")
    ap.add_argument("--datasets", default="busi,drive", help="comma-separated: busi, drive")
    ap.add_argument("--tools", default="nnunet,medseg", help="comma-separated: nnunet, medseg")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="re-run only the evaluation and the report on the predictions of the last run in --workdir")  # fmt: skip
    args = ap.parse_args()
    datasets = [s for s in args.datasets.split(",") if s]
    tools = [s for s in args.tools.split(",") if s]
    bad = [s for s in datasets if s not in DATASETS] + [s for s in tools if s not in TOOLS]
    if bad:
        raise SystemExit(f"unknown dataset/tool: {bad}")
    if args.quick:
        args.budget, args.iterations = 0.5, 5
        args.workdir = args.workdir.with_name(args.workdir.name + "_quick")
    info = C.machine_info()
    C.guard_busy(info, args.allow_busy or args.evaluate_only, args.quick)
    nn_py = C.ensure_venv("nnunetv2", NNUNET_CHECK, rebuild=args.rebuild_venv) if "nnunet" in tools else None
    logs = args.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    state_file = args.workdir / "results.json"
    previous = json.loads(state_file.read_text()) if state_file.is_file() else None
    if args.evaluate_only and previous is None:
        raise SystemExit(f"--evaluate-only: no {state_file} from an earlier run")
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": info, "lscpu": lscpu(),
               "medseg_commit": C.medseg_git(), "datasets": {}}  # fmt: skip
    for key in datasets:
        src = args.data / DATASETS[key][2]
        if key == "busi":
            split = busi_split(src)
            split_file = C.RESULTS / "2d_busi_split.json"
            split_file.parent.mkdir(parents=True, exist_ok=True)
            split_file.write_text(json.dumps({k: v for k, v in split.items()}, indent=1) + "\n")
            if args.quick:
                split = quick_subset(split, 12, 4, key=split["pathology"].get)
        else:
            split = drive_split(src)
            if args.quick:
                split = quick_subset(split, 4, 2)
        work = args.workdir / key
        d = make_dataset(key, src, split, work) if not args.evaluate_only else _dataset_paths(key, work)
        r = {"split": {k: v for k, v in split.items() if k != "pathology"}}
        if key == "busi":
            r["split"]["test_pathology"] = {c: split["pathology"][c] for c in split["test"]}
        for tool in tools:
            try:
                if args.evaluate_only:
                    t = previous["datasets"][key][tool]
                    t.pop("eval", None)
                elif tool == "nnunet":
                    t = run_nnunet(args, nn_py, d, work, logs)
                else:
                    t = run_medseg(args, d, work, logs)
            except (RuntimeError, OSError, KeyError, StopIteration, json.JSONDecodeError) as e:
                C.log(f"{key} {tool} FAILED: {e}")
                r[tool] = {"error": (str(e).strip().splitlines() or ["?"])[0][:300]}
                continue
            if "error" in t:
                r[tool] = t
                continue
            t["outputs"] = check_outputs(Path(t["pred"]), d["raw"] / "imagesTs", split["test"])
            t["eval"] = evaluate(Path(t["pred"]), d, work / f"eval_{tool}.json", logs / f"{key}_evaluate.log")
            C.log(f"{key} {tool}: mean Dice {t['eval'].get('mean_dice', t['eval'].get('error'))}")
            r[tool] = t
        # a tool not run this time keeps its result from the last run in this workdir on the same split
        # (e.g. `--tools nnunet` then `--tools medseg`), marked with that run's date
        old = (previous or {}).get("datasets", {}).get(key, {})
        for tool in TOOLS:
            if tool not in tools and tool in old and old.get("split", {}).get("test") == r["split"]["test"] \
                    and old.get("split", {}).get("train") == r["split"]["train"]:  # fmt: skip
                r[tool] = {**old[tool], "earlier_run": old[tool].get("earlier_run", previous["machine"]["date_utc"])}
        if d["second_observer"] is not None:
            r["second_observer"] = evaluate(d["second_observer"], d, work / "eval_2nd_observer.json",
                                            logs / f"{key}_evaluate.log")  # fmt: skip
            # the human reference is only one if the masks are masks: all-foreground files are a broken copy
            full = sorted(k for k, v in mask_fractions(d["second_observer"]).items() if v >= 0.999)
            if full:
                r["second_observer"]["invalid"] = (f"{len(full)} of {len(split['test'])} 2nd-observer masks are "
                                                   f"all foreground (e.g. {full[0]}): broken data, not a reference")  # fmt: skip
                C.log(f"{key}: WARNING: {r['second_observer']['invalid']}")
        results["datasets"][key] = r
    state_file.write_text(json.dumps(results, indent=1, default=str))
    versions = {"medseg env": C.package_versions(C.medseg_python(), ["torch", "numpy", "pillow"])}
    if nn_py is not None:
        versions = {"nnunetv2 env": C.package_versions(nn_py, ["nnunetv2", "torch", "batchgeneratorsv2"]), **versions}
    lines = report(args, info, versions, results)
    md = C.write_results(NAME, lines, args.quick, args.out)
    json_out = md.with_suffix(".json")
    json_out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    C.log(f"raw results written to {json_out}")
    print("\n".join(lines))


def _dataset_paths(key: str, work: Path) -> dict:
    ds_id, ds_name, _ = DATASETS[key]
    ref = work / "reference"
    drive = key == "drive"
    return {"raw_root": work / "nnUNet_raw", "raw": work / "nnUNet_raw" / f"Dataset{ds_id:03d}_{ds_name}", "id": ds_id,
            "name": f"Dataset{ds_id:03d}_{ds_name}", "labels": ref / "labels", "roi": ref / "fov" if drive else None,
            "second_observer": ref / "labels_2nd_observer" if drive else None}  # fmt: skip


if __name__ == "__main__":
    main()
