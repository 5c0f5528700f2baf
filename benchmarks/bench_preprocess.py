#!/usr/bin/env python3
"""Planning + preprocessing, side by side: nnU-Net v2 vs medseg on the same cases.

peer:   nnUNetv2_plan_and_preprocess -d 4 -c 3d_fullres -np W -npfp W   (fingerprint + plan + preprocess)
medseg: medseg plan DATASET -w WS  +  medseg preprocess DATASET -w WS -c 3d_fullres --workers W

Both read the same files: a Dataset004_Hippocampus folder whose imagesTr/labelsTr entries are
symlinks to the shared MSD hippocampus cases (208 cases). nnU-Net's nnUNet_raw /
nnUNet_preprocessed / nnUNet_results variables are set for its subprocess only. Each repeat
starts from empty output folders; the order alternates (peer first on even repeats) so slow
drift does not favour one side. With ``--ct`` the same is done for a 2-case CT dataset
(TotalSegmentator's example CTs, 117 classes, both cases resampled to the median spacing).

Run from the repository root:  python3 benchmarks/bench_preprocess.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "preprocess"
NNUNET_CHECK = "import nnunetv2, batchgenerators, acvl_utils, dynamic_network_architectures, blosc2"


def make_raw(src: Path, dst: Path, n_cases: int | None) -> int:
    """nnU-Net raw layout at ``dst`` with per-file symlinks into ``src``; returns the case count."""
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    ds = json.loads((src / "dataset.json").read_text())
    ending = ds.get("file_ending", ".nii.gz")
    labels = sorted((src / "labelsTr").glob(f"*{ending}"))
    if n_cases:
        labels = labels[:n_cases]
    nch = len(ds["channel_names"])
    for lab in labels:
        case = lab.name[: -len(ending)]
        (dst / "labelsTr" / lab.name).symlink_to(lab.resolve())
        for c in range(nch):
            img = src / "imagesTr" / f"{case}_{c:04d}{ending}"
            (dst / "imagesTr" / img.name).symlink_to(img.resolve())
    ds["numTraining"] = len(labels)
    (dst / "dataset.json").write_text(json.dumps(ds, indent=1))
    return len(labels)


def run_pair(
    label: str, ds_id: int, ds_name: str, src: Path, n_cases: int | None, args, nn_py: Path, logdir: Path
) -> dict:
    work = args.workdir / label
    raw_root = work / "nnUNet_raw"
    raw = raw_root / f"Dataset{ds_id:03d}_{ds_name}"
    n = make_raw(src, raw, n_cases)
    nn_bin = nn_py.parent
    ms_bin = C.medseg_python().parent
    workers = args.workers
    res = {"n_cases": n, "nnunet": [], "medseg": [], "medseg_plan": [], "medseg_pre": []}
    for r in range(args.repeats):
        order = ["nnunet", "medseg"] if r % 2 == 0 else ["medseg", "nnunet"]
        for tool in order:
            if tool == "nnunet":
                pre, results = work / "nnUNet_preprocessed", work / "nnUNet_results"
                shutil.rmtree(pre, ignore_errors=True)
                shutil.rmtree(results, ignore_errors=True)
                pre.mkdir(parents=True)
                results.mkdir(parents=True)
                env = {
                    **os.environ,
                    "nnUNet_raw": str(raw_root),
                    "nnUNet_preprocessed": str(pre),
                    "nnUNet_results": str(results),
                }
                cmd = [
                    nn_bin / "nnUNetv2_plan_and_preprocess",
                    "-d",
                    str(ds_id),
                    "-c",
                    "3d_fullres",
                    "-np",
                    str(workers),
                    "-npfp",
                    str(workers),
                    "--no_pbar",
                ]
                C.log(f"{label} repeat {r + 1}/{args.repeats}: nnU-Net plan_and_preprocess ({n} cases)")
                m = C.run_measured(cmd, env=env, log_file=logdir / f"{label}_nnunet.log")
                res["nnunet"].append(m)
                C.log(f"  nnU-Net {m['wall_s']:.1f} s, tree PSS {m['tree_pss_mb']:.0f} MB")
            else:
                ws = work / "medseg_ws"
                shutil.rmtree(ws, ignore_errors=True)
                C.log(f"{label} repeat {r + 1}/{args.repeats}: medseg plan + preprocess ({n} cases)")
                m1 = C.run_measured([ms_bin / "medseg", "plan", raw, "-w", ws], log_file=logdir / f"{label}_medseg.log")
                m2 = C.run_measured(
                    [ms_bin / "medseg", "preprocess", raw, "-w", ws, "-c", "3d_fullres", "--workers", str(workers)],
                    log_file=logdir / f"{label}_medseg.log",
                )
                tot = {"wall_s": m1["wall_s"] + m2["wall_s"]}
                for k in ("max_rss_mb", "tree_rss_mb", "tree_pss_mb"):
                    vals = [x for x in (m1[k], m2[k]) if x is not None]
                    tot[k] = max(vals) if vals else None
                res["medseg"].append(tot)
                res["medseg_plan"].append(m1)
                res["medseg_pre"].append(m2)
                C.log(
                    f"  medseg {tot['wall_s']:.1f} s (plan {m1['wall_s']:.1f} + preprocess {m2['wall_s']:.1f}),"
                    f" tree PSS {tot['tree_pss_mb']:.0f} MB"
                )
    res["plans"] = compare_plans(work, ds_id, ds_name)
    res["outputs"] = output_sizes(work)
    return res


def compare_plans(work: Path, ds_id: int, ds_name: str) -> dict:
    out = {}
    nn_plan = work / "nnUNet_preprocessed" / f"Dataset{ds_id:03d}_{ds_name}" / "nnUNetPlans.json"
    if nn_plan.exists():
        c = json.loads(nn_plan.read_text())["configurations"]["3d_fullres"]
        arch = c.get("architecture", {}).get("arch_kwargs", {})
        out["nnU-Net"] = {
            "spacing": c["spacing"],
            "patch": c["patch_size"],
            "batch": c["batch_size"],
            "features": arch.get("features_per_stage"),
        }
    plans = list((work / "medseg_ws" / "preprocessed").glob("*/plan.json"))
    if plans:
        c = json.loads(plans[0].read_text())["configurations"]["3d_fullres"]
        out["medseg"] = {
            "spacing": c["spacing"],
            "patch": c["patch_size"],
            "batch": c["batch_size"],
            "features": c["model_kwargs"]["features"],
        }
    return out


def _du(path: Path) -> tuple[int, float]:
    files = [p for p in path.rglob("*") if p.is_file()] if path.exists() else []
    return len(files), sum(p.stat().st_size for p in files) / 1024**2


def output_sizes(work: Path) -> dict:
    nn = next((p for p in (work / "nnUNet_preprocessed").glob("*/nnUNetPlans_3d_fullres")), None)
    ms = next((p for p in (work / "medseg_ws" / "preprocessed").glob("*/data_*")), None)
    return {"nnU-Net": _du(nn) if nn else None, "medseg": _du(ms) if ms else None}


def table(label: str, res: dict, args) -> list[str]:
    nn, ms = res["nnunet"], res["medseg"]
    nn_wall, ms_wall = C.median([m["wall_s"] for m in nn]), C.median([m["wall_s"] for m in ms])
    lines = [
        f"### {label}: {res['n_cases']} cases, {args.workers} worker processes, {args.repeats} repeat(s)",
        "",
        "| tool | wall s, median (min–max) | peak PSS of the process tree, MB | peak RSS of the tree, MB "
        "| largest single process RSS, MB |",
        "|---|---|---|---|---|",
    ]
    for name, runs in (
        ("nnU-Net v2 `nnUNetv2_plan_and_preprocess`", nn),
        ("medseg `plan` + `preprocess`", ms),
        ("  of which `medseg plan`", res["medseg_plan"]),
        ("  of which `medseg preprocess`", res["medseg_pre"]),
    ):
        lines.append(
            f"| {name} | {C.spread([m['wall_s'] for m in runs])} | "
            f"{C.fmt(C.median([m['tree_pss_mb'] for m in runs]), 0)} | "
            f"{C.fmt(C.median([m['tree_rss_mb'] for m in runs]), 0)} | "
            f"{C.fmt(C.median([m['max_rss_mb'] for m in runs]), 0)} |"
        )
    ratio = nn_wall / ms_wall if nn_wall and ms_wall else None
    pss_ratio = (
        C.median([m["tree_pss_mb"] for m in nn]) / C.median([m["tree_pss_mb"] for m in ms]) if ms and nn else None
    )
    lines += [
        "",
        f"**Ratio nnU-Net / medseg: wall time {C.fmt(ratio)}x, peak tree PSS {C.fmt(pss_ratio)}x** "
        "(> 1: medseg is faster / smaller).",
        "",
    ]
    if res["plans"]:
        lines += [
            "3d_fullres plans produced:",
            "",
            "| tool | spacing | patch | batch | features |",
            "|---|---|---|---|---|",
        ]
        for tool, p in res["plans"].items():
            lines.append(
                f"| {tool} | {[round(s, 3) for s in p['spacing']]} | {p['patch']} | {p['batch']} | {p['features']} |"
            )
        lines.append("")
    o = res["outputs"]
    if o.get("nnU-Net") and o.get("medseg"):
        lines += [
            f"Preprocessed 3d_fullres output: nnU-Net {o['nnU-Net'][0]} files / {o['nnU-Net'][1]:.1f} MB "
            f"(blosc2-compressed `.b2nd` + `.pkl`), medseg {o['medseg'][0]} files / {o['medseg'][1]:.1f} MB "
            "(`.npy` + `.json` + `_fg.npz`).",
            "",
        ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, workdir_default="medseg_bench_preprocess")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--workers",
        type=int,
        default=C.usable_cores(),
        help="Worker processes for both tools (nnU-Net -np/-npfp, medseg --workers; default: all cores). "
        "`medseg plan` has no worker option and always fingerprints with all cores.",
    )
    p.add_argument("--cases", type=int, default=None, help="Use only the first N hippocampus cases (default: all).")
    p.add_argument(
        "--ct",
        action="store_true",
        help="Also benchmark the 2-case TotalSegmentator CT dataset (117 classes, resampled).",
    )
    p.add_argument(
        "--data", type=Path, default=C.default_data_root(), help="Shared data folder (default: %(default)s)."
    )
    args = p.parse_args()
    if args.quick:
        args.repeats, args.cases = min(args.repeats, 1), args.cases or 8

    info = C.machine_info()
    C.guard_busy(info, args.allow_busy, args.quick)
    nn_py = C.ensure_venv("nnunetv2", NNUNET_CHECK, rebuild=args.rebuild_venv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    logdir = args.workdir / "logs"
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir()
    versions = {
        "nnU-Net env": C.package_versions(
            nn_py, ["nnunetv2", "torch", "numpy", "scipy", "SimpleITK", "scikit-image", "blosc2"]
        ),
        "medseg env": C.package_versions(C.medseg_python(), ["medseg", "torch", "numpy", "scipy", "SimpleITK"]),
    }
    results = {
        "hippocampus": run_pair(
            "hippocampus", 4, "Hippocampus", args.data / "msd_hippocampus", args.cases, args, nn_py, logdir
        )
    }
    if args.ct:
        results["ct"] = run_pair(
            "ct", 999, "TSExampleCT", args.data / "totalsegmentator_examples" / "ct_total", None, args, nn_py, logdir
        )

    lines = C.header_lines("Planning + preprocessing: nnU-Net v2 vs medseg", info, versions, args.quick)
    lines += [
        "Both tools read the same raw files (symlinked into an nnU-Net `DatasetXXX_Name` folder) and write to "
        "empty output folders on every repeat; only the `3d_fullres` configuration is preprocessed. "
        "nnU-Net runs fingerprint extraction, planning (2d, 3d_fullres, 3d_lowres if needed) and "
        "preprocessing in one command; medseg runs `plan` (fingerprint + all configurations) and then "
        "`preprocess`. Memory: PSS summed over the process tree (workers included, shared pages counted "
        "once), sampled every 0.1 s; RSS of the largest single process from wait4 (`/usr/bin/time`).",
        "",
    ]
    labels = {
        "hippocampus": "MSD hippocampus (MRI, 1 mm isotropic, small crops)",
        "ct": "TotalSegmentator example CTs (2 cases, 117 classes, 512x512x20 @ 0.98x0.98x2 mm and "
        "122x101x112 @ 3 mm, both resampled to the median spacing)",
    }
    for key, res in results.items():
        lines += table(labels[key], res, args)
    lines += [f"Logs of every run: `{logdir}`.", ""]
    (args.workdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    C.write_results(NAME, lines, args.quick, args.out)


if __name__ == "__main__":
    main()
