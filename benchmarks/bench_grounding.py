"""Cross-validated text-guided lesion grounding (ConTEXTual Net 3D, issue 11) on the 51 real FDG-PET
sarcoma crops of sts_fdg_petct: which input tells the network *which* finding a sentence names?

Same 5 folds (grouped by crop: the 3 generated sentences of one crop never straddle a split), same
budget and recipe for every trained variant of ``contextual_unet`` (the plan's U-Net on the PET in SUV):

* ``image``      — no text, no facts: the PET alone ("segment the lesion").
* ``text``       — the sentence with its numbers removed, as the paper feeds RadBERT (here MiniLM).
* ``facts``      — no text; the parsed facts as two extra channels (a band around the named image,
                   the PET window around the quoted SUVmax).
* ``text_facts`` — the number-free text and the facts.
* ``weak``       — the non-learned weak labeller (medseg.reports.weak_label) on the sentence's facts.

Every held-out sentence is grounded with ``medseg.apps.ground`` (mirror TTA, most probable component
kept, as the tool does) and scored against the manual GTV: F1 as published (a predicted component is
a true positive if it overlaps the lesion and its SUVmax is within 0.1 of the lesion's; pooled over
sentences; medseg.evaluation.grounding) and Dice; on all crops and on the crops with uptake hotter
than the lesion. Training labels: the manual GTVs (``--labels gtv`` dataset) — the weak-label-trained
model is a separate row when ``--weak-dataset`` is given.

Prepare once (docs/grounding.md), then run (resumable: finished trainings are skipped):

    python benchmarks/grounding_dataset.py -o workspace/grounding/sts
    medseg plan workspace/grounding/sts -w workspace/grounding/ws --normalization 0=none
    medseg preprocess workspace/grounding/sts -w workspace/grounding/ws
    .venv/bin/python benchmarks/bench_grounding.py
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, default_data_root, header_lines, log, machine_info, package_versions, write_results  # noqa: E402

NAME = "grounding_cv"
ENCODERS: dict = {}
VARIANTS = {
    "image": {"text_input": None, "facts": False},
    "text": {"text_input": "text_nonum", "facts": False},
    "facts": {"text_input": None, "facts": True},
    "text_facts": {"text_input": "text_nonum", "facts": True},
}
SHORT = {"image": "image", "text": "text", "facts": "facts", "text_facts": "text+facts", "weak": "weak labeller",
         "text_facts_weak": "t+f weak-trained"}  # fmt: skip
LABELS = {"image": "image only", "text": "text only (numbers removed)", "facts": "facts only",
          "text_facts": "text + facts", "weak": "weak labeller (no training)",
          "text_facts_weak": "text + facts, trained on weak labels"}  # fmt: skip


def train_one(args, name: str, kwargs: dict, fold: int, dataset: Path, workspace: Path) -> float:
    out = args.out / name
    if (out / f"fold_{fold}" / "checkpoint.json").exists() and _finished(out / f"fold_{fold}", args.epochs):
        return 0.0
    cmd = [str(REPO / ".venv" / "bin" / "medseg"), "train", str(dataset), "-w", str(workspace), "-c", "3d_fullres",
           "-f", str(fold), "--arch", "contextual_unet", "--model-kwargs", json.dumps({"pet_channel": 0, **kwargs}),
           "--epochs", str(args.epochs), "--iterations", str(args.iterations), "--val-iterations", "2",
           "--checkpoint-every", "5", "--threads", str(args.threads), "--seed", str(args.seed), "--no-validation",
           "-o", str(out)]  # fmt: skip
    if (out / f"fold_{fold}").exists():
        cmd.append("--resume")
    log_path = args.out / "logs" / f"{name}_f{fold}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "a") as fh:
        subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - start
    log(f"trained {name} fold {fold} in {seconds:.0f} s")
    return seconds


def _finished(fold_dir: Path, epochs: int) -> bool:
    meta = json.loads((fold_dir / "checkpoint.json").read_text())
    return int(meta.get("epoch", 0)) >= epochs


def train_all(args, jobs: list[tuple[str, dict, Path, Path]]) -> dict:
    todo = [(n, k, f, d, w) for n, k, d, w in jobs for f in args.folds]
    with ThreadPoolExecutor(args.jobs) as pool:
        seconds = list(pool.map(lambda j: train_one(args, *j), todo))
    return {f"{j[0]}/{j[2]}": s for j, s in zip(todo, seconds)}


# ---------------------------------------------------------------------------- evaluation


def held_out(workspace: Path, fold: int) -> list[str]:
    splits = json.loads(next((workspace / "preprocessed").glob("*/splits_final.json")).read_text())
    return list(splits[fold]["val"])


def crop_table(data: Path) -> dict[str, dict]:
    with open(data / "lesions.csv") as fh:
        return {r["case"]: r for r in csv.DictReader(fh)}


def _case_arrays(dataset: Path, case: str, sentence_id: str):
    """The case's PET (SUV), geometry and manual GTV (the label of any of its sentences: all the same)."""
    from medseg.io.image import read_image

    pet, meta = read_image(dataset / "imagesTr" / f"{case}_0000.nii.gz")
    gtv = read_image(dataset / "labelsTr" / f"{sentence_id}.nii.gz")[0]
    return pet.astype(np.float32), meta, gtv > 0


