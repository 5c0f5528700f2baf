"""bench_ood's evaluation: predict the test VOIs with every OOD score through `medseg predict --ood-map`,
then inlier Dice (held-out solid nodules), Dice on the OOD nodules, and the OOD metrics."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

from _common import REPO, log, medseg_python

from medseg.evaluation.metrics import evaluate_folder
from medseg.evaluation.ood import evaluate_ood
from medseg.io.checkpoint import load_spec

GROUPS = ("all", "ggo", "calcified")


def predict(work: Path, name: str, scores: list[str]) -> Path:
    """One `medseg predict` run per model, every OOD score from the same forward pass (the first as
    CASE_ood, the others as CASE_ood_<score>)."""
    out = work / "predictions" / name
    if (out / "manifest.json").exists():
        return out
    cmd = [str(medseg_python()), "-m", "medseg", "predict", "-m", str(work / "models" / name),
           "-i", str(work / "test" / "imagesTr"), "-o", str(out), "--ood-map"]  # fmt: skip
    for score in scores:
        cmd += ["--ood-score", score]
    log(" ".join(cmd[2:]))
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return out


def suffix(scores: list[str], score: str) -> str:
    return "_ood" if score == scores[0] else f"_ood_{score}"


def dice(pred: Path, ref: Path, cases: list[str]) -> float:
    s = evaluate_folder(pred, ref, {"background": 0, "nodule": 1}, names=cases, progress=False)
    return round(s["mean"]["nodule"]["dice"], 4)


def seconds_per_case(pred: Path) -> float:
    runs = [c["seconds"] for c in json.loads((pred / "manifest.json").read_text())["cases"] if not c["skipped"]]
    return round(statistics.median(runs), 3)


def ood_row(pred: Path, ref: Path, split: dict, score_suffix: str) -> dict:
    s = evaluate_ood(pred, ref, split["test_ood"], score_suffix=score_suffix)
    row = {"all": {k: s[k] for k in ("auroc", "aupr", "fpr95", "case_auroc")}}
    for g in ("ggo", "calcified"):
        row[g] = {k: s["groups"][g].get(k) for k in ("auroc", "aupr", "fpr95", "case_auroc")}
    return row


def evaluate_models(work: Path, split: dict, models: list[str], scores: dict[str, list[str]]) -> dict:
    ref = work / "test" / "labelsTr"
    ood_cases = sorted(split["test_ood"])
    by_group = {g: [c for c, k in split["test_ood"].items() if k == g] for g in ("ggo", "calcified")}
    out: dict = {"models": {}, "split": {k: len(v) for k, v in split.items() if k != "protocol"}}
    for name in models:
        spec = load_spec(work / "models" / name)
        first = predict(work, name, scores[name])
        out["models"][name] = {
            "arch": spec.model,
            "params": int(sum(v.numel() for v in _weights(work / "models" / name).values())),
            "seconds_per_case": seconds_per_case(first),
            "dice_inlier": dice(first, ref, split["test_inlier"]),
            "dice_ggo": dice(first, ref, by_group["ggo"]),
            "dice_calcified": dice(first, ref, by_group["calcified"]),
            "ood": {score: ood_row(first, ref, split, suffix(scores[name], score)) for score in scores[name]},
        }
        log(f"{name}: inlier Dice {out['models'][name]['dice_inlier']}")
    out["ood_cases"] = len(ood_cases)
    out["markdown"] = markdown(out)
    return out


def _weights(folder: Path) -> dict:
    from medseg.io.checkpoint import load_weights

    return load_weights(folder / "fold_all")


def _f(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(res: dict) -> list[str]:
    lines = ["## Inlier segmentation (held-out solid nodules) and size", "",
             "| model | params | s/case (TTA) | Dice solid (inlier) | Dice GGO | Dice calcified |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, m in res["models"].items():
        lines.append(f"| {name} ({m['arch']}) | {m['params'] / 1e6:.2f} M | {m['seconds_per_case']:.3f} | "
                     f"{m['dice_inlier']:.4f} | {m['dice_ggo']:.4f} | {m['dice_calcified']:.4f} |")  # fmt: skip
    lines += ["", "## OOD localisation (pixel level; case AUROC from the max score per VOI)", "",
              "| model | score | " + " | ".join(f"{g} AUROC ↑ | {g} AUPR ↑ | {g} FPR95 ↓" for g in GROUPS)
              + " | case AUROC (all) ↑ |",
              "|---|---|" + "---:|" * (3 * len(GROUPS) + 1)]  # fmt: skip
    for name, m in res["models"].items():
        for score, row in m["ood"].items():
            cells = [f"{_f(row[g]['auroc'])} | {_f(row[g]['aupr'])} | {_f(row[g]['fpr95'])}" for g in GROUPS]
            lines.append(f"| {name} | {score} | " + " | ".join(cells) + f" | {_f(row['all']['case_auroc'])} |")
    return lines
