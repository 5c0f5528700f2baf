"""The step after training: predict a fold's validation cases from their raw files, in native
space, and evaluate them (nnU-Net's final validation). Uses only the saved model folder, so it
validates exactly what will be shipped."""

from __future__ import annotations

from pathlib import Path


def validate_fold(
    model_dir: Path, fold: int | str, raw_folder: Path, val_names: list[str], *, device: str = "auto",
    amp: bool | None = None, log=print,
) -> dict:  # fmt: skip
    """Predict ``val_names`` of ``raw_folder/imagesTr`` with fold ``fold`` of ``model_dir``; write
    ``fold_K/validation/`` (label maps + summary.json) and return the summary."""
    from medseg.evaluation.metrics import evaluate_folder
    from medseg.inference.predictor import Predictor
    from medseg.io.checkpoint import load_spec
    from medseg.io.dataset import list_cases

    model_dir, raw_folder = Path(model_dir), Path(raw_folder)
    spec = load_spec(model_dir)
    cases = {c.name: c for c in list_cases(raw_folder)}
    out = model_dir / f"fold_{fold}" / "validation"
    predictor = Predictor.from_folder(model_dir, folds=[fold], device=device, amp=amp)
    val_cases = [cases[n] for n in val_names if n in cases]
    predictor.predict_cases(val_cases, out, overwrite=True, file_ending=spec.plan.file_ending)
    summary = evaluate_folder(
        out, raw_folder / "labelsTr", spec.labels, names=val_names, file_ending=spec.plan.file_ending,
        output=out / "summary.json",
    )  # fmt: skip
    log(
        f"final validation (fold {fold}, {len(val_cases)} cases, native space): "
        + ", ".join(f"{k} Dice {v['dice']:.4f}" for k, v in summary["mean"].items())
    )
    return summary