def score_model(model: Path, fold: int, by_case: dict[str, list[dict]], arrays) -> dict[str, list[dict]]:
    """Rows of the network alone (``raw``) and with the facts rule (``rule``: medseg ground's default,
    medseg.apps.ground.facts_filter) from one prediction per sentence."""
    from medseg.apps.ground import facts_filter, keep_most_probable_component, sentence_inputs
    from medseg.evaluation.grounding import match_components
    from medseg.inference.predictor import Predictor
    from medseg.text.encoder import SentenceEncoder

    predictor = Predictor.from_folder(model, folds=[fold], device="cpu")
    name = predictor.spec.model_kwargs.get("text_encoder", "minilm")
    if name not in ENCODERS:  # loaded once for all models and folds
        ENCODERS[name] = SentenceEncoder(name)
    rows = {"raw": [], "rule": []}
    for case, sentences in by_case.items():
        pet, meta, gtv = arrays(case)
        for r in sentences:
            cond = sentence_inputs(r["sentence"], ENCODERS[name], pet[None], meta)
            seg, probs = predictor.predict_array(pet[None], meta, return_probabilities=True, **cond)
            for kind, allowed in (("raw", seg > 0), ("rule", facts_filter(seg, pet, cond))):
                mask, _ = keep_most_probable_component(allowed, probs[1])
                rows[kind].append({"id": r["id"], "case": case, **match_components(mask, gtv, pet), "mask": mask > 0})
    return rows


def score_weak(by_case: dict[str, list[dict]], arrays) -> list[dict]:
    from medseg.evaluation.grounding import match_components
    from medseg.reports.dataset import sentence_facts
    from medseg.reports.weak_label import weak_label

    rows = []
    for case, sentences in by_case.items():
        pet, meta, gtv = arrays(case)
        for r in sentences:
            suvmax, image = sentence_facts(r["sentence"])
            w = weak_label(pet, meta, suvmax, image)
            mask = w.mask if w.ok else np.zeros_like(gtv)
            rows.append({"id": r["id"], "case": case, **match_components(mask, gtv, pet), "mask": mask > 0})
    return rows


class CaseArrays:
    """PET, geometry and GTV per crop of the GTV dataset, read once per process."""

    def __init__(self, dataset: Path):
        from medseg.reports.dataset import read_sentences

        self.dataset, self.cache = dataset, {}
        self.sentences = {r["id"]: r for r in read_sentences(dataset)}
        self.first = {}
        for r in self.sentences.values():
            self.first.setdefault(r["case"], r["id"])

    def __call__(self, case: str):
        if case not in self.cache:
            self.cache[case] = _case_arrays(self.dataset, case, self.first[case])
        return self.cache[case]


def _score_job(job) -> dict[str, list[dict]]:
    """One (model or the weak labeller, fold): every held-out sentence grounded and scored (one thread)."""
    name, model_dir, fold, dataset, workspace = job
    torch.set_num_threads(1)
    arrays = CaseArrays(dataset)
    by_case: dict[str, list[dict]] = {}
    for sid in held_out(workspace, fold):
        by_case.setdefault(arrays.sentences[sid]["case"], []).append(arrays.sentences[sid])
    if model_dir is None:
        return {name: [dict(r, fold=fold) for r in score_weak(by_case, arrays)]}
    rows = score_model(model_dir, fold, by_case, arrays)
    return {name: [dict(r, fold=fold) for r in rows["raw"]], f"{name}+rule": [dict(r, fold=fold) for r in rows["rule"]]}


