#!/usr/bin/env python3
"""Sliding-window inference, side by side: MONAI ``sliding_window_inference`` vs medseg's
``sliding_window_predict``, same network, same weights, same volume.

Both run in one peer environment, benchmarks/.venvs/monai: monai 1.6 from PyPI plus medseg
installed editable with its own dependencies, on the same CPU torch 2.13.0 as medseg's .venv
(monai needs only numpy + torch). The network is medseg's registry U-Net (``unet``, deep
supervision off) built with a fixed seed, so every process has identical weights; MONAI gets
that module as its predictor. Settings for both: overlap 0.5 (medseg step 0.5), Gaussian
blending with sigma = tile/8, no test-time augmentation, the same sw_batch_size / tile_batch,
``torch.inference_mode()``, all cores as torch threads.

Each (size, method) runs in its own process (one-tile warm-up, then --repeats timed passes)
so peak memory is per method; reported: voxels/s from the median time, peak RSS, ratio.
Agreement: max abs difference of the final logits (MONAI's own Gaussian differs from medseg's
only at the tile borders: MONAI clamps weights to >= 1e-3), plus an exactness check on a small
volume where MONAI is given medseg's Gaussian as ``roi_weight_map``. The default tile 64^3
makes both tilers place exactly the same tiles at 256^3 and 160^3 ((256-64)/32 and (160-64)/32
are integers); the script reports when a tile grid differs.

Run from the repository root:  python3 benchmarks/bench_sliding_window.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "sliding_window"
MONAI_CHECK = "import monai, medseg, numpy; from monai.inferers import sliding_window_inference"


def medseg_starts(im: int, t: int, step: float) -> list[int]:
    """medseg.inference.sliding_window.tile_starts for one axis."""
    if im <= t:
        return [0]
    n = int(math.ceil((im - t) / max(t * step, 1.0))) + 1
    stride = (im - t) / (n - 1)
    return sorted({int(round(stride * i)) for i in range(n)})


def monai_starts(im: int, t: int, overlap: float) -> list[int]:
    """monai.inferers.utils._get_scan_interval + monai.data.utils.dense_patch_slices for one axis."""
    if im <= t:
        return [0]
    interval = max(int(t * (1 - overlap)), 1)
    num = next(d for d in range(im) if d * interval + t >= im) + 1
    return [min(i * interval, im - t) for i in range(num)]


def grid_info(size, patch, overlap):
    ms = [medseg_starts(s, t, 1 - overlap) for s, t in zip(size, patch)]
    mo = [monai_starts(s, t, overlap) for s, t in zip(size, patch)]
    return {
        "tiles_medseg": math.prod(len(a) for a in ms),
        "tiles_monai": math.prod(len(a) for a in mo),
        "same_grid": ms == mo,
    }


DIFF_HEADER = (
    "| volume | same tile grid | max abs logit | max abs difference | mean abs difference | "
    "max abs difference, interior | argmax agreement |"
)
DIFF_RULE = "|---|---|---|---|---|---|---|"


def diff_row(label, same_grid, d) -> str:
    interior = "n/a" if d["max_abs_diff_interior"] is None else f"{d['max_abs_diff_interior']:.3g}"
    return (
        f"| {label} | {'yes' if same_grid else 'NO'} | {d['max_abs_logit']:.3g} | {d['max_abs_diff']:.3g} | "
        f"{d['mean_abs_diff']:.3g} | {interior} | {100 * d['argmax_agree']:.4f} % |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p, workdir_default="medseg_bench_sliding_window")
    p.add_argument("--sizes", default="256,160", help="Comma list of cubic volume sizes (default: %(default)s).")
    p.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64], help="Tile size (default: 64 64 64).")
    p.add_argument(
        "--features",
        type=int,
        nargs="+",
        default=[16, 32, 64, 128],
        help="U-Net features per stage (default: medseg's CPU hippocampus plan, 16 32 64 128).",
    )
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument(
        "--sw-batch",
        type=int,
        default=1,
        help="MONAI sw_batch_size = medseg tile_batch (default: 1, medseg's CPU default).",
    )
    p.add_argument(
        "--precisions",
        default="fp32,bf16",
        help="Comma list: fp32 and/or bf16 (the network under bf16 autocast, for both tilers) (default: %(default)s).",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=C.usable_cores())
    p.add_argument("--check-size", type=int, default=96, help="Volume for the exactness check (default: 96).")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.patch, args.features, args.repeats, args.check_size = "64,48", [32, 32, 32], [8, 16], 2, 48

    info = C.machine_info()
    C.guard_busy(info, args.allow_busy, args.quick)
    py = C.ensure_venv("monai", MONAI_CHECK, rebuild=args.rebuild_venv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    logdir = args.workdir / "logs"
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir()
    common = [
        "--patch",
        *map(str, args.patch),
        "--features",
        *map(str, args.features),
        "--classes",
        str(args.classes),
        "--overlap",
        str(args.overlap),
        "--sw-batch",
        str(args.sw_batch),
        "--threads",
        str(args.threads),
    ]
    worker = C.BENCH_DIR / "_sw_worker.py"

    rows = []
    jobs = [(int(s), prec) for s in args.sizes.split(",") for prec in args.precisions.split(",")]
    for size, prec in jobs:
        vol = [size] * 3
        grid = grid_info(vol, args.patch, args.overlap)
        res = {}
        amp = ["--amp"] if prec == "bf16" else []
        for method in ("medseg", "monai"):
            out = args.workdir / f"logits_{size}_{method}.npy"
            rfile = args.workdir / f"result_{size}_{prec}_{method}.json"
            C.log(
                f"{size}^3 {prec}: {method} ({grid['tiles_medseg'] if method == 'medseg' else grid['tiles_monai']} "
                f"tiles, {args.repeats} repeats)"
            )
            m = C.run_measured(
                [
                    py,
                    worker,
                    "--method",
                    method,
                    "--size",
                    *map(str, vol),
                    "--repeats",
                    str(args.repeats),
                    "--save",
                    out,
                    "--result",
                    rfile,
                    *amp,
                    *common,
                ],
                log_file=logdir / f"{size}_{prec}_{method}.log",
            )
            r = json.loads(rfile.read_text())
            r.update(m)
            r["median_s"] = C.median(r["times_s"])
            res[method] = r
            C.log(
                f"  median {r['median_s']:.2f} s, {math.prod(vol) / r['median_s'] / 1e6:.2f} Mvox/s, "
                f"peak RSS {m['max_rss_mb']:.0f} MB"
            )
        dfile = args.workdir / f"diff_{size}.json"
        subprocess.run(
            [
                str(py),
                worker,
                "--method",
                "compare",
                "--compare",
                str(args.workdir / f"logits_{size}_medseg.npy"),
                str(args.workdir / f"logits_{size}_monai.npy"),
                "--result",
                str(dfile),
                *common,
            ],
            check=True,
        )
        for method in ("medseg", "monai"):
            (args.workdir / f"logits_{size}_{method}.npy").unlink(missing_ok=True)
        rows.append({"size": size, "precision": prec, "grid": grid, "res": res, "diff": json.loads(dfile.read_text())})

    C.log(f"exactness check on {args.check_size}^3 (MONAI with medseg's Gaussian as roi_weight_map)")
    cfile = args.workdir / "check.json"
    C.run_measured(
        [py, worker, "--method", "check", "--size", *[str(args.check_size)] * 3, "--result", cfile, *common],
        log_file=logdir / "check.log",
    )
    check = json.loads(cfile.read_text())
    check["grid"] = grid_info([args.check_size] * 3, args.patch, args.overlap)

    versions = {"peer env (benchmarks/.venvs/monai)": C.package_versions(py, ["monai", "medseg", "torch", "numpy"])}
    lines = C.header_lines("Sliding-window inference: MONAI vs medseg", info, versions, args.quick)
    params = rows[0]["res"]["medseg"]["params"] if rows else check["params"]
    lines += [
        f"Network: medseg registry `unet`, features {args.features}, {args.classes} classes, deep supervision "
        f"off, {params / 1e6:.2f}M parameters, seeded weights (identical in every process), 1 input channel, "
        f"random N(0,1) volume. Tile {args.patch}, overlap {args.overlap} (medseg step {1 - args.overlap}), "
        f"Gaussian blending (sigma = tile/8), no TTA, sw_batch_size = tile_batch = {args.sw_batch}, "
        f"`torch.inference_mode()`, {args.threads} torch threads, CPU; precision fp32, or bf16 = the network "
        "under `torch.autocast(bfloat16)` returning float32 logits, the same wrapper for both tilers (what "
        "medseg's Predictor does by default on CPUs with native bf16). One process per row: one-tile "
        f"warm-up, then {args.repeats} timed passes; voxels/s from the median. Both run in "
        "`benchmarks/.venvs/monai` (monai from PyPI + medseg installed editable with its own dependencies, "
        "same torch as medseg's `.venv`).",
        "",
        "| volume | precision | method | tiles | s, median (min–max) | Mvoxels/s | peak RSS, MB "
        "| ratio MONAI/medseg time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        vox = row["size"] ** 3
        ms, mo = row["res"]["medseg"], row["res"]["monai"]
        for name, r, tiles in (
            ("medseg `sliding_window_predict`", ms, row["grid"]["tiles_medseg"]),
            ("MONAI `sliding_window_inference`", mo, row["grid"]["tiles_monai"]),
        ):
            ratio = C.fmt(mo["median_s"] / ms["median_s"]) + "x" if r is mo else ""
            lines.append(
                f"| {row['size']}³ | {row['precision']} | {name} | {tiles} | {C.spread(r['times_s'])} | "
                f"{vox / r['median_s'] / 1e6:.2f} | {C.fmt(r['max_rss_mb'], 0)} | {ratio} |"
            )
    lines += [
        "",
        "Ratio > 1: medseg is faster. Peak RSS: largest process (one method per process).",
        "",
        "Agreement of the final logits (medseg vs MONAI, each with its own Gaussian):",
        "",
        DIFF_HEADER,
        DIFF_RULE,
    ]
    for row in rows:
        lines.append(diff_row(f"{row['size']}³ {row['precision']}", row["grid"]["same_grid"], row["diff"]))
    lines += [
        "",
        f"Exactness check, {args.check_size}³ volume, both in one process:",
        "",
        DIFF_HEADER,
        DIFF_RULE,
        diff_row(f"{args.check_size}³, MONAI own Gaussian", check["grid"]["same_grid"], check["monai_gaussian"]),
        diff_row(
            f"{args.check_size}³, MONAI given medseg's Gaussian as `roi_weight_map`",
            check["grid"]["same_grid"],
            check["monai_medseg_weights"],
        ),
        "",
        "Interior = more than half a tile away from the volume border. The own-Gaussian differences come "
        "from the weight maps only: MONAI clamps its Gaussian to >= 1e-3 (so near tile corners and at the "
        "volume border several tiles get equal weight), medseg keeps the exact Gaussian (floored at its "
        "smallest positive value); with the same weight map the two tilers agree to float rounding.",
        "",
        f"Logs: `{logdir}`.",
        "",
    ]
    (args.workdir / "results.json").write_text(json.dumps({"rows": rows, "check": check}, indent=1, default=str))
    C.write_results(NAME, lines, args.quick, args.out)


if __name__ == "__main__":
    main()
