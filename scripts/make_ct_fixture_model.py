"""Build tests/fixtures/nnunet_v2_ct_tiny: two tiny nnU-Net v2 CT models, trained with nnunetv2 itself.

NOT a clinical model. It exists so the whole ``medseg ct`` path (import of an nnU-Net-format model,
class names, ROI subset via the fast model, statistics, previews, DICOM-SEG) runs on real CTs in CI.

* Data: the two real CTs of ../shared/data/totalsegmentator_examples/ct_total (Apache-2.0) with their
  labels (TotalSegmentator's own predictions) reduced to 12 structures: spleen, kidneys, gallbladder,
  liver, stomach keep TotalSegmentator's label values 1-6; aorta, inferior vena cava, colon, urinary
  bladder and the hips follow as 7-12.
* ``nnUNetPlans`` (full): nnU-Net's default plan edited to 3 mm isotropic, patch 64^3, a 4-stage
  PlainConvUNet of 8-16-32-64 features, batch 2.
* ``nnUNetPlansFast`` (fast, what ``medseg ct --fast`` and ``--roi-subset`` use): 6 mm, patch 32^3,
  3 stages of 8-16-32.
* Trainer: nnU-Net's ``nnUNetTrainerNoDA`` (no augmentation, no mirroring: the fixture memorises
  these two CTs) with a short schedule, every patch centred on a foreground voxel, fold ``all``; then ``nnUNetv2_predict`` on both CTs with the
  full model, so the test can check medseg's import against nnU-Net's own output on CT (CT
  normalisation, anisotropic resampling of the 512x512x20 DICOM case).

Needs the nnU-Net v2 environment ``benchmarks/.venvs/nnunetv2`` (see benchmarks/README.md). About
20-30 minutes on 2 CPU cores:

    python3 scripts/make_ct_fixture_model.py [--work /tmp/ct_fixture]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_nnunet_fixture as nf  # noqa: E402  (run, nnunet_folders, COMMANDS, VENV, _version)

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT.parent / "shared" / "data" / "totalsegmentator_examples" / "ct_total"
FIXTURE = ROOT / "tests" / "fixtures" / "nnunet_v2_ct_tiny"
DATASET_ID = 906
DATASET = f"Dataset{DATASET_ID:03d}_CTFixture12"
TRAINER = "nnUNetTrainer_MedsegCTFixture"
CASES = ["ts_ct_dicomseries", "ts_ct_example"]
STRUCTURES = [
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach",
    "aorta", "inferior_vena_cava", "colon", "urinary_bladder", "hip_left", "hip_right",
]  # fmt: skip
VARIANTS = {
    # plans name: (spacing mm, patch, features, epochs, iterations per epoch)
    "nnUNetPlans": (3.0, 64, [8, 16, 32, 64], 70, 30),
    "nnUNetPlansFast": (6.0, 32, [8, 16, 32], 70, 30),
}
TRAINER_SOURCE = '''"""Written by medseg's scripts/make_ct_fixture_model.py: nnUNetTrainerNoDA, short schedule."""
import os

import torch

from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoDA import nnUNetTrainerNoDA


class {name}(nnUNetTrainerNoDA):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        torch.set_num_threads(1)  # one thread beside the data-loader process on a 2-core machine
        torch.manual_seed(0)
        # every patch centred on a foreground class: without it a net this small sits for hundreds of
        # iterations in the all-background minimum (12 classes, two cases)
        self.oversample_foreground_percent = 1.0
        self.num_epochs = int(os.environ["MEDSEG_FIXTURE_EPOCHS"])
        self.num_iterations_per_epoch = int(os.environ["MEDSEG_FIXTURE_ITERS"])
        self.num_val_iterations_per_epoch = 2
        self.save_every = 1000

    def plot_network_architecture(self):
        pass
