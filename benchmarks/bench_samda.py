"""Few-shot domain adaptation, measured: SAMDA vs fine-tuning, MSD hippocampus -> IXI (issue 15).

Source: ``msd_hippocampus`` (Vanderbilt, 1 mm, manual anterior/posterior), fold 0 of medseg's split
(166 training cases). Target: ``ixi_hippocampus_target`` (Hammersmith, 2 mm, P-S-R voxel order,
DLMUSE whole-hippocampus masks). The 40 target subjects are split once (seeded, by subject) into a
pool of 20 (shots are drawn from it) and a test set of 20 (40 crops), never seen by any run.

Methods, each adapted with the same procedure and budget (``medseg adapt``: few-shot fine-tuning on
the k subjects' crops, then joint fine-tuning with the source dataset, labels merged anterior +
posterior -> hippocampus), k in {1, 2, 5, 10} subjects, three draws of the shots each:

* ``unet3d``: the shipped 3D ``hippocampus`` model (fine-tuning with ``--pretrained``);
* ``unet2d``: medseg's 2D U-Net (the plan's 2d configuration) trained on the source, no SAM;
* ``samda``: the same 2D U-Net with the frozen LiteMedSAM slice embedding fused at stride 4.

Also scored: every source model directly (no target label, labels merged by ``--label-map``), and
each run after its few-shot step alone. Metrics: whole-hippocampus Dice and HD95 on the 40 test
crops (mean over crops), then mean and spread (std) over the three draws. Everything resumes: rerun
the same command and finished runs are read back. medseg runs through its CLI::

    .venv/bin/python benchmarks/bench_samda.py                 # ~4-5 h on 2 cores
    .venv/bin/python benchmarks/bench_samda.py --quick         # smoke test, ~15 min
    .venv/bin/python benchmarks/bench_samda.py --report-only   # tables + plot from finished runs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, default_data_root, log, machine_info  # noqa: E402

MEDSEG = str(Path(sys.executable).parent / "medseg")  # the medseg of the running venv
PATTERN = "^(ixi_[^_]+)_"
MERGE = {"Anterior": "hippocampus", "Posterior": "hippocampus"}
METHODS = ("unet3d", "unet2d", "samda")
LABELS = {"unet3d": "3D U-Net fine-tuned", "unet2d": "2D U-Net fine-tuned", "samda": "SAMDA (2D U-Net + SAM)"}


def medseg(*args, log_file: Path | None = None) -> None:
    cmd = [MEDSEG, *map(str, args)]
    log(" ".join(cmd))
    with open(log_file, "a") if log_file else open(os.devnull, "w") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT if log_file else None)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}" + (f" (log: {log_file})" if log_file else ""))


def split_subjects(target: Path, seed: int = 2026) -> tuple[list[str], list[str]]:
    """(pool subjects, test cases): half the subjects each, seeded."""
    import random

    names = sorted(p.name[: -len(".nii.gz")] for p in (target / "labelsTr").glob("*.nii.gz"))
    subjects = sorted({re.match(PATTERN, n).group(1) for n in names})
    random.Random(seed).shuffle(subjects)
    test_subjects = set(subjects[: len(subjects) // 2])
    return sorted(set(subjects) - test_subjects), [n for n in names if re.match(PATTERN, n).group(1) in test_subjects]


def train_sources(args, ws: Path, out: Path) -> dict[str, Path]:
    """The three source models: the shipped 3D one, and the two 2D ones trained here (resumable)."""
    src = args.source_data
    if not (ws / "preprocessed").is_dir():
        medseg("plan", src, "-w", ws)
        medseg("preprocess", src, "-w", ws, "-c", "2d")
    sources = {"unet3d": Path("hippocampus")}
    for name, extra in (("unet2d", []), ("samda", ["--arch", "samda", "--model-kwargs", '{"sam_input_size": 128}'])):
        folder = out / "sources" / name
        if not (folder / "fold_0" / "validation" / "summary.json").is_file():  # trained and validated: done
            resume = ["--resume"] if (folder / "fold_0" / "training_state.pt").is_file() else []
            medseg("train", src, "-w", ws, "-c", "2d", "-f", "0", *extra, "--epochs", args.source_epochs,
                   "--iterations", args.source_iterations, "--checkpoint-every", 2, "-o", folder, *resume,
                   log_file=out / "logs" / f"source_{name}.log")  # fmt: skip
        sources[name] = folder
    return sources


def direct(sources: dict, args, out: Path, test_dir: Path, lm: Path) -> dict:
    """Every source model on the test crops with no target training (labels merged)."""
    results = {}
    for name, model in sources.items():
        d = out / "direct" / name
        if not (d / "summary.json").is_file():
            medseg("predict", "-m", model, "-i", test_dir, "-o", d / "pred", "--label-map", lm, "--overwrite")
            medseg("evaluate", "-i", d / "pred", "-r", args.target_data / "labelsTr",
                   "-l", args.target_data / "dataset.json", "-o", d / "summary.json")  # fmt: skip
        results[name] = json.loads((d / "summary.json").read_text())
    return results


def adapt_run(method, model, k, draw, args, out, ws, test_file, lm) -> Path:
    run = out / "adapted" / f"{method}_k{k}_d{draw}"
    if (run / "adaptation" / "summary.json").is_file():
        return run
    shutil.rmtree(run, ignore_errors=True)  # published but not scored: score again (the steps resume)
    medseg("adapt", "-m", model, "--target", args.target_data, "--shots", k, "--seed", draw,
           "--subject-pattern", PATTERN, "--test-cases", test_file, "--label-map", lm, "--source", args.source_data,
           "-w", ws, "--epochs", args.adapt_epochs, "--joint-epochs", args.joint_epochs,
           "--iterations", args.adapt_iterations, "-o", run, log_file=out / "logs" / f"{run.name}.log")  # fmt: skip
    return run


def _scores(summary: dict) -> tuple[float, float]:
    m = summary["mean"]["hippocampus"]
    return m["dice"], m["hd95"]


def _agg(values: list) -> str:
    values = [v for v in values if v is not None]  # HD95 is undefined where a prediction is empty
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


BUDGET = ("source_epochs", "source_iterations", "adapt_epochs", "joint_epochs", "adapt_iterations")


def load_reused(path: Path | None, args) -> dict:
    """{(method, k, draw): {"final": (dice, hd95), "fewshot": ...}} from an earlier run's samda.json.

    An earlier run's rows hold its draws in order (every cell of a draw-major run has draws 0..n-1),
    so row i is draw i. Those runs are not repeated; the sources of new draws are trained here.
    """
    if path is None:
        return {}
    try:
        saved = json.loads(path.read_text())
        table, old = saved["table"], saved["args"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not a bench_samda results file ({e})") from None
    differ = [f"--{b.replace('_', '-')} {old.get(b)} (now {getattr(args, b)})" for b in BUDGET if old.get(b) != str(getattr(args, b))]
    if differ:
        raise SystemExit(f"{path}: its draws were run with other budgets: " + ", ".join(differ))
    reused = {}
    for cell, rows in table.items():
        m, k = cell.rsplit("_k", 1)
        for d, (final, fewshot) in enumerate(zip(rows["final"], rows["fewshot"])):
            reused[(m, int(k), d)] = {"final": tuple(final), "fewshot": tuple(fewshot)}
    return reused


def collect(out: Path, shots, draws, reused: dict) -> dict:
    table = {}
    for m in METHODS:
        for k in shots:
            rows = {"final": [], "fewshot": []}
            for d in range(draws):
                if (m, k, d) in reused:
                    for step in rows:
                        rows[step].append(reused[(m, k, d)][step])
                    continue
                run = out / "adapted" / f"{m}_k{k}_d{d}" / "adaptation"
                for step, path in (("final", run / "summary.json"), ("fewshot", run / "fewshot" / "summary.json")):
                    if path.is_file():
                        rows[step].append(_scores(json.loads(path.read_text())))
            table[f"{m}_k{k}"] = rows
    return table


def _draws_done(table: dict) -> str:
    counts = sorted({len(rows["final"]) for rows in table.values()})
    return " to ".join(map(str, counts)) + " per cell"


def report(out: Path, args, direct_results: dict, elapsed: float, reused: dict) -> str:
    table = collect(out, args.shots, args.draws, reused)
    lines = ["| method | " + " | ".join(f"k = {k}" for k in args.shots) + " |", "|---|" + "---:|" * len(args.shots)]
    for step, what in (("final", "few-shot + joint"), ("fewshot", "few-shot step only")):
        for m in METHODS:
            cells = [_agg([r[0] for r in table[f"{m}_k{k}"][step]]) for k in args.shots]
            lines.append(f"| {LABELS[m]}, {what} | " + " | ".join(cells) + " |")
    hd = ["", "HD95 (mm), few-shot + joint:", "", lines[0], lines[1]]
    for m in METHODS:
        hd.append(
            f"| {LABELS[m]} | "
            + " | ".join(_agg([r[1] for r in table[f"{m}_k{k}"]["final"]]) for k in args.shots)
            + " |"
        )
    direct_lines = ["", "Source models on the test crops, no target label (Dice / HD95):", ""]
    for name, s in direct_results.items():
        dice, hd95 = _scores(s)
        direct_lines.append(f"* {name}: {dice:.3f} / " + (f"{hd95:.2f} mm" if hd95 is not None else "HD95 undefined"))
    text = "\n".join(
        [f"Dice (mean over the 40 test crops; mean ± std over the draws of the shots: {_draws_done(table)}):", "", *lines, *hd, *direct_lines]
    )
    (RESULTS / "samda.json").write_text(json.dumps({"table": table, "direct": {k: _scores(v) for k, v in direct_results.items()},
                                                     "machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
                                                     "elapsed_s": round(elapsed)}, indent=1))  # fmt: skip
    (RESULTS / "samda.md").write_text(text + "\n")
    plot(table, direct_results, args.shots, REPO / "docs" / "images" / "samda_shots.png")
    return text


def plot(table: dict, direct_results: dict, shots, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for m, colour in zip(METHODS, ("tab:blue", "tab:orange", "tab:green")):
        ks = [k for k in shots if table[f"{m}_k{k}"]["final"]]
        means = [statistics.mean(r[0] for r in table[f"{m}_k{k}"]["final"]) for k in ks]
        sds = [statistics.pstdev([r[0] for r in table[f"{m}_k{k}"]["final"]]) for k in ks]
        ax.errorbar(ks, means, yerr=sds, marker="o", capsize=3, label=LABELS[m], color=colour)
        if m in direct_results:
            ax.axhline(_scores(direct_results[m])[0], color=colour, ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xticks(list(shots), [str(k) for k in shots])
    ax.set_xlabel("labelled target subjects (k)")
    ax.set_ylabel("whole-hippocampus Dice, IXI test crops")
    ax.set_title("MSD -> IXI few-shot adaptation (dotted: source model, no adaptation)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    data = default_data_root()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source-data", type=Path, default=data / "msd_hippocampus")
    ap.add_argument("--target-data", type=Path, default=data / "ixi_hippocampus_target")
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "samda")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 2, 5, 10])
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--source-epochs", type=int, default=20)
    ap.add_argument("--source-iterations", type=int, default=250)
    ap.add_argument("--adapt-epochs", type=int, default=10)
    ap.add_argument("--joint-epochs", type=int, default=10)
    ap.add_argument("--adapt-iterations", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="1 draw of k = 1, 2, tiny budgets (smoke test)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--reuse", type=Path, help="an earlier run's samda.json: its draws are read, not rerun")
    args = ap.parse_args()
    if args.quick:
        args.shots, args.draws, args.source_epochs, args.source_iterations = [1, 2], 1, 1, 20
        args.adapt_epochs, args.joint_epochs, args.adapt_iterations = 1, 1, 5
        args.workdir = args.workdir.with_name(args.workdir.name + "_quick")
    out, t0 = args.workdir, time.time()
    ws = (
        out.with_name(out.name.removesuffix("_quick")) / "ws"
    )  # shared with --quick: one preprocessing, one embedding cache
    (out / "logs").mkdir(parents=True, exist_ok=True)
    pool, test = split_subjects(args.target_data)
    test_file, lm, test_dir = out / "test_cases.txt", out / "label_map.json", out / "test_images"
    test_file.write_text("\n".join(test) + "\n")
    lm.write_text(json.dumps(MERGE))
    test_dir.mkdir(exist_ok=True)
    for n in test:
        link = test_dir / f"{n}_0000.nii.gz"
        if not link.exists():
            link.symlink_to(args.target_data.resolve() / "imagesTr" / link.name)
    log(f"target split: {len(pool)} pool subjects, {len(test)} test crops")
    reused = load_reused(args.reuse, args)  # before any training: a wrong file fails at once
    sources = train_sources(args, ws, out) if not args.report_only else {
        "unet3d": Path("hippocampus"), "unet2d": out / "sources" / "unet2d", "samda": out / "sources" / "samda"}  # fmt: skip
    direct_results = direct(sources, args, out, test_dir, lm)
    if not args.report_only:
        for draw in range(args.draws):  # draw-major: every k has as many draws as possible at any time
            for k in args.shots:
                for m in args.methods:
                    if (m, k, draw) not in reused:
                        adapt_run(m, sources[m], k, draw, args, out, ws, test_file, lm)
                        log(report(out, args, direct_results, time.time() - t0, reused).splitlines()[4 + METHODS.index(m)])
    print(report(out, args, direct_results, time.time() - t0, reused))


if __name__ == "__main__":
    main()
