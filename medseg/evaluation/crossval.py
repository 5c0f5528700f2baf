"""Cross-validation of a model folder: every training case predicted by the one fold that did not
train on it, evaluated together (nnU-Net's step after the five folds), and the postprocessing that
this cross-validation supports (keep the largest connected component of a class only where it
raises that class's mean Dice).

The inputs are the folds' own final validations (``fold_K/validation/CASE.ext``, written by
``medseg train``); a fold without them is predicted from the dataset with the validation names of
a ``splits_final.json``."""

from __future__ import annotations

from pathlib import Path

from medseg.errors import DatasetError


def numeric_folds(model_dir: Path) -> dict[str, Path]:
    """``{fold: fold_dir}`` for the numbered folds with weights (``fold_all`` trains on every case:
    it has no held-out cases)."""
    dirs = [d for d in Path(model_dir).glob("fold_*") if (d / "model.safetensors").is_file()]
    folds = {d.name[len("fold_") :]: d for d in dirs if d.name[len("fold_") :].isdigit()}
    return dict(sorted(folds.items(), key=lambda kv: int(kv[0])))


def _predicted_names(fold_dir: Path, file_ending: str) -> list[str]:
    from medseg.evaluation.metrics import _side_output

    val = fold_dir / "validation"
    found = {p.name[: -len(file_ending)] for p in val.glob(f"*{file_ending}") if not p.name.startswith(".")}
    return sorted(n for n in found if not _side_output(n, found))