'''


def make_raw(raw: Path) -> None:
    import numpy as np
    import SimpleITK as sitk

    from medseg.ct.class_maps import load_class_map

    total = load_class_map("total")
    lut = np.zeros(max(total.values()) + 1, dtype=np.uint8)
    for new, name in enumerate(STRUCTURES, start=1):
        lut[total[name]] = new
    ds = raw / DATASET
    for sub in ("imagesTr", "labelsTr"):
        (ds / sub).mkdir(parents=True, exist_ok=True)
    for case in CASES:
        shutil.copyfile(SOURCE / "imagesTr" / f"{case}_0000.nii.gz", ds / "imagesTr" / f"{case}_0000.nii.gz")
        seg = sitk.ReadImage(str(SOURCE / "labelsTr" / f"{case}.nii.gz"))
        out = sitk.GetImageFromArray(lut[sitk.GetArrayFromImage(seg).astype(np.int64)])
        out.CopyInformation(seg)
        sitk.WriteImage(out, str(ds / "labelsTr" / f"{case}.nii.gz"), True)
    labels = {"background": 0} | {n: i for i, n in enumerate(STRUCTURES, start=1)}
    (ds / "dataset.json").write_text(
        json.dumps(
            {
                "name": "CTFixture12",
                "description": "2 TotalSegmentator example CTs (Apache-2.0), 12 structures; medseg CT fixture",
                "channel_names": {"0": "CT"},
                "labels": labels,
                "numTraining": len(CASES),
                "file_ending": ".nii.gz",
            },
            indent=1,
        )
    )


def edit_plans(pre: Path) -> None:
    """Write both plans files from nnU-Net's default plan (3d_fullres only)."""
    base = json.loads((pre / "nnUNetPlans.json").read_text())
    for plans_name, (spacing, patch, features, _, _) in VARIANTS.items():
        plans = json.loads(json.dumps(base))
        plans["plans_name"] = plans_name
        cfg = plans["configurations"]["3d_fullres"]
        plans["configurations"] = {"3d_fullres": cfg}
        cfg["data_identifier"] = f"{plans_name}_3d_fullres"
        cfg["spacing"] = [spacing] * 3
        cfg["patch_size"] = [patch] * 3
        cfg["batch_size"] = 2
        n = len(features)
        arch = cfg["architecture"]["arch_kwargs"]
        arch.update(
            n_stages=n,
            features_per_stage=features,
            kernel_sizes=[[3, 3, 3]] * n,
            strides=[[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
            n_conv_per_stage=[2] * n,
            n_conv_per_stage_decoder=[2] * (n - 1),
        )
        (pre / f"{plans_name}.json").write_text(json.dumps(plans, indent=4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/ct_fixture"))
    args = ap.parse_args()
    work = args.work.resolve()
    raw, pre, res, env = nf.nnunet_folders(work)
    log = work / "log.txt"
    site = next((nf.VENV / "lib").glob("python*/site-packages/nnunetv2"))
    (site / "training" / "nnUNetTrainer" / f"{TRAINER}.py").write_text(TRAINER_SOURCE.format(name=TRAINER))
    make_raw(raw)
    if not (pre / DATASET / "nnUNetPlans.json").exists():
        nf.run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1", "-npfp", "1",
                "--verify_dataset_integrity", "--no_pp"], env, log)  # fmt: skip
        edit_plans(pre / DATASET)
    for plans_name, (_, _, _, epochs, iters) in VARIANTS.items():
        out_dir = res / DATASET / f"{TRAINER}__{plans_name}__3d_fullres"
        if (out_dir / "fold_all" / "checkpoint_final.pth").exists():
            continue
        nf.run(["nnUNetv2_preprocess", "-d", str(DATASET_ID), "-plans_name", plans_name, "-c", "3d_fullres",
                "-np", "1"], env, log)  # fmt: skip
        run_env = env | {"MEDSEG_FIXTURE_EPOCHS": str(epochs), "MEDSEG_FIXTURE_ITERS": str(iters)}
        nf.run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "all", "-tr", TRAINER, "-p", plans_name,
                "-device", "cpu"], run_env, log)  # fmt: skip
    pred = work / "pred_full"
    if not pred.exists():
        nf.run(["nnUNetv2_predict", "-i", str(raw / DATASET / "imagesTr"), "-o", str(pred), "-d", str(DATASET_ID),
                "-c", "3d_fullres", "-tr", TRAINER, "-p", "nnUNetPlans", "-f", "all", "-device", "cpu",
                "-npp", "1", "-nps", "1"], env, log)  # fmt: skip
    ship(work)


def ship(work: Path) -> None:
    res = work / "nnUNet_results" / DATASET
    shutil.rmtree(FIXTURE, ignore_errors=True)
    for plans_name in VARIANTS:
        name = f"{TRAINER}__{plans_name}__3d_fullres"
        dst = FIXTURE / DATASET / name
        (dst / "fold_all").mkdir(parents=True)
        for f in ("dataset.json", "plans.json"):
            shutil.copyfile(res / name / f, dst / f)
        shutil.copyfile(res / name / "fold_all" / "checkpoint_final.pth", dst / "fold_all" / "checkpoint_final.pth")
    (FIXTURE / "nnunet_predictions").mkdir()
    for case in CASES:
        shutil.copyfile(work / "pred_full" / f"{case}.nii.gz", FIXTURE / "nnunet_predictions" / f"{case}.nii.gz")
    versions = {m: nf._version(m) for m in ("nnunetv2", "torch")}
    lines = [
        "# nnunet_v2_ct_tiny -- two tiny nnU-Net v2 CT models (12 structures) and nnUNetv2_predict's output",
        "",
        "Built by `scripts/make_ct_fixture_model.py` (read its docstring) with "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + " on CPU.",
        "",
        "**NOT a clinical model**: trained without augmentation on the same two CTs it is tested on",
        "(../shared/data/totalsegmentator_examples/ct_total, Apache-2.0, wasserth/TotalSegmentator test files; their",
        "labels are TotalSegmentator predictions). It only proves that an nnU-Net-format model runs through",
        "`medseg import-nnunet` and `medseg ct` with correct geometry.",
        "",
        f"* `{DATASET}/{TRAINER}__nnUNetPlans__3d_fullres/`: full model (3 mm); import it as `MODEL`.",
        f"* `{DATASET}/{TRAINER}__nnUNetPlansFast__3d_fullres/`: fast model (6 mm); import it as `MODEL/fast`.",
        "* `nnunet_predictions/CASE.nii.gz`: `nnUNetv2_predict -f all` of the full model on both CTs.",
        "",
        "Commands run:",
        "",
        "```",
        *nf.COMMANDS,
        "```",
        "",
    ]
    (FIXTURE / "SOURCE.md").write_text("\n".join(lines))
    print(f"fixture written: {FIXTURE}")


if __name__ == "__main__":
    main()