def evaluate(args, names: list[str], dataset: Path, workspace: Path) -> tuple[dict[str, list[dict]], object]:
    """Every model's and the weak labeller's rows, ``args.jobs`` (model, fold) pairs at a time."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(n, args.out / n, f, dataset, workspace) for f in args.folds for n in names]
    jobs += [("weak", None, f, dataset, workspace) for f in args.folds]
    results: dict[str, list[dict]] = {}
    for n in names:
        results[n], results[f"{n}+rule"] = [], []
    results["weak"] = []
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for out in pool.map(_score_job, jobs):
            for name, rows in out.items():
                results[name] += rows
            log(f"{', '.join(out)} fold {rows[0]['fold'] if rows else '?'} evaluated ({len(rows)} sentences)")
    return results, CaseArrays(dataset)


def summarise(rows: list[dict]) -> dict:
    from medseg.evaluation.grounding import pooled_f1

    tp, fp, fn = (sum(r[k] for r in rows) for k in ("tp", "fp", "fn"))
    dices = [r["dice"] for r in rows]
    return {"n": len(rows), "tp": tp, "fp": fp, "fn": fn, "f1": pooled_f1(tp, fp, fn),
            "dice_mean": float(np.mean(dices)) if dices else None,
            "dice_median": float(np.median(dices)) if dices else None,
            "on_lesion": sum(r["hit"] for r in rows)}  # fmt: skip


def _f1_by_fold(rows: list[dict], folds) -> list[float]:
    return [summarise([r for r in rows if r["fold"] == f])["f1"] for f in folds]


def report(info, versions, res) -> list[str]:
    lines = header_lines(
        "Cross-validated grounding on real FDG-PET sarcoma crops (ConTEXTual Net 3D)", info, versions, False
    )
    lines += [
        f"Data: `{res['dataset']}`: {res['n_crops']} crops, {res['n_sentences']} generated sentences "
        f"(3 per crop, medseg.reports.generate: real SUVmax and image number, many phrasings; not clinical text); "
        f'{res["n_distractor_crops"]} crops with uptake hotter than the lesion ("distractor"). '
        f"5 folds grouped by crop (workspace splits_final.json). Training labels: manual GTV. "
        f"Every model: contextual_unet (plan's U-Net, PET in SUV), {res['epochs']} x {res['iterations']} iterations, "
        f"batch 2, patch {res['patch']}, same seed, {res['threads']} thread(s) per training, {res['jobs']} at a time. "
        "F1: a predicted component (6-connected) is a true positive when it overlaps the GTV and its SUVmax is "
        "within 0.1 of the GTV's; other components are false positives; a sentence without a true positive "
        "adds a false negative; pooled over sentences. Models keep their most probable component (medseg ground).",
        "",
        "| model | crops | sentences | F1 | TP | FP | FN | on lesion | Dice mean | Dice median | F1 per fold |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, groups in res["summary"].items():
        for group in ("all", "distractor", "other"):
            s = groups[group]
            folds = " / ".join("–" if x is None else f"{x:.2f}" for x in groups["f1_folds"]) if group == "all" else ""
            lines.append(f"| {_label(name, LABELS)} | {group} | {s['n']} | {_num(s['f1'])} | {s['tp']} | {s['fp']} | "
                         f"{s['fn']} | {s['on_lesion']} | {_num(s['dice_mean'])} | {_num(s['dice_median'])} | {folds} |")  # fmt: skip
    lines += [
        "",
        "The weak labeller uses the same rule as the F1 (it keeps the component on the named image whose "
        "SUVmax matches the quoted one within 0.1), and these sentences quote the lesion's true SUVmax and "
        "the image of its SUVmax voxel, so its F1 is high by construction; its Dice shows the extent it gives "
        "(a threshold of the hot part, not the MRI-defined GTV). The learned models see the number only "
        "through the facts channels (or, for `text`, not at all).",
        "",
        f"Picture: `{NAME}.png` (first sentence of each distractor crop, coronal PET MIP; green = manual GTV, "
        "red = grounded mask).",
    ]
    made = res["train_seconds_mean"]
    if made == made:  # trainings made in this run
        lines.append(f"Training time per model and fold: {made:.0f} s mean (2 trainings at a time, 1 thread each).")
    return lines


def picture(results: dict[str, list[dict]], arrays, cases: list[str], path: Path, per_row: int = 8) -> Path:
    """PNG: for the first sentence of each distractor crop, a row of coronal PET MIPs (inverted grey):
    the manual GTV (green), then each model's grounded mask (red; hotter uptake stays grey)."""
    from PIL import Image, ImageDraw

    from medseg.apps.ground import coronal_mip

    names = list(results)
    first = {}
    for r in results["weak"]:
        first.setdefault(r["case"], r["id"])
    masks = {n: {r["id"]: r["mask"] for r in rows} for n, rows in results.items()}
    chosen = [c for c in cases if c in first][:per_row]
    scale, head = 3, 14
    mips = {c: arrays(c) for c in chosen}
    shapes = [coronal_mip(p, meta).shape for p, meta, _ in mips.values()]
    cell_h, cell_w = max(h for h, _ in shapes) * scale, max(w for _, w in shapes) * scale
    titles = ["manual GTV"] + [_label(n, SHORT) for n in names]
    out = Image.new("RGB", ((cell_w + 4) * len(titles), head + len(chosen) * (cell_h + head)), "white")
    draw = ImageDraw.Draw(out)
    for k, title in enumerate(titles):
        draw.text((k * (cell_w + 4) + 2, 0), title[: cell_w // 6], fill="black")
    for row, case in enumerate(chosen):
        pet, meta, gtv = mips[case]
        mip = coronal_mip(pet, meta)
        grey = 255 - np.clip(mip / (float(np.percentile(mip, 99.5)) or 1.0) * 255, 0, 255)
        y = head + row * (cell_h + head)
        draw.text((2, y), f"{case} ({first[case]})", fill="black")
        overlays = [(gtv, (40, 170, 40))] + [(masks[n][first[case]], (230, 40, 40)) for n in names]
        for k, (mask, colour) in enumerate(overlays):
            rgb = np.repeat(grey[..., None], 3, axis=2)
            m = coronal_mip(mask.astype(np.uint8), meta) > 0
            rgb[m] = 0.45 * rgb[m] + 0.55 * np.array(colour)
            tile = Image.fromarray(np.ascontiguousarray(rgb).astype(np.uint8)).resize((mip.shape[1] * scale, mip.shape[0] * scale), Image.NEAREST)  # fmt: skip
            out.paste(tile, (k * (cell_w + 4), y + head))
    out.save(path)
    return path


def _label(name: str, table: dict) -> str:
    base = name.removesuffix("+rule")
    return table.get(base, base) + (" + facts rule" if name.endswith("+rule") else "")


def _num(x, digits=3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, default=REPO / "workspace/grounding/sts")
    p.add_argument("--workspace", type=Path, default=REPO / "workspace/grounding/ws")
    p.add_argument("--weak-dataset", type=Path, default=None, help="the --labels weak dataset (adds a row)")
    p.add_argument("--weak-workspace", type=Path, default=None)
    p.add_argument("--data", type=Path, default=default_data_root() / "sts_fdg_petct")
    p.add_argument("--out", type=Path, default=REPO / "runs/grounding_cv")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage", choices=["all", "train", "evaluate"], default="all")
    p.add_argument(
        "--results", type=Path, default=None, help="markdown output (default benchmarks/results/grounding_cv.md)"
    )
    args = p.parse_args(argv)
    info, versions = machine_info(), {"medseg": package_versions(REPO / ".venv/bin/python", ["torch", "transformers"])}
    jobs = [(n, VARIANTS[n], args.dataset, args.workspace) for n in args.variants]
    if args.weak_dataset:
        jobs.append(("text_facts_weak", VARIANTS["text_facts"], args.weak_dataset, args.weak_workspace))
    seconds = train_all(args, jobs) if args.stage in ("all", "train") else {}
    if args.stage == "train":
        return 0
    results, arrays = evaluate(args, [j[0] for j in jobs], args.dataset, args.workspace)
    table = crop_table(args.data)
    distractor = {c for c, r in table.items() if float(r["suvmax_whole_crop"]) > float(r["suvmax"])}
    summary = {}
    for name, rows in results.items():
        for r in rows:
            r["distractor"] = r["case"] in distractor
        summary[name] = {"all": summarise(rows), "distractor": summarise([r for r in rows if r["distractor"]]),
                         "other": summarise([r for r in rows if not r["distractor"]]),
                         "f1_folds": _f1_by_fold(rows, args.folds)}  # fmt: skip
    plan = json.loads(next((args.workspace / "preprocessed").glob("*/plan.json")).read_text())
    made = [s for s in seconds.values() if s > 0]
    res = {"dataset": str(args.dataset.relative_to(REPO)) if args.dataset.is_relative_to(REPO) else str(args.dataset),
           "n_crops": len({r["case"] for r in results["weak"]}), "n_sentences": len(results["weak"]),
           "n_distractor_crops": len(distractor & {r["case"] for r in results["weak"]}),
           "epochs": args.epochs, "iterations": args.iterations, "threads": args.threads, "jobs": args.jobs,
           "patch": plan["configurations"]["3d_fullres"]["patch_size"], "summary": summary,
           "train_seconds_mean": float(np.mean(made)) if made else float("nan"), "train_seconds": seconds,
           "machine": info, "rows": results}  # fmt: skip
    md = write_results(NAME, report(info, versions, res), False, args.results)
    picture(results, arrays, sorted(distractor), md.with_suffix(".png"))
    for rows in results.values():
        for r in rows:
            r.pop("mask", None)
    md.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