def _split_names(splits: Path, fold: str) -> list[str]:
    import json

    if not splits.is_file():
        raise DatasetError(splits, "splits file not found")
    try:
        entries = json.loads(splits.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(splits, f"splits file is not valid JSON ({exc})") from None
    if not isinstance(entries, list) or int(fold) >= len(entries) or "val" not in entries[int(fold)]:
        raise DatasetError(splits, f"has no validation cases for fold {fold} (expected a list of {{train, val}})")
    return list(entries[int(fold)]["val"])


def fold_assignment(model_dir, raw_folder, *, splits=None, device="auto", amp=None, log=print) -> dict[str, str]:
    """``{case: fold}``: which fold's validation predicted each case. A fold without validation
    predictions is predicted now (needs ``splits``); a case in two folds' validations is an error."""
    from medseg.io.checkpoint import load_spec
    from medseg.training.validation import validate_fold

    model_dir = Path(model_dir)
    folds = numeric_folds(model_dir)
    if len(folds) < 2:
        raise DatasetError(model_dir, "cross-validation needs at least two numbered folds (fold_0, fold_1, ...)")
    ending = load_spec(model_dir).plan.file_ending
    fold_of: dict[str, str] = {}
    for fold, fold_dir in folds.items():
        names = _predicted_names(fold_dir, ending)
        if not names:
            if splits is None:
                raise DatasetError(
                    fold_dir / "validation",
                    "no validation predictions: pass --splits splits_final.json to predict them",
                )
            names = _split_names(Path(splits), fold)
            validate_fold(model_dir, fold, raw_folder, names, device=device, amp=amp, log=log)
        for name in names:
            if name in fold_of:
                raise DatasetError(
                    fold_dir / "validation" / f"{name}{ending}",
                    f"case also in fold {fold_of[name]}'s validation: the folds' validation sets overlap",
                )
            fold_of[name] = fold
    return fold_of


def _component_dice(pred, ref, spacing, labels: dict[str, int], nsd_tolerance_mm: float) -> dict:
    """Per label: the case's metrics with only that label's largest component kept."""
    from medseg.evaluation.metrics import evaluate_case
    from medseg.inference.postprocess import keep_largest_component

    return {
        name: evaluate_case(keep_largest_component(pred, [value]), ref, spacing, {name: value}, nsd_tolerance_mm)[name]
        for name, value in labels.items()
    }


def choose_postprocessing(per_case: dict, pred_paths: dict, ref_dir: Path, labels: dict, *, ending, nsd, progress):
    """For each foreground label: mean Dice before and after keeping its largest component, and
    whether to keep only the largest one (strictly better, as nnU-Net decides). Returns
    ``({"largest_component": [values], "per_label": {...}}, per_case_after)``."""
    from medseg.evaluation.metrics import _mean
    from medseg.io.image import read_image
    from medseg.utils import track

    fg = {k: v for k, v in labels.items() if v != 0}
    after: dict[str, dict] = {}
    for name in track(sorted(per_case), description="postprocessing", enabled=progress):
        pred, pm = read_image(pred_paths[name])
        ref, _ = read_image(ref_dir / f"{name}{ending}")
        after[name] = _component_dice(pred, ref, pm.spacing, fg, nsd)
    chosen, report = [], {}
    for label, value in fg.items():
        before = _mean([per_case[c][label]["dice"] for c in per_case])
        with_cc = _mean([after[c][label]["dice"] for c in after])
        report[label] = {"dice": before, "dice_largest_component": with_cc, "keep_largest": with_cc > before}
        if with_cc > before:
            chosen.append(value)
    per_case_after = {c: {k: (after[c][k] if fg[k] in chosen else m) for k, m in per_case[c].items()} for c in per_case}
    return {"largest_component": chosen, "per_label": report}, per_case_after


def cross_validate(
    model_dir, raw_folder, *, splits=None, output=None, postprocessing: bool = True, nsd_tolerance_mm: float = 1.0,
    device: str = "auto", amp: bool | None = None, progress: bool = True, log=print,
) -> dict:  # fmt: skip
    """Evaluate the folds' validation predictions as one set against ``raw_folder/labelsTr``; write
    ``OUTPUT/summary.json`` (+ CSV; default ``MODEL/crossval``) and, with ``postprocessing``,
    ``OUTPUT/postprocessing.json`` and ``OUTPUT/summary_postprocessed.json``. Returns the summary,
    with ``fold_of`` (case -> fold), ``missing_cases`` (training cases no fold validated) and
    ``postprocessing`` (the choice and its figures)."""
    from medseg.evaluation.metrics import evaluate_folder, summarise, to_csv
    from medseg.io.checkpoint import load_spec
    from medseg.io.jsonio import write_json, write_text_atomic

    model_dir, raw_folder = Path(model_dir), Path(raw_folder)
    spec = load_spec(model_dir)
    ending, ref_dir = spec.plan.file_ending, raw_folder / "labelsTr"
    if not ref_dir.is_dir():
        raise DatasetError(ref_dir, "reference label folder not found")
    fold_of = fold_assignment(model_dir, raw_folder, splits=splits, device=device, amp=amp, log=log)
    per_case, pred_paths = {}, {}
    for fold in sorted(set(fold_of.values()), key=int):
        names = sorted(n for n, f in fold_of.items() if f == fold)
        val = model_dir / f"fold_{fold}" / "validation"
        ev = evaluate_folder(
            val, ref_dir, spec.labels, names=names, file_ending=ending, nsd_tolerance_mm=nsd_tolerance_mm
        )
        per_case.update(ev["per_case"])
        pred_paths.update({n: val / f"{n}{ending}" for n in names})
    references = {p.name[: -len(ending)] for p in ref_dir.glob(f"*{ending}") if not p.name.startswith(".")}
    summary = summarise(per_case)
    summary.update(
        nsd_tolerance_mm=nsd_tolerance_mm, fold_of=fold_of, missing_cases=sorted(references - set(fold_of)),
        folds={f: sum(v == f for v in fold_of.values()) for f in sorted(set(fold_of.values()), key=int)},
    )  # fmt: skip
    out = Path(output) if output else model_dir / "crossval"
    if postprocessing:
        choice, after = choose_postprocessing(
            per_case, pred_paths, ref_dir, spec.labels, ending=ending, nsd=nsd_tolerance_mm, progress=progress
        )
        summary["postprocessing"] = choice
        post = summarise(after)
        write_json(out / "summary_postprocessed.json", {**post, "largest_component": choice["largest_component"]})
        summary["postprocessed_mean"], summary["postprocessed_foreground_mean"] = post["mean"], post["foreground_mean"]
        write_json(out / "postprocessing.json", choice)
    write_json(out / "summary.json", summary)
    write_text_atomic(out / "summary.csv", to_csv(per_case))
    return summary
