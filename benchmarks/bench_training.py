#!/usr/bin/env python3
"""Training throughput, side by side: nnU-Net v2's nnUNetTrainer vs medseg's Trainer at the same plan.

Both train 3d_fullres on the MSD hippocampus cases (patch 40x56x40, 4-stage plain U-Net,
deep supervision, Dice+CE, SGD) with augmentation on, at the same settings:

  * nnU-Net's network [32, 64, 128, 256] at nnU-Net's own planned batch size
  * nnU-Net's network [32, 64, 128, 256] at batch 2
  * medseg's CPU plan network [16, 32, 64, 128] at batch 2

Each (setting, framework) runs in its own process: nnU-Net's driver (_train_nnunet.py) starts
nnUNetTrainer as nnUNetv2_train does and times ``train_step(next(dataloader_train))``;
medseg's driver (_train_medseg.py) times ``Trainer.train_epoch`` with one iteration per call.
Reported: median seconds per iteration after warm-up (all repeats pooled), peak memory of the
process tree (nnU-Net's augmentation workers included), ratio nnU-Net / medseg.

Not comparable, by design of the two tools: nnU-Net augments in background processes
(``nnUNet_n_proc_DA``, default min(12, cores)) that overlap with the training step and compete
with it for the cores; medseg augments inline with batched torch ops (on the GPU when there is
one). ``--nnunet-da-procs auto,0`` also runs nnU-Net with augmentation in the main process.

The preprocessed data for both tools is prepared once (untimed) in --workdir.

Run from the repository root:  python3 benchmarks/bench_training.py [--quick]
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
from bench_preprocess import NNUNET_CHECK, make_raw  # noqa: E402

NAME = "training"
DS_ID, DS_NAME = 4, "Hippocampus"


def prepare(args, nn_py: Path, logdir: Path) -> dict:
    """nnU-Net and medseg preprocessed data for the same cases (reused when already there)."""
    data = args.workdir / "data"
    raw_root = data / "nnUNet_raw"
    raw = raw_root / f"Dataset{DS_ID:03d}_{DS_NAME}"
    pre, results = data / "nnUNet_preprocessed", data / "nnUNet_results"
    ws = data / "medseg_ws"
    stamp = data / f"prepared_{args.cases or 'all'}.json"
    env = {**os.environ, "nnUNet_raw": str(raw_root), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(results)}
    if not stamp.exists():
        shutil.rmtree(data, ignore_errors=True)
        n = make_raw(args.data / "msd_hippocampus", raw, args.cases)
        pre.mkdir(parents=True)
        results.mkdir(parents=True)
        C.log(f"preparing nnU-Net preprocessed data ({n} cases, untimed)")
        C.run_measured(
            [
                nn_py.parent / "nnUNetv2_plan_and_preprocess",
                "-d",
                str(DS_ID),
                "-c",
                "3d_fullres",
                "-np",
                str(C.usable_cores()),
                "-npfp",
                str(C.usable_cores()),
                "--no_pbar",
            ],
            env=env,
            log_file=logdir / "prepare.log",
        )
        C.log(f"preparing medseg preprocessed data ({n} cases, untimed)")
        ms = C.medseg_python().parent / "medseg"
        C.run_measured([ms, "plan", raw, "-w", ws], log_file=logdir / "prepare.log")
        C.run_measured([ms, "preprocess", raw, "-w", ws, "-c", "3d_fullres"], log_file=logdir / "prepare.log")
        stamp.write_text(json.dumps({"cases": n}))
    plans = json.loads((pre / f"Dataset{DS_ID:03d}_{DS_NAME}" / "nnUNetPlans.json").read_text())
    nn_cfg = plans["configurations"]["3d_fullres"]
    ms_pre = next((ws / "preprocessed").iterdir())
    ms_cfg = json.loads((ms_pre / "plan.json").read_text())["configurations"]["3d_fullres"]
    return {
        "env": env,
        "nn_results": results,
        "ms_pre": ms_pre,
        "cases": json.loads(stamp.read_text())["cases"],
        "nn_batch": nn_cfg["batch_size"],
        "nn_patch": nn_cfg["patch_size"],
        "nn_features": nn_cfg["architecture"]["arch_kwargs"]["features_per_stage"],
        "ms_batch": ms_cfg["batch_size"],
        "ms_patch": ms_cfg["patch_size"],
        "ms_features": ms_cfg["model_kwargs"]["features"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, workdir_default="medseg_bench_training")
    p.add_argument("--repeats", type=int, default=2, help="Processes per (setting, framework) (default: %(default)s).")
    p.add_argument("--iters", type=int, default=20, help="Timed iterations per process (default: %(default)s).")
    p.add_argument("--warmup", type=int, default=3, help="Untimed iterations first (default: %(default)s).")
    p.add_argument("--cases", type=int, default=None, help="Only the first N hippocampus cases (default: all 208).")
    p.add_argument("--threads", type=int, default=C.usable_cores(), help="torch threads for both (default: all cores).")
    p.add_argument(
        "--nnunet-da-procs",
        default="auto",
        help="Comma list of nnUNet_n_proc_DA values to run nnU-Net with; 'auto' = nnU-Net's own "
        "choice (min(12, cores)); 0 = augmentation in the main process (default: %(default)s).",
    )
    p.add_argument(
        "--settings",
        default="nnunet-batch,nnunet-net-b2,medseg-plan-b2",
        help="Comma list of settings to run (default: %(default)s).",
    )
    p.add_argument(
        "--data", type=Path, default=C.default_data_root(), help="Shared data folder (default: %(default)s)."
    )
    args = p.parse_args()
    if args.quick:
        args.repeats, args.iters, args.warmup = 1, 3, 1
        args.cases = args.cases or 12

    info = C.machine_info()
    C.guard_busy(info, args.allow_busy, args.quick)
    nn_py = C.ensure_venv("nnunetv2", NNUNET_CHECK, rebuild=args.rebuild_venv)
    ms_py = C.medseg_python()
    args.workdir.mkdir(parents=True, exist_ok=True)
    logdir = args.workdir / "logs"
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir()
    prep = prepare(args, nn_py, logdir)
    if list(prep["nn_patch"]) != list(prep["ms_patch"]):
        C.log(f"note: nnU-Net planned patch {prep['nn_patch']}, medseg {prep['ms_patch']}; both run at medseg's")
    patch = [str(x) for x in prep["ms_patch"]]
    nn_feats = prep["nn_features"]
    all_settings = {
        "nnunet-batch": (f"nnU-Net network, nnU-Net's batch ({prep['nn_batch']})", nn_feats, prep["nn_batch"]),
        "nnunet-net-b2": ("nnU-Net network, batch 2", nn_feats, 2),
        "medseg-plan-b2": (f"medseg CPU plan network, batch {prep['ms_batch']}", prep["ms_features"], prep["ms_batch"]),
    }
    settings = {k: all_settings[k] for k in args.settings.split(",")}
    if args.quick and prep["nn_batch"] == 2:
        settings.pop("nnunet-batch", None)  # identical to nnunet-net-b2 on a tiny dataset
    da_variants = [v.strip() for v in args.nnunet_da_procs.split(",")]

    runs: dict[tuple, list[dict]] = {}
    for key, (label, feats, batch) in settings.items():
        # medseg at its default precision (bf16 autocast on CPUs with native bf16) and forced fp32
        variants = [("medseg", "auto"), ("medseg", "fp32")] + [("nnU-Net", da) for da in da_variants]
        for r in range(args.repeats):
            order = variants if r % 2 == 0 else list(reversed(variants))
            for fw, da in order:
                res_file = args.workdir / f"result_{key}_{fw}_{da}_{r}.json"
                res_file.unlink(missing_ok=True)
                common = [
                    "--batch",
                    str(batch),
                    "--features",
                    *map(str, feats),
                    "--patch",
                    *patch,
                    "--warmup",
                    str(args.warmup),
                    "--iters",
                    str(args.iters),
                    "--threads",
                    str(args.threads),
                    "--result",
                    str(res_file),
                ]
                if fw == "medseg":
                    out = args.workdir / "medseg_out"
                    shutil.rmtree(out, ignore_errors=True)
                    cmd = [
                        ms_py,
                        C.BENCH_DIR / "_train_medseg.py",
                        "--preprocessed",
                        prep["ms_pre"],
                        "--output",
                        out,
                        "--precision",
                        da,
                        *common,
                    ]
                    env = None
                else:
                    shutil.rmtree(prep["nn_results"], ignore_errors=True)
                    prep["nn_results"].mkdir(parents=True)
                    cmd = [
                        nn_py,
                        C.BENCH_DIR / "_train_nnunet.py",
                        "--dataset",
                        f"Dataset{DS_ID:03d}_{DS_NAME}",
                        *common,
                    ]
                    env = dict(prep["env"])
                    if da != "auto":
                        env["nnUNet_n_proc_DA"] = da
                tag = fw + (f" ({da})" if fw == "medseg" else f" (DA procs {da})")
                C.log(f"{label}: {tag}, repeat {r + 1}/{args.repeats}")
                m = C.run_measured(cmd, env=env, log_file=logdir / f"{key}_{fw}_{da}.log")
                res = json.loads(res_file.read_text())
                res.update(m)
                runs.setdefault((key, fw, da), []).append(res)
                C.log(
                    f"  median {C.median(res['iter_s']):.3f} s/it, tree PSS {m['tree_pss_mb']:.0f} MB, "
                    f"{res['params'] / 1e6:.2f}M params, {res['da_processes']} DA procs"
                )

    versions = {
        "nnU-Net env": C.package_versions(nn_py, ["nnunetv2", "batchgeneratorsv2", "torch", "numpy"]),
        "medseg env": C.package_versions(ms_py, ["medseg", "torch", "numpy"]),
    }
    lines = C.header_lines(
        "Training throughput: nnU-Net v2 nnUNetTrainer vs medseg Trainer", info, versions, args.quick
    )
    lines += [
        f"MSD hippocampus, {prep['cases']} cases preprocessed by each tool, 3d_fullres, fold 0 training cases, "
        f"patch {prep['ms_patch']} for both (nnU-Net planned {prep['nn_patch']}, batch {prep['nn_batch']}, "
        f"features {prep['nn_features']}). CPU; nnU-Net in fp32 (it uses AMP only on CUDA and disables "
        "torch.compile on CPU), medseg at its default precision (`amp=None`: bf16 autocast on CPUs with native "
        f"bf16, fp32 elsewhere) and in fp32 (`--no-amp`); {args.threads} torch threads, {args.warmup} warm-up + {args.iters} timed iterations per "
        f"process, {args.repeats} process(es) per row; s/iteration is the median over all timed iterations "
        "(min–max of the per-process medians in brackets). Both include sampling, augmentation, forward, "
        "deep-supervision Dice+CE, backward, grad-clip 12, SGD step; neither includes validation, "
        "checkpointing or logging.",
        "",
        "| setting | framework | params | s/iteration | data s/it ¹ | peak PSS of the process tree, MB | "
        "largest process RSS, MB | processes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratio_lines = []
    for key, (label, _feats, _batch) in settings.items():
        ms_runs, fp32_runs = runs[(key, "medseg", "auto")], runs[(key, "medseg", "fp32")]
        ms_med = C.median([t for r in ms_runs for t in r["iter_s"]])
        fp32_med = C.median([t for r in fp32_runs for t in r["iter_s"]])
        for (k2, fw, da), rs in runs.items():
            if k2 != key:
                continue
            pooled = [t for r in rs for t in r["iter_s"]]
            per_proc = [C.median(r["iter_s"]) for r in rs]
            med = C.median(pooled)
            fw_label = (
                f"medseg, {rs[0]['precision']}" + (" (medseg default)" if da == "auto" else "")
                if fw == "medseg"
                else f"nnU-Net, {rs[0]['da_processes']} DA worker(s)" + (" (nnU-Net default)" if da == "auto" else "")
            )
            rng = f" ({C.fmt(min(per_proc), 3)}–{C.fmt(max(per_proc), 3)})" if len(per_proc) > 1 else ""
            lines.append(
                f"| {label} | {fw_label} | {rs[0]['params'] / 1e6:.2f}M | {C.fmt(med, 3)}{rng} | "
                f"{C.fmt(C.median([t for r in rs for t in r['data_wait_s']]), 3)} | "
                f"{C.fmt(C.median([r['tree_pss_mb'] for r in rs]), 0)} | "
                f"{C.fmt(C.median([r['max_rss_mb'] for r in rs]), 0)} | {rs[0]['max_procs']} |"
            )
            if fw != "medseg":
                ratio_lines.append(
                    f"| {label} | {fw_label} | {C.fmt(med / ms_med if ms_med else None)}x | "
                    f"{C.fmt(med / fp32_med if fp32_med else None)}x | "
                    f"{C.fmt(C.median([r['tree_pss_mb'] for r in rs]) / C.median([r['tree_pss_mb'] for r in ms_runs]))}x |"
                )
    lines += [
        "",
        "¹ medseg: time spent sampling + augmenting the batch inline (batched torch ops on the training "
        "device); nnU-Net: time the main process waited for a batch from its augmentation workers "
        "(augmentation itself runs in parallel in those workers).",
        "",
        "Ratios nnU-Net / medseg (> 1: medseg is faster / smaller):",
        "",
        "| setting | nnU-Net variant | s/iteration ratio (vs medseg default) | s/iteration ratio (vs medseg fp32) "
        "| peak tree PSS ratio (vs medseg default) |",
        "|---|---|---|---|---|",
        *ratio_lines,
        "",
        "Not comparable: nnU-Net's augmentation workers (separate processes, default min(12, cores)) overlap "
        "with the training step and share the same cores; medseg augments in the training process "
        "(on the GPU when there is one). nnU-Net's 3d_fullres plan uses `batch_dice: false`, medseg's "
        "TrainingConfig `batch_dice=True` (negligible cost). nnU-Net's loss/augmentation details "
        "(e.g. its spatial transform's patch-centre sampling) differ in small ways.",
        "",
        f"Logs of every run: `{logdir}`.",
        "",
    ]
    (args.workdir / "results.json").write_text(
        json.dumps({f"{k[0]}|{k[1]}|{k[2]}": v for k, v in runs.items()}, indent=1, default=str)
    )
    C.write_results(NAME, lines, args.quick, args.out)


if __name__ == "__main__":
    main()
