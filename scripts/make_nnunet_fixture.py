"""Build tests/fixtures/nnunet_v2_hippocampus_tiny with nnU-Net v2 itself (not a test-time tool).

Trains two tiny nnU-Net v2 models on 12 real MSD hippocampus cases with nnunetv2's own commands, runs
``nnUNetv2_predict`` (default settings: mirror TTA, step 0.5) on 4 other cases and ships the results
folders, those 4 input images, their manual labels and nnU-Net's predictions as the fixture that
``tests/test_nnunet_import.py`` checks ``medseg import-nnunet`` against.

* ``plain``: nnU-Net's default planner (``nnUNetPlans``, PlainConvUNet) with its planned patch and
  spacing; the network is shrunk to 3 stages of 8, 16, 32 features and the batch to 2.
* ``resenc``: ``nnUNetPlannerResEncM`` (``nnUNetResEncUNetMPlans``, ResidualEncoderUNet) with an edited
  plan that exercises what the plain model cannot on isotropic 1 mm data: ``transpose_forward``
  [2, 0, 1], a target spacing of 1.25 mm along one axis (so inputs are resampled and nnU-Net's export
  resamples the logits back), and a patch smaller than the images (several Gaussian-weighted tiles).

Needs the nnU-Net v2 environment ``benchmarks/.venvs/nnunetv2`` (see benchmarks/README.md; build it
with ``python3 benchmarks/bench_training.py --help`` or any benchmark once). Runs on CPU in ~10-20
minutes on 2 cores. A short trainer (few epochs of few iterations) is written into that environment's
nnunetv2 package, because ``nnUNetv2_train -tr NAME`` and ``nnUNetv2_predict`` look trainers up by
class name inside the package.

    python3 scripts/make_nnunet_fixture.py [--work /tmp/nnunet_fixture] [--only plain|resenc]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT.parent / "shared" / "data" / "msd_hippocampus"
VENV = ROOT / "benchmarks" / ".venvs" / "nnunetv2"
FIXTURE = ROOT / "tests" / "fixtures" / "nnunet_v2_hippocampus_tiny"

DATASET_ID = 904
DATASET = f"Dataset{DATASET_ID:03d}_HippoTiny"
TRAIN_CASES = [
    "hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006", "hippocampus_007",
    "hippocampus_008", "hippocampus_011", "hippocampus_015", "hippocampus_017", "hippocampus_019",
    "hippocampus_023", "hippocampus_024",
]  # fmt: skip
TEST_CASES = ["hippocampus_026", "hippocampus_033", "hippocampus_034", "hippocampus_035"]

TRAINER = "nnUNetTrainer_MedsegFixture"
EPOCHS, ITERS, VAL_ITERS = 30, 50, 5
TRAINER_SOURCE = f'''"""Written by medseg's scripts/make_nnunet_fixture.py: nnUNetTrainer, shorter schedule only."""
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class {TRAINER}(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # nnUNetv2_train -device cpu uses all cores; on a small shared CPU one thread is ~15x faster
        torch.set_num_threads(1)
        self.num_epochs = {EPOCHS}
        self.num_iterations_per_epoch = {ITERS}
        self.num_val_iterations_per_epoch = {VAL_ITERS}
        self.save_every = 1000

    def plot_network_architecture(self):  # optional hiddenlayer PDF
        pass
'''

MODELS = {
    "plain": {"plans": "nnUNetPlans", "planner": "ExperimentPlanner"},
    "resenc": {"plans": "nnUNetResEncUNetMPlans", "planner": "nnUNetPlannerResEncM"},
}

COMMANDS: list[str] = []  # every nnU-Net command run, for SOURCE.md


def run(cmd: list[str], env: dict, log: Path) -> float:
    COMMANDS.append(" ".join(cmd))
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n+ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.call([str(VENV / "bin" / cmd[0]), *cmd[1:]], env=env, stdout=fh, stderr=subprocess.STDOUT)
    if rc:
        sys.exit(f"failed ({rc}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def nnunet_folders(work: Path) -> tuple[Path, Path, Path, dict]:
    """nnUNet_raw / _preprocessed / _results under ``work`` (created) and the environment naming them."""
    raw, pre, res = work / "nnUNet_raw", work / "nnUNet_preprocessed", work / "nnUNet_results"
    for p in (raw, pre, res):
        p.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "nnUNet_raw": str(raw),
        "nnUNet_preprocessed": str(pre),
        "nnUNet_results": str(res),
        "nnUNet_n_proc_DA": "1",
        "nnUNet_def_n_proc": "1",
        "nnUNet_compile": "f",
        "PYTHONHASHSEED": "0",
    }
    return raw, pre, res, env


def install_trainer() -> None:
    site = next((VENV / "lib").glob("python*/site-packages/nnunetv2"))
    # top level of the trainer package: nnU-Net's class lookup imports the modules there first, before it
    # walks sub-packages (some of which, e.g. primus, import timm, which this environment lacks)
    (site / "training" / "nnUNetTrainer" / f"{TRAINER}.py").write_text(TRAINER_SOURCE)


def make_raw(raw: Path) -> None:
    ds = raw / DATASET
    for sub in ("imagesTr", "labelsTr"):
        (ds / sub).mkdir(parents=True, exist_ok=True)
    for case in TRAIN_CASES:
        for src, dst in (
            (SOURCE / "imagesTr" / f"{case}_0000.nii.gz", ds / "imagesTr" / f"{case}_0000.nii.gz"),
            (SOURCE / "labelsTr" / f"{case}.nii.gz", ds / "labelsTr" / f"{case}.nii.gz"),
        ):
            if not dst.exists():
                shutil.copyfile(src, dst)
    info = json.loads((SOURCE / "dataset.json").read_text())
    (ds / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": info["channel_names"],
                "labels": info["labels"],
                "numTraining": len(TRAIN_CASES),
                "file_ending": ".nii.gz",
                "name": "HippoTiny",
                "description": "12 MSD Task04 hippocampus training cases (CC-BY-SA 4.0), medseg import fixture",
            },
            indent=1,
        )
    )
    test = raw.parent / "test_images"
    test.mkdir(exist_ok=True)
    for case in TEST_CASES:
        shutil.copyfile(SOURCE / "imagesTr" / f"{case}_0000.nii.gz", test / f"{case}_0000.nii.gz")


def edit_plans(path: Path, kind: str) -> dict:
    plans = json.loads(path.read_text())
    cfg = plans["configurations"]["3d_fullres"]
    arch = cfg["architecture"]["arch_kwargs"]
    cfg["batch_size"] = 2
    # 3 stages of 8, 16, 32 features (~85k parameters: checkpoint with optimizer state < 1 MB); a 4-stage
    # 4-8-16-32 network learned the small posterior class far worse in the same number of iterations
    arch["n_stages"] = 3
    arch["features_per_stage"] = [8, 16, 32]
    arch["kernel_sizes"] = [[3, 3, 3]] * 3
    arch["strides"] = [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    if kind == "plain":
        arch["n_conv_per_stage"] = [2, 2, 2]
        arch["n_conv_per_stage_decoder"] = [2, 2]
    else:
        arch["n_blocks_per_stage"] = [1, 1, 1]
        arch["n_conv_per_stage_decoder"] = [1, 1]
        # what the isotropic 1 mm plain model does not exercise: an axis transpose, resampling on the
        # way in and out, and several tiles per case
        plans["transpose_forward"], plans["transpose_backward"] = [2, 0, 1], [1, 2, 0]
        cfg["spacing"] = [1.0, 1.0, 1.25]  # transposed (x, z, y) order: the original y axis gets 1.25 mm
        cfg["patch_size"] = [24, 24, 32]  # images ~(35, 35, 41) after transpose + resampling: 2 x 2 x 2 tiles
    path.write_text(json.dumps(plans, indent=4))
    return plans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/nnunet_fixture"))
    ap.add_argument("--only", choices=sorted(MODELS), action="append")
    ap.add_argument("--no-ship", action="store_true", help="Do not copy into tests/fixtures.")
    args = ap.parse_args()
    kinds = args.only or sorted(MODELS)
    work = args.work.resolve()
    raw, pre, res, env = nnunet_folders(work)
    log = work / "log.txt"
    install_trainer()
    make_raw(raw)
    times_file = work / "times.json"
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    if not (pre / DATASET / "nnUNetPlans.json").exists():
        run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1", "-npfp", "1",
             "--verify_dataset_integrity"], env, log)  # fmt: skip
    for kind in kinds:
        plans_name, planner = MODELS[kind]["plans"], MODELS[kind]["planner"]
        plans_file = pre / DATASET / f"{plans_name}.json"
        out_dir = res / DATASET / f"{TRAINER}__{plans_name}__3d_fullres"
        if not (out_dir / "fold_0" / "checkpoint_final.pth").exists():
            if kind != "plain":
                run(["nnUNetv2_plan_experiment", "-d", str(DATASET_ID), "-pl", planner], env, log)
            edit_plans(plans_file, kind)
            if kind != "plain":  # the plain edits (width, batch) do not change preprocessing
                run(["nnUNetv2_preprocess", "-d", str(DATASET_ID), "-plans_name", plans_name, "-c", "3d_fullres",
                     "-np", "1"], env, log)  # fmt: skip
            times[f"train_{kind}"] = run(
                ["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER, "-p", plans_name,
                 "-device", "cpu"], env, log,
            )  # fmt: skip
        pred = work / f"pred_{kind}"
        if not pred.exists():
            times[f"predict_{kind}"] = run(
                ["nnUNetv2_predict", "-i", str(work / "test_images"), "-o", str(pred), "-d", str(DATASET_ID),
                 "-c", "3d_fullres", "-tr", TRAINER, "-p", plans_name, "-f", "0", "-device", "cpu",
                 "--save_probabilities", "-npp", "1", "-nps", "1"], env, log,
            )  # fmt: skip
    times_file.write_text(json.dumps(times, indent=1))
    (work / "commands.txt").open("a").write("\n".join(COMMANDS) + "\n")
    print(json.dumps(times, indent=1))
    if not args.no_ship:
        ship(work, kinds)


def ship(work: Path, kinds: list[str]) -> None:
    res = work / "nnUNet_results" / DATASET
    (FIXTURE / "images").mkdir(parents=True, exist_ok=True)
    (FIXTURE / "labels").mkdir(exist_ok=True)
    for case in TEST_CASES:
        shutil.copyfile(SOURCE / "imagesTr" / f"{case}_0000.nii.gz", FIXTURE / "images" / f"{case}_0000.nii.gz")
        shutil.copyfile(SOURCE / "labelsTr" / f"{case}.nii.gz", FIXTURE / "labels" / f"{case}.nii.gz")
    for kind in kinds:
        name = f"{TRAINER}__{MODELS[kind]['plans']}__3d_fullres"
        dst = FIXTURE / DATASET / name
        shutil.rmtree(dst, ignore_errors=True)
        (dst / "fold_0").mkdir(parents=True)
        for f in ("dataset.json", "plans.json"):
            shutil.copyfile(res / name / f, dst / f)
        shutil.copyfile(res / name / "fold_0" / "checkpoint_final.pth", dst / "fold_0" / "checkpoint_final.pth")
        pred = FIXTURE / "nnunet_predictions" / kind
        shutil.rmtree(pred, ignore_errors=True)
        pred.mkdir(parents=True)
        for case in TEST_CASES:
            shutil.copyfile(work / f"pred_{kind}" / f"{case}.nii.gz", pred / f"{case}.nii.gz")
    write_source_md(work)
    print(f"fixture written: {FIXTURE}")


def _version(module: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({module!r}))"
    return subprocess.run([str(VENV / "bin" / "python"), "-c", code], capture_output=True, text=True).stdout.strip()


def write_source_md(work: Path) -> None:
    times = json.loads((work / "times.json").read_text())
    versions = {m: _version(m) for m in ("nnunetv2", "dynamic-network-architectures", "torch", "numpy")}
    log = {}
    for kind in MODELS:
        name = f"{TRAINER}__{MODELS[kind]['plans']}__3d_fullres"
        summary = work / "nnUNet_results" / DATASET / name / "fold_0" / "validation" / "summary.json"
        if summary.exists():
            mean = json.loads(summary.read_text())["mean"]
            log[kind] = " / ".join(f"{mean[c]['Dice']:.3f}" for c in sorted(mean))
    n = DATASET_ID
    lines = [
        "# nnunet_v2_hippocampus_tiny -- two tiny nnU-Net v2 models and nnUNetv2_predict's output",
        "",
        "Test fixture for `medseg import-nnunet` (tests/test_nnunet_import.py). Made by",
        "`python3 scripts/make_nnunet_fixture.py` (the script holds every step; rerun it to rebuild).",
        "These are conversion-fidelity fixtures trained for minutes on 9 cases, not useful models.",
        "",
        "## Data and licence",
        "",
        "Images and labels: Medical Segmentation Decathlon Task04 Hippocampus (Vanderbilt University Medical",
        "Center), via `../shared/data/msd_hippocampus` (see its SOURCE.md). Licence **CC-BY-SA 4.0**: Simpson",
        "et al., arXiv:1902.09063; Antonelli et al., Nat. Commun. 13, 4128 (2022). The images, labels, the",
        "models trained on them and their predictions here are derivatives under the same licence.",
        "",
        f"* training set (`{DATASET}`, 12 cases; nnU-Net's 5-fold split trains fold 0 on 9 of them):",
        f"  {', '.join(TRAIN_CASES)}",
        f"* `images/`, `labels/` (manual labels): {', '.join(TEST_CASES)} (not in the training set), byte copies.",
        "",
        "## Software",
        "",
        *[f"* {k} {v}" for k, v in versions.items()],
        "* CPU only (`-device cpu`), in `benchmarks/.venvs/nnunetv2` (see benchmarks/README.md).",
        "",
        "## Commands (nnUNet_raw, nnUNet_preprocessed, nnUNet_results under the work folder;",
        "nnUNet_n_proc_DA=1, nnUNet_def_n_proc=1, nnUNet_compile=f)",
        "",
        "```",
        f"nnUNetv2_plan_and_preprocess -d {n} -c 3d_fullres -np 1 -npfp 1 --verify_dataset_integrity",
        f"nnUNetv2_plan_experiment -d {n} -pl nnUNetPlannerResEncM",
        "# edit nnUNetPlans.json / nnUNetResEncUNetMPlans.json: see edit_plans() in the script",
        f"nnUNetv2_preprocess -d {n} -plans_name nnUNetResEncUNetMPlans -c 3d_fullres -np 1",
        f"nnUNetv2_train {n} 3d_fullres 0 -tr {TRAINER} -p nnUNetPlans -device cpu",
        f"nnUNetv2_train {n} 3d_fullres 0 -tr {TRAINER} -p nnUNetResEncUNetMPlans -device cpu",
        f"nnUNetv2_predict -i test_images -o pred_plain -d {n} -c 3d_fullres -tr {TRAINER} -p nnUNetPlans "
        "-f 0 -device cpu --save_probabilities -npp 1 -nps 1",
        f"nnUNetv2_predict -i test_images -o pred_resenc -d {n} -c 3d_fullres -tr {TRAINER} "
        "-p nnUNetResEncUNetMPlans -f 0 -device cpu --save_probabilities -npp 1 -nps 1",
        "```",
        "",
        f"`{TRAINER}` is `nnUNetTrainer` with {EPOCHS} epochs of {ITERS} iterations ({VAL_ITERS} validation",
        "iterations) and one torch thread, written into the environment's nnunetv2 package by the script.",
        "nnUNetv2_predict ran with its defaults otherwise: mirror TTA on the trainer's axes (0, 1, 2), step",
        "0.5, Gaussian weighting, checkpoint_final.pth.",
        "",
        "Plan edits (batch 2 for both): `plain` keeps nnU-Net's planned patch (40, 56, 40) and 1 mm spacing,",
        "network 3 stages x (8, 16, 32) features; `resenc` (ResidualEncoderUNet, 1 block per stage, 1 decoder",
        "conv) additionally sets `transpose_forward` [2, 0, 1], target spacing (1.0, 1.0, 1.25) in transposed",
        "order (the image's y axis resampled to 1.25 mm) and patch (24, 24, 32), so inputs are transposed,",
        "resampled and tiled (8 tiles per case) and nnU-Net's export resamples the logits back.",
        "",
        "## Files",
        "",
        f"* `{DATASET}/<trainer>__<plans>__3d_fullres/{{dataset.json, plans.json, fold_0/checkpoint_final.pth}}`:",
        "  nnU-Net's results folders as written (checkpoint_best.pth, logs and validation outputs left out).",
        "* `nnunet_predictions/{plain,resenc}/CASE.nii.gz`: nnUNetv2_predict's label maps.",
        "",
        "## Numbers",
        "",
        *[f"* training + final validation wall time, {k.split('_', 1)[1]}: {v / 60:.1f} min (2 shared CPU cores)"
          for k, v in times.items() if k.startswith("train_")],
        *[f"* nnU-Net's own fold-0 validation Dice (3 cases), {k}, anterior / posterior: {v}" for k, v in log.items()],
    ]  # fmt: skip
    (FIXTURE / "SOURCE.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
