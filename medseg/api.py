"""The public Python API; the CLI is a thin layer over these functions.

from medseg import api
plan = api.plan("Dataset004_Hippocampus", workspace="ws")
api.preprocess("Dataset004_Hippocampus", workspace="ws")
api.train("Dataset004_Hippocampus", workspace="ws", fold=0, config=TrainingConfig(epochs=50))
api.predict("hippocampus", "scan.nii.gz", "out/")
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from medseg.io.dataset import cases_from_input, load_dataset_json
from medseg.io.jsonio import write_json
from medseg.planning.plan import Plan
from medseg.workspace import Workspace

if TYPE_CHECKING:  # imported lazily: it pulls in torch, which verify/plan/evaluate do not need
    from medseg.training.config import TrainingConfig


def open_workspace(workspace) -> Workspace:
    """The :class:`Workspace` at ``workspace`` (a path, ``None`` for the default, or a Workspace)."""
    return workspace if isinstance(workspace, Workspace) else Workspace.resolve(workspace)


def verify(dataset: str | Path):
    from medseg.io.verify import verify_dataset

    return verify_dataset(dataset)


def plan(
    dataset: str | Path, workspace=None, *, budget: str = "cpu", presets=(), normalization: dict | None = None,
    progress: bool = True,
) -> Plan:  # fmt: skip
    """Fingerprint the dataset and write ``plan.json`` (+ fingerprint.json) into the workspace.

    ``presets``: ResEnc presets (``resenc_m``, ``resenc_l``) planned as extra ``3d_fullres_<preset>``
    configurations with nnU-Net's ResEnc planner and the preset's own GPU budget. ``normalization``:
    {channel index: scheme} overriding the planned normalisation (``range:0,10``, ``imagenet``, ``ct``,
    ``zscore``, ``zscore_masked``, ``none``; see :func:`medseg.planning.planner.normalization_from_spec`)."""
    from medseg.planning.fingerprint import compute_fingerprint
    from medseg.planning.planner import make_plan

    ws = open_workspace(workspace)
    info = load_dataset_json(dataset)
    from medseg.preprocessing.pipeline import checked_record

    fp = compute_fingerprint(dataset, progress=progress, record=checked_record(ws.preprocessed(info.name)))
    p = make_plan(info, fp, budget, presets=tuple(presets))
    if normalization:
        from dataclasses import replace

        from medseg.planning.planner import normalization_from_spec

        schemes = list(p.normalization)
        for c, spec in normalization.items():
            if not 0 <= int(c) < len(schemes):
                raise ValueError(f"normalisation for channel {c}: the dataset has {len(schemes)} channel(s)")
            schemes[int(c)] = normalization_from_spec(spec, int(c), len(schemes), fp)
        p = replace(p, normalization=tuple(schemes))
    fp.save(ws.fingerprint_path(info.name))
    p.save(ws.plan_path(info.name))
    write_json(ws.preprocessed(info.name) / "dataset_info.json", {"raw_folder": str(Path(dataset).resolve())})
    return p


def load_plan(dataset: str | Path, workspace=None) -> Plan:
    info = load_dataset_json(dataset)
    return Plan.load(open_workspace(workspace).plan_path(info.name))


def preprocess(
    dataset: str | Path, workspace=None, *, configurations=None, workers=None, progress: bool = True
) -> list[Path]:
    """``configurations``: names to preprocess (None: the plan's default, ``3d_fullres``, or ``2d``
    for a plan of 2D images); names the plan lacks are skipped."""
    from medseg.preprocessing.pipeline import preprocess_dataset

    ws = open_workspace(workspace)
    p = load_plan(dataset, ws)
    info = load_dataset_json(dataset)
    configurations = configurations or (p.default_configuration,)
    return [
        preprocess_dataset(dataset, p, c, ws.preprocessed(info.name), workers=workers, progress=progress)
        for c in configurations
        if c in p.configurations
    ]


def train(
    dataset: str | Path,
    workspace=None,
    *,
    configuration: str | None = None,
    fold="0",
    config: TrainingConfig | None = None,
    resume: bool = False,
    output: str | Path | None = None,
    log=print,
    overwrite: bool = True,
) -> dict:
    """Train one fold; returns its final-validation summary (plus ``summary_file``, where it is).
    ``overwrite=False`` (the CLI's default) refuses a fold that already has a checkpoint unless
    ``resume``."""
    from medseg.io.verify import check_dataset
    from medseg.preprocessing.pipeline import cache_folder, checked_record
    from medseg.training.config import TrainingConfig
    from medseg.training.trainer import Trainer

    ws = open_workspace(workspace)
    config = config or TrainingConfig()
    info = load_dataset_json(dataset)
    p = load_plan(dataset, ws)
    check_dataset(dataset, record=checked_record(ws.preprocessed(info.name)))  # files changed since preprocess
    configuration = configuration or p.default_configuration  # 3d_fullres; 2d for 2D images
    conf = p.configuration(configuration)
    model_name = config.model or conf.model
    if config.pretrained and not config.model:  # fine-tuning adopts the pretrained architecture
        from medseg.training.transfer import pretrained_spec

        spec = pretrained_spec(config.pretrained)
        model_name = spec.model if spec else model_name
    out = Path(output) if output else ws.results(info.name, configuration, model_name)
    pre = ws.preprocessed(info.name)
    trainer = Trainer(p, configuration, cache_folder(pre, conf), pre, out, fold, config, log=log)
    trainer.fit(resume=resume, overwrite=overwrite)
    if trainer.dist.is_main:
        trainer.task.after_training(trainer)
    summary = final_validation(trainer, Path(dataset), log=log)
    if summary:  # where it was written, for the one-screen summary (the file has every case)
        summary = {**summary, "summary_file": str(trainer.fold_dir / "validation" / "summary.json")}
    return summary


def final_validation(trainer, raw_folder: Path, *, log=print) -> dict:
    """The step after ``fit()``: predict the fold's validation cases from the raw files and evaluate
    them in native space (rank 0 only; skipped without validation cases, with
    ``final_validation=False`` and for prompt models, which the sliding-window predictor refuses).
    A run that was already complete returns its earlier summary."""
    import json

    from medseg.training.validation import validate_fold

    summary_file = trainer.fold_dir / "validation" / "summary.json"
    if not trainer.dist.is_main or not trainer.cfg.final_validation or not trainer.val_names:
        return {}
    if not trainer.task.sliding_window:  # prompt models: no sliding-window prediction (``medseg sam``)
        log(f"final validation: skipped for task {trainer.task.name} (its per-epoch metric is in training_log.jsonl)")
        return {}
    if not trainer.ran_epochs:
        return json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return validate_fold(
        trainer.output_dir, trainer.fold, raw_folder, trainer.val_names,
        device=str(trainer.device), amp=trainer.cfg.amp, log=log,
    )  # fmt: skip


def predict(
    model: str | Path,
    input: str | Path,
    output: str | Path,
    *,
    folds=None,
    tta: bool = True,
    step: float = 0.5,
    device: str = "auto",
    save_probabilities: bool = False,
    largest_component: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    label_map=None,
    amp: bool | None = None,
) -> list[dict]:
    """``label_map``: a JSON file or dict mapping the model's labels onto another label set
    (direct inference; see medseg.inference.label_map). ``amp``: None = bf16/fp16 where the hardware
    runs it natively, False = fp32 (see medseg.utils.autocast_dtype)."""
    from medseg.inference.predictor import Predictor
    from medseg.io.image import ensure_writable_dir, prediction_ending

    ensure_writable_dir(output)
    predictor = Predictor.from_folder(model, folds, device=device, tta=tta, step=step, label_map=label_map, amp=amp)
    cases = cases_from_input(input, predictor.spec.in_channels)
    return predictor.predict_cases(
        cases,
        output,
        overwrite=overwrite,
        save_probabilities=save_probabilities,
        largest_component=largest_component,
        file_ending=prediction_ending(predictor.plan.file_ending),  # PNG in, PNG out; volumes as .nii.gz
        progress=progress,
    )


def evaluate(
    pred_dir: str | Path,
    ref_dir: str | Path,
    *,
    labels: dict[str, int] | None = None,
    dataset_json: str | Path | None = None,
    output: str | Path | None = None,
    nsd_tolerance_mm: float = 1.0,
    roi_masks: str | Path | None = None,
    file_ending: str | None = None,
) -> dict:
    """``roi_masks``: a folder of region-of-interest masks (``CASE.ext``, non-zero inside), metrics
    only inside them (e.g. DRIVE's field of view). ``file_ending``: of predictions and references
    (default: the dataset's for 2D images, else .nii.gz, as ``predict`` writes them)."""
    from medseg.evaluation.metrics import evaluate_folder
    from medseg.io.image import prediction_ending

    info = None
    if dataset_json is not None:
        info = load_dataset_json(Path(dataset_json).parent if Path(dataset_json).is_file() else dataset_json)
    if labels is None:
        if info is None:
            raise ValueError("pass labels or dataset_json")
        labels = info.labels
    if file_ending is None:
        file_ending = prediction_ending(info.file_ending) if info is not None else ".nii.gz"
    return evaluate_folder(
        pred_dir,
        ref_dir,
        labels,
        output=output,
        nsd_tolerance_mm=nsd_tolerance_mm,
        file_ending=file_ending,
        roi_masks=roi_masks,
    )


# root files of a model folder that travel with it: the texture clusters `medseg synthesize` samples
# (lesion_diffusion), the record of a `medseg adapt` run, a model card
MODEL_RECORDS = ("textures.json", "adaptation.json", "README.md")


def package_model(source: str | Path, destination: str | Path, *, folds=None, overwrite: bool = False) -> Path:
    """Copy only what inference needs (model.json, fold weights + hash records, training log,
    validation summary, and the records a model kind reads or documents: ``MODEL_RECORDS``) from a
    training output folder into a shippable model folder.

    The folder is assembled beside the destination and renamed into place, so an interrupted
    export leaves no half-written model."""
    import shutil

    from medseg.errors import OutputError
    from medseg.io.checkpoint import available_folds, load_spec, load_weights

    src, dst = Path(source), Path(destination)
    load_spec(src)
    folds = [str(f) for f in folds] if folds else available_folds(src)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise OutputError(dst, "exists and is not empty (use --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shutil.copyfile(src / "model.json", tmp / "model.json")
        for name in MODEL_RECORDS:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        for f in folds:
            load_weights(src / f"fold_{f}")  # refuses tampered or missing weights
            (tmp / f"fold_{f}").mkdir()
            for name in ("model.safetensors", "checkpoint.json", "training_log.jsonl", "validation_summary.json"):
                if (src / f"fold_{f}" / name).exists():
                    shutil.copyfile(src / f"fold_{f}" / name, tmp / f"fold_{f}" / name)
            summary = src / f"fold_{f}" / "validation" / "summary.json"
            if summary.exists():
                shutil.copyfile(summary, tmp / f"fold_{f}" / "validation_summary.json")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst
