#!/usr/bin/env python3
"""Inference, side by side: the same trained nnU-Net v2 model run by nnUNetv2_predict and by medseg.

peer:   nnUNetv2_predict -i CASES -o OUT -d 4 -c 3d_fullres -tr TRAINER -f 0 -device cpu [--disable_tta]
medseg: medseg predict -m MODEL -i CASES -o OUT [--no-tta] [--fp32]   (MODEL = medseg import-nnunet RESULTS)
        run three times: its default (the CPU fast path's choice), bf16 with --layout contiguous, --fp32

The model is nnU-Net's own default 3d_fullres plan for MSD hippocampus (PlainConvUNet
[32, 64, 128, 256], patch 40x56x40, as nnUNetv2_plan_and_preprocess plans it), trained by
``nnUNetv2_train`` with nnU-Net's trainer on a short schedule (``--train-epochs`` x
``--train-iters``, default 5 x 50, ~5 min on 2 cores): timing does not depend on how long it was
trained, and a few hundred iterations already give real, non-trivial hippocampus predictions to
compare. The trained results folder is reused on later runs (delete ``WORKDIR/nnUNet_results``).

Test cases: ``--cases`` (default 20) MSD hippocampus cases that are not among the training cases,
read from the same folder by both. Each (tool, TTA) pair runs ``--repeats`` times (default 2) as one
process over all cases, in alternating order; wall time and peak RSS of the process tree are
recorded, per case = wall / cases (start-up included, as a user sees it). Agreement: per case and
class Dice between the two tools' label maps (TTA on vs TTA on, off vs off), between each medseg
variant and medseg's fp32, and each tool's mean Dice against the manual labels (how good the
short-schedule model is: agreement between precisions is lower for a model whose class scores are
close, so it is shown beside it).

Both use all cores: nnUNetv2_predict with ``-npp 1 -nps 1`` (one preprocessing and one export
worker, the minimum; it still runs them as background processes), medseg in-process.

    python3 benchmarks/bench_inference.py [--cases 20] [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_preprocess import NNUNET_CHECK, make_raw  # noqa: E402

NAME = "inference"
DS_ID, DS_NAME = 4, "Hippocampus"
# medseg's default (the CPU fast path's choice: bf16 pre-cast, layout timed), bf16 with the layout forced to
# NCDHW (what the default was before the fast path, less autocast), and forced fp32
MEDSEG_VARIANTS = {
    "medseg": ("default (auto)", []),
    "medseg_ncdhw": ("bf16, NCDHW (`--layout contiguous`)", ["--layout", "contiguous"]),
    "medseg_fp32": ("fp32 (`--fp32`)", ["--fp32"]),
}
TRAINER = "nnUNetTrainer_MedsegBench"
TRAINER_SOURCE = '''"""Written by medseg's benchmarks/bench_inference.py: nnUNetTrainer with a short schedule."""
import os

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class {name}(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ["MEDSEG_BENCH_EPOCHS"])
        self.num_iterations_per_epoch = int(os.environ["MEDSEG_BENCH_ITERS"])
        self.num_val_iterations_per_epoch = 5
        self.save_every = 1000

    def plot_network_architecture(self):
        pass

    def perform_actual_validation(self, save_probabilities: bool = False):
        pass  # the benchmark predicts its own test cases
'''

AGREEMENT = """
import json, sys
from pathlib import Path
import numpy as np
from medseg.io.image import read_image
a, b = Path(sys.argv[1]), Path(sys.argv[2])
out = {}
for f in sorted(a.glob("*.nii.gz")):
    x, y = read_image(f)[0], read_image(b / f.name)[0]
    d = {}
    for c in sorted(set(np.unique(x)) | set(np.unique(y)) - {0}):
        s = (x == c).sum() + (y == c).sum()
        d[int(c)] = float(2 * np.logical_and(x == c, y == c).sum() / s) if s else 1.0
    out[f.name] = {"dice": d, "identical": bool(np.array_equal(x, y))}
print(json.dumps(out))
"""


def prepare(args, nn_py: Path) -> dict:
    work = args.workdir
    raw_root, pre, res = work / "nnUNet_raw", work / "nnUNet_preprocessed", work / "nnUNet_results"
    raw = raw_root / f"Dataset{DS_ID:03d}_{DS_NAME}"
    env = {
        **os.environ,
        "nnUNet_raw": str(raw_root),
        "nnUNet_preprocessed": str(pre),
        "nnUNet_results": str(res),
        "nnUNet_compile": "f",
        "MEDSEG_BENCH_EPOCHS": str(args.train_epochs),
        "MEDSEG_BENCH_ITERS": str(args.train_iters),
    }
    src = args.data / "msd_hippocampus"
    all_cases = sorted(p.name[: -len(".nii.gz")] for p in (src / "labelsTr").glob("*.nii.gz"))
    n_train = args.train_cases
    test_cases = all_cases[n_train : n_train + args.cases]
    site = next((nn_py.parent.parent / "lib").glob("python*/site-packages/nnunetv2"))
    (site / "training" / "nnUNetTrainer" / f"{TRAINER}.py").write_text(TRAINER_SOURCE.format(name=TRAINER))
    results = res / f"Dataset{DS_ID:03d}_{DS_NAME}" / f"{TRAINER}__nnUNetPlans__3d_fullres"
    logs = work / "logs"
    if not (results / "fold_0" / "checkpoint_final.pth").exists():
        for p in (raw_root, pre, res):
            shutil.rmtree(p, ignore_errors=True)
        make_raw(src, raw, n_train)
        pre.mkdir(parents=True)
        res.mkdir(parents=True)
        C.log(f"training nnU-Net's default hippocampus model ({args.train_epochs}x{args.train_iters} iterations)")
        bin_ = nn_py.parent
        C.run_measured([bin_ / "nnUNetv2_plan_and_preprocess", "-d", DS_ID, "-c", "3d_fullres", "-np", "2", "-npfp",
                        "2", "--no_pbar"], env=env, log_file=logs / "train.log")  # fmt: skip
        C.run_measured([bin_ / "nnUNetv2_train", DS_ID, "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"],
                       env=env, log_file=logs / "train.log")  # fmt: skip
    model = work / "medseg_model"
    if not model.exists():
        C.run_measured(
            [C.medseg_python(), "-m", "medseg", "import-nnunet", "-i", results, "-o", model],
            log_file=logs / "import.log",
        )
    cases_dir = work / "test_images"
    shutil.rmtree(cases_dir, ignore_errors=True)
    cases_dir.mkdir()
    for case in test_cases:
        (cases_dir / f"{case}_0000.nii.gz").symlink_to((src / "imagesTr" / f"{case}_0000.nii.gz").resolve())
    return {"env": env, "model": model, "cases_dir": cases_dir, "n": len(test_cases), "results": results,
            "labels": src / "labelsTr"}  # fmt: skip


def commands(tool: str, tta: bool, prep: dict, out: Path, nn_py: Path) -> list:
    if tool == "nnunet":
        cmd = [nn_py.parent / "nnUNetv2_predict", "-i", prep["cases_dir"], "-o", out, "-d", DS_ID, "-c", "3d_fullres",
               "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"]  # fmt: skip
        return cmd + ([] if tta else ["--disable_tta"])
    cmd = [C.medseg_python().parent / "medseg", "predict", "-m", prep["model"], "-i", prep["cases_dir"], "-o", out]
    return cmd + ([] if tta else ["--no-tta"]) + MEDSEG_VARIANTS[tool][1]


def _dice(a: Path, b: Path) -> dict:
    """Per case and class Dice of the label maps in ``a`` against the same names in ``b``."""
    proc = subprocess.run([str(C.medseg_python()), "-c", AGREEMENT, str(a), str(b)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(proc.stdout)


def _dices(per_case: dict) -> list[float]:
    return [d for case in per_case.values() for d in case["dice"].values()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(ap, workdir_default="medseg_bench_inference")
    ap.add_argument("--data", type=Path, default=C.default_data_root())
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--train-cases", type=int, default=100, help="first N hippocampus cases train the model")
    ap.add_argument("--train-epochs", type=int, default=5)
    ap.add_argument("--train-iters", type=int, default=50)
    args = ap.parse_args()
    if args.quick:
        args.cases, args.repeats, args.train_cases, args.train_epochs, args.train_iters = 3, 1, 10, 1, 5
        args.workdir = args.workdir.with_name(args.workdir.name + "_quick")
    info = C.machine_info()
    C.guard_busy(info, args.allow_busy, args.quick)
    nn_py = C.ensure_venv("nnunetv2", NNUNET_CHECK, rebuild=args.rebuild_venv)
    (args.workdir / "logs").mkdir(parents=True, exist_ok=True)
    prep = prepare(args, nn_py)
    runs: dict[tuple[str, bool], list[dict]] = {}
    for rep in range(args.repeats):
        for tta in (True, False):
            tools = ("nnunet", *MEDSEG_VARIANTS) if rep % 2 == 0 else (*reversed(MEDSEG_VARIANTS), "nnunet")
            for tool in tools:
                out = args.workdir / f"pred_{tool}_{'tta' if tta else 'notta'}"
                shutil.rmtree(out, ignore_errors=True)
                C.log(f"repeat {rep + 1}: {tool} TTA {'on' if tta else 'off'}")
                r = C.run_measured(commands(tool, tta, prep, out, nn_py), env=prep["env"],
                                   log_file=args.workdir / "logs" / f"{tool}.log")  # fmt: skip
                runs.setdefault((tool, tta), []).append(r)
    agreement, vs_fp32, vs_truth = {}, {}, {}
    for tta in (True, False):
        pred = {t: args.workdir / f"pred_{t}_{'tta' if tta else 'notta'}" for t in ("nnunet", *MEDSEG_VARIANTS)}
        for tool in MEDSEG_VARIANTS:
            agreement[(tool, tta)] = _dice(pred["nnunet"], pred[tool])
            vs_fp32[(tool, tta)] = _dice(pred["medseg_fp32"], pred[tool])
        for tool in pred:
            vs_truth[(tool, tta)] = _dice(pred[tool], prep["labels"])
    (args.workdir / "results.json").write_text(
        json.dumps(
            {
                "runs": {f"{t}_{tta}": v for (t, tta), v in runs.items()},
                "agreement": {f"{t}_{tta}": v for (t, tta), v in agreement.items()},
                "agreement_with_medseg_fp32": {f"{t}_{tta}": v for (t, tta), v in vs_fp32.items()},
                "dice_vs_manual_labels": {f"{t}_{tta}": v for (t, tta), v in vs_truth.items()},
            },
            indent=1,
        )
    )
    versions = {
        "nnunetv2 env": C.package_versions(nn_py, ["nnunetv2", "torch"]),
        "medseg env": C.package_versions(C.medseg_python(), ["torch", "numpy", "SimpleITK"]),
    }
    lines = C.header_lines("Inference: nnUNetv2_predict vs medseg predict (same nnU-Net model)", info, versions,
                           args.quick)  # fmt: skip
    lines += [
        f"* model: nnU-Net default 3d_fullres plan for Dataset004_Hippocampus, `nnUNetv2_train` "
        f"{args.train_epochs}x{args.train_iters} iterations on the first {args.train_cases} cases, imported with "
        "`medseg import-nnunet`",
        f"* {prep['n']} other hippocampus cases, one process per (tool, TTA) over all of them, {args.repeats} "
        "repeat(s); medians. Memory: peak PSS summed over the process tree (nnU-Net's preprocessing and "
        "export workers included; PSS shares the pages forked workers have in common instead of counting "
        "them once per process as summed RSS would)",
        "",
        "| TTA | medseg precision | nnU-Net s/case | medseg s/case | speed-up | nnU-Net peak PSS (GiB) "
        "| medseg peak PSS (GiB) | memory ratio | min / mean Dice agreement | identical cases "
        "| min / mean Dice vs medseg fp32 | mean Dice vs manual labels (nnU-Net / medseg) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|",
    ]
    for tool, tta in [(t, tta) for tta in (True, False) for t in MEDSEG_VARIANTS]:
        nn, ms = runs[("nnunet", tta)], runs[(tool, tta)]
        t_nn, t_ms = C.median([r["wall_s"] for r in nn]) / prep["n"], C.median([r["wall_s"] for r in ms]) / prep["n"]
        m_nn = C.median([r["tree_pss_mb"] for r in nn]) / 1024
        m_ms = C.median([r["tree_pss_mb"] for r in ms]) / 1024
        dices = _dices(agreement[(tool, tta)])
        same = sum(case["identical"] for case in agreement[(tool, tta)].values())
        fp32 = _dices(vs_fp32[(tool, tta)])
        truth = [sum(d) / len(d) for d in (_dices(vs_truth[("nnunet", tta)]), _dices(vs_truth[(tool, tta)]))]
        lines.append(
            f"| {'on' if tta else 'off'} | {MEDSEG_VARIANTS[tool][0]} | {t_nn:.2f} | {t_ms:.2f} | {t_nn / t_ms:.2f}x | {m_nn:.2f} | {m_ms:.2f} | "
            f"{m_ms / m_nn:.2f} | {min(dices):.4f} / {sum(dices) / len(dices):.4f} | {same}/{prep['n']} | "
            f"{min(fp32):.4f} / {sum(fp32) / len(fp32):.4f} | {truth[0]:.3f} / {truth[1]:.3f} |"
        )
    C.write_results(NAME, lines, args.quick, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
