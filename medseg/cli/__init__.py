"""``medseg`` command line: a thin typer layer over medseg.api (imports are lazy).

Every user-facing failure prints ``medseg: error: <file>: <reason>`` on one line and exits 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from medseg.cli.legacy import MedsegGroup

app = typer.Typer(
    cls=MedsegGroup,  # old option spellings accepted for one release (medseg/cli/legacy.py)
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: no "<bool>" beside every flag
    help="medseg: self-configuring 3D medical image segmentation.",
)

WS_HELP = "Workspace folder for preprocessed data and models (default: $MEDSEG_WORKSPACE or ./medseg_workspace)."
DATASET_HELP = "Dataset folder (nnU-Net v2 raw layout: dataset.json, imagesTr/, labelsTr/)."
DEVICE_HELP = "auto (CUDA if present, else CPU) | cpu | cuda | cuda:N."
OVERWRITE_HELP = "Replace outputs that exist (without it, medseg refuses to write over them)."


def _show_version(value: bool) -> None:
    if value:
        from medseg import __version__

        print(f"medseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """medseg: self-configuring 3D medical image segmentation."""


def _fail(msg: str, code: int = 2):
    print(f"medseg: error: {msg}", file=sys.stderr)
    raise typer.Exit(code)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@app.command()
def verify(dataset: Path = typer.Argument(..., help="Dataset folder (nnU-Net v2 raw layout).")):
    """Check every case: files, channels, geometry, label values, finite intensities."""
    from medseg import api

    n, problems = api.verify(dataset)
    for p in problems:
        _err(f"medseg: problem: {p}")
    if problems:
        _err(f"{len(problems)} problem(s) in {n} case(s)")
        raise typer.Exit(1)
    print(f"{dataset}: {n} cases OK")


@app.command()
def plan(
    dataset: Path = typer.Argument(..., help=DATASET_HELP),
    workspace: Path | None = typer.Option(None, "-w", "--workspace", help=WS_HELP),
    budget: str = typer.Option("cpu", help="Memory/compute budget to fit the network to: cpu | gpu."),
    preset: list[str] = typer.Option(
        [],
        "--preset",
        help="Also plan a ResEnc preset (resenc_m: 8 GB, resenc_l: 24 GB, nnU-Net's ResEnc planners) as "
        "configuration 3d_fullres_<preset>; repeatable. Its GPU budget applies whatever --budget says.",
    ),
    normalization: list[str] = typer.Option(
        [],
        "--normalization",
        help="CHANNEL=SCHEME overriding the planned one, e.g. 0=range:0,10 (PET SUV), "
        "0=range:-150,250 (CT window), 0=minmax (per image to [0, 1], SAM models), 0=imagenet, 0=ct, "
        "0=zscore, 0=zscore_masked, 0=none; repeatable.",
    ),
):
    """Fingerprint the dataset and write a plan (typed, editable JSON)."""
    from medseg import api
    from medseg.io.image import check_writable_dir
    from medseg.models.registry import plannable_models
    from medseg.planning.planner import BUDGETS
    from medseg.workspace import Workspace

    if budget not in BUDGETS:
        _fail(f"--budget: unknown '{budget}' (choose from {', '.join(sorted(BUDGETS))})")
    known = plannable_models()  # registry models with a planner hook: resenc_l, resenc_m
    unknown = [p for p in preset if p not in known]
    if unknown:
        _fail(f"--preset: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    ws = Workspace.resolve(workspace)
    check_writable_dir(ws.root)  # fail before fingerprinting, not after
    overrides = {}
    for item in normalization:
        channel, sep, scheme = item.partition("=")
        if not sep or not channel.strip().isdigit():
            _fail(f"--normalization: expected CHANNEL=SCHEME (e.g. 0=range:0,10), got {item!r}")
        overrides[int(channel)] = scheme.strip()
    try:
        p = api.plan(dataset, workspace, budget=budget, presets=preset, normalization=overrides)
    except ValueError as exc:
        _fail(str(exc))
    for name, c in p.configurations.items():
        model = "" if c.model == "unet" else f"  model {c.model}"
        print(
            f"{name:11s} spacing {[round(s, 3) for s in c.spacing]}  patch {list(c.patch_size)}  batch {c.batch_size}"
            f"  features {c.model_kwargs['features']}  ~{c.estimated_memory_gb} GB{model}"
        )
    print(f"normalisation: {[n.scheme + ('(masked)' if n.use_mask else '') for n in p.normalization]}")
    print(f"plan written to {ws.plan_path(p.dataset_name)}")


@app.command()
def preprocess(
    dataset: Path = typer.Argument(..., help=DATASET_HELP),
    workspace: Path | None = typer.Option(None, "-w", "--workspace", help=WS_HELP),
    configuration: list[str] = typer.Option(
        [], "-c", "--configuration", help="Repeatable (default: 3d_fullres; 2d for a plan of 2D images)."
    ),
    workers: int | None = typer.Option(None, help="Processes (default: all cores)."),
):
    """Crop, normalise and resample every training case into the workspace cache."""
    from medseg import api

    for out in api.preprocess(dataset, workspace, configurations=configuration or None, workers=workers):
        print(f"preprocessed data in {out}")


@app.command()
def train(
    dataset: Path = typer.Argument(..., help=DATASET_HELP),
    workspace: Path | None = typer.Option(None, "-w", "--workspace", help=WS_HELP),
    configuration: str | None = typer.Option(
        None, "-c", "--configuration", help="Default: 3d_fullres; 2d for a plan of 2D images."
    ),
    fold: list[str] = typer.Option(
        ["0"], "-f", "--fold", help="Fold 0-4 or 'all' (repeatable: trains each in turn; default 0)."
    ),
    model: str | None = typer.Option(
        None, "--arch", help="Network architecture, a registry name (`medseg models`; default: the plan's)."
    ),
    model_kwargs: str | None = typer.Option(
        None,
        "--model-kwargs",
        help="JSON object overriding the plan's model kwargs, e.g. '{\"features\": [8, 16, 32, 64]}'.",
    ),
    epochs: int = typer.Option(1000, help="Epochs to train (with --time-budget: what fits)."),
    iterations: int = typer.Option(250, "--iterations", help="Training iterations (batches) per epoch."),
    val_iterations: int = typer.Option(20, help="Validation batches per epoch (pseudo-Dice)."),
    batch_size: int | None = typer.Option(None, help="Patches per batch (default: the plan's)."),
    lr: float = typer.Option(1e-2, "--lr", help="Initial learning rate."),
    warmup_epochs: int = typer.Option(0, help="Linear LR warm-up over the first N epochs (fine-tuning)."),
    freeze_encoder_epochs: int = typer.Option(
        0, help="Fine-tuning: keep the pretrained encoder frozen for the first N epochs."
    ),
    checkpoint_every: int = typer.Option(10, help="Epochs between resumable checkpoints."),
    augmentation: str = typer.Option("default", help="Augmentation preset: default | none | no_mirror | light."),
    task: str | None = typer.Option(None, help="Task (default: the model's; segmentation)."),
    loss: str | None = typer.Option(
        None, help="Loss: dice_ce | dice_bce | prompt_dice_bce | masked_l1 | masked_l2 (default: the task's)."
    ),
    optimizer: str = typer.Option("sgd_nesterov", help="sgd_nesterov | adamw | adam."),
    schedule: str = typer.Option("poly", help="LR schedule: poly | warmup_cosine | constant."),
    weight_decay: float = typer.Option(3e-5, help="Weight decay (AdamW: decoupled)."),
    ema_decay: float | None = typer.Option(None, help="Keep an EMA of the weights (e.g. 0.999); it is exported."),
    param_groups: str | None = typer.Option(
        None, help='JSON list of per-group LR scales, e.g. \'[{"prefix": "encoder.", "lr_scale": 0.1}]\'.'
    ),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    seed: int = typer.Option(0, help="Random seed (patches, augmentation, initialisation)."),
    threads: int | None = typer.Option(None, help="CPU threads for torch."),
    amp: bool | None = typer.Option(
        None, "--amp/--no-amp", help="Mixed precision (default: fp16 on CUDA, bf16 on CPUs with native bf16)."
    ),
    time_budget: float | None = typer.Option(
        None, "--time-budget", help="Wall-clock minutes: --epochs becomes what fits, measured on the first epoch."
    ),
    pretrained: str | None = typer.Option(
        None,
        help="Fine-tune from a model folder, fold folder, shipped model name or .safetensors: the network is "
        "the pretrained one (heads re-initialised for this dataset's classes) unless --model names another.",
    ),
    no_validation: bool = typer.Option(False, "--no-validation", help="Skip the final full-volume validation."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint (also to extend)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Train a fold that already has a checkpoint again from scratch."
    ),
    output: Path | None = typer.Option(None, "-o", "--output", help="Model folder (default: in workspace)."),
):
    """Train a model from the plan (deep supervision, Dice+CE, SGD+poly LR). torchrun-ready."""
    from medseg import api
    from medseg.training.config import TrainingConfig

    if model is not None:
        from medseg.models import list_models

        if model not in list_models():
            _fail(f"--arch: unknown model '{model}' (registered: {', '.join(list_models())})")
    from medseg.cli.options import json_value

    try:
        overrides = json_value(model_kwargs, "--model-kwargs", dict) if model_kwargs else {}
        groups = json_value(param_groups, "--param-groups", list) if param_groups else []
    except ValueError as exc:
        _fail(str(exc))
    cfg = TrainingConfig(
        epochs=epochs,
        iterations_per_epoch=iterations,
        val_iterations=val_iterations,
        batch_size=batch_size,
        initial_lr=lr,
        warmup_epochs=warmup_epochs,
        freeze_encoder_epochs=freeze_encoder_epochs,
        checkpoint_every=checkpoint_every,
        augmentation=augmentation,
        task=task,
        loss=loss,
        optimizer=optimizer,
        schedule=schedule,
        weight_decay=weight_decay,
        ema_decay=ema_decay,
        param_groups=groups,
        device=device,
        seed=seed,
        num_threads=threads,
        amp=amp,
        time_budget_minutes=time_budget,
        final_validation=not no_validation,
        model=model,
        model_kwargs=overrides,
        pretrained=pretrained,
    )
    try:
        cfg.check()
    except ValueError as exc:
        _fail(str(exc))
    from dataclasses import replace

    for f in dict.fromkeys(fold):  # each fold in turn, on its own copy (a time budget rewrites epochs)
        summary = api.train(
            dataset, workspace, configuration=configuration, fold=f, config=replace(cfg), resume=resume,
            overwrite=overwrite, output=output, log=_err,
        )  # fmt: skip
        if summary:  # the full summary is in its file; a person reads one screen
            from medseg.evaluation.report import metrics_summary_lines

            print(f"final validation, fold {f} (native space) -> {summary['summary_file']}")
            for line in metrics_summary_lines(summary):
                print(f"  {line}")


@app.command()
def predict(
    model: str = typer.Option(..., "-m", "--model", help="Model folder or shipped model name."),
    input: Path = typer.Option(..., "-i", "--input", help="Image file, folder, or DICOM series folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder."),
    folds: list[str] | None = typer.Option(
        None, "-f", "--fold", help="Fold to ensemble (repeatable; default: every fold the model has)."
    ),
    no_tta: bool = typer.Option(False, "--no-tta", help="Disable mirror test-time augmentation."),
    step: float = typer.Option(0.5, help="Sliding-window step as a fraction of the patch."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    probabilities: bool = typer.Option(False, "--probabilities", help="Also save class probabilities (.npz)."),
    largest_component: bool = typer.Option(
        False, "--largest-component", help="Keep only the largest component per label."
    ),
    overlay: bool = typer.Option(False, "--overlay", help="Write a PNG overlay per case."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Redo cases already in OUTPUT (without it they are skipped: a rerun resumes)."
    ),
    fp32: bool = typer.Option(
        False, "--fp32", help="Network in full fp32 (default: bf16 on CPUs with native bf16, fp16 on CUDA)."
    ),
    label_map: Path | None = typer.Option(
        None,
        "--label-map",
        help='JSON mapping the model\'s labels onto another label set, e.g. {"Anterior": "hippocampus", '
        '"Posterior": "hippocampus"}; unmapped classes become background (docs/transfer.md).',
    ),
    condition: list[str] = typer.Option(
        [], "--condition", help="Model input for every case, NAME=JSON, e.g. boxes='[[4,10,12,9,30,40]]' (repeatable)."
    ),
    conditions: Path | None = typer.Option(
        None, "--conditions", help='JSON file of per-case model inputs: {"CASE": {"NAME": value}}.'
    ),
    ood_map: bool = typer.Option(
        False, "--ood-map", help="Also write an out-of-distribution score map CASE_ood (higher = more OOD)."
    ),
    ood_score: str | None = typer.Option(
        None,
        "--ood-score",
        help="OOD score: maxquery (models with queries; their default) | msp (others' "
        "default) | maxlogit | entropy (docs/ood.md).",
    ),
):
    """Segment images with a trained model; writes label maps, volumes.csv and optional overlays."""
    from medseg.apps.segment import run_predict
    from medseg.cli.options import parse_conditions

    if not 0 < step <= 1:
        _fail(f"--step must be in (0, 1] (a fraction of the patch), got {step}")

    try:
        common, per_case = parse_conditions(condition, conditions)
    except ValueError as exc:
        _fail(str(exc))
    if ood_score is not None and not ood_map:
        _fail("--ood-score needs --ood-map")
    run_predict(
        model,
        input,
        output,
        folds=folds,
        tta=not no_tta,
        step=step,
        device=device,
        probabilities=probabilities,
        largest_component=largest_component,
        overlay=overlay,
        overwrite=overwrite,
        label_map=label_map,
        amp=False if fp32 else None,
        conditions=common,
        case_conditions=per_case,
        ood_map=(ood_score or "auto") if ood_map else None,
        echo=print,
    )


@app.command()
def evaluate(
    pred: Path = typer.Option(..., "-i", "--input", "--pred", help="Folder of predicted label maps."),
    ref: Path = typer.Option(..., "-r", "--reference", "--ref", help="Folder of reference label maps."),
    dataset_json: Path | None = typer.Option(
        None, "--labels", "-l", help="dataset.json naming the labels (required, except with --ood)."
    ),
    output: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        help="JSON path, CSV written beside (default: INPUT/summary.json; with --ood INPUT/ood_summary.json, no CSV).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    nsd_tolerance: float = typer.Option(1.0, help="Surface-Dice tolerance in mm."),
    roi_masks: Path | None = typer.Option(
        None, "--roi-masks", help="Folder of region-of-interest masks CASE.ext: metrics only inside them."
    ),
    ood: bool = typer.Option(
        False,
        "--ood",
        help="Evaluate the OOD score maps INPUT/CASE_ood.nii.gz instead of the label maps: pixel AUROC, AUPR, "
        "FPR95 (OOD cases' lesions vs every other voxel) and case AUROC (docs/cli.md).",
    ),
    ood_cases: Path | None = typer.Option(
        None, "--ood-cases", help="With --ood: the OOD case ids, one a line, or CSV with case,group columns."
    ),
):
    """Dice, IoU, HD95 and normalised surface Dice per class and case (--ood: OOD score maps)."""
    from medseg import api
    from medseg.io.image import check_writable_dir
    from medseg.outputs import check_new_outputs

    if ood_cases is not None and not ood:
        _fail("--ood-cases needs --ood")
    if ood:
        from medseg.errors import MedsegError
        from medseg.evaluation.ood import evaluate_ood, read_ood_cases, summary_lines
        from medseg.io.jsonio import write_json

        if ood_cases is None:
            _fail("--ood needs --ood-cases FILE (the OOD case ids)")
        if dataset_json is not None or roi_masks is not None:
            _fail("--labels and --roi-masks do not apply to --ood (evaluate the label maps in a separate run)")
        output = output or pred / "ood_summary.json"
        check_writable_dir(Path(output).parent)  # fail before reading the volumes, not after
        check_new_outputs([output], overwrite=overwrite)
        try:
            s = evaluate_ood(pred, ref, read_ood_cases(ood_cases))
        except MedsegError as exc:
            _fail(exc.one_line())
        except ValueError as exc:
            _fail(str(exc))
        if s["ood_cases_not_evaluated"]:
            missing = s["ood_cases_not_evaluated"]
            _err(f"medseg: warning: {len(missing)} OOD case(s) of {ood_cases} not in {pred}: {', '.join(missing[:5])}")
        write_json(output, s)
        for line in summary_lines(s):
            print(line)
        print(f"written {output}")
        return
    if dataset_json is None:
        _fail("--labels is required")
    output = output or pred / "summary.json"
    check_writable_dir(Path(output).parent)  # fail before computing metrics, not after
    check_new_outputs([output, Path(output).with_suffix(".csv")], overwrite=overwrite)
    s = api.evaluate(
        pred, ref, dataset_json=dataset_json, output=output, nsd_tolerance_mm=nsd_tolerance, roi_masks=roi_masks
    )
    from medseg.evaluation.report import metrics_summary_lines

    for line in metrics_summary_lines(s):
        print(line)
    print(f"written {output} and {Path(output).with_suffix('.csv')}")


def _input_output(option: Path | None, positional: Path | None, flag: str) -> Path:
    """``-i``/``-o`` or, for one release, the positional spelling they replace."""
    if option is not None and positional is not None and option != positional:
        _fail(f"{flag} given twice ({positional} and {option}); pass it once, as {flag}")
    if option is None and positional is None:
        _fail(f"missing {flag}")
    if option is None:
        _err(
            f"medseg: warning: a positional {flag.split('/')[-1].lstrip('-')} is now {flag}; it goes in the next release"
        )
    return option if option is not None else positional


@app.command("export-model")
def export_model(
    input: Path | None = typer.Option(None, "-i", "--input", help="Training output folder (model.json + fold_K/)."),
    output: Path | None = typer.Option(None, "-o", "--output", help="New model folder to write."),
    folds: list[str] | None = typer.Option(None, "-f", "--fold", help="Fold to include (repeatable; default all)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model folder."),
    old_source: Path | None = typer.Argument(None, hidden=True),
    old_destination: Path | None = typer.Argument(None, hidden=True),
):
    """Copy only what inference needs (spec, weights, hashes, validation summaries) into a shippable folder."""
    from medseg import api

    source = _input_output(input, old_source, "-i/--input")
    destination = _input_output(output, old_destination, "-o/--output")
    out = api.package_model(source, destination, folds=folds, overwrite=overwrite)
    print(f"model folder written: {out}")


@app.command("import-nnunet")
def import_nnunet(
    input: Path | None = typer.Option(
        None,
        "-i",
        "--input",
        help="nnU-Net v2 results folder TRAINER__PLANS__CONFIGURATION (dataset.json, plans.json, fold_K/).",
    ),
    output: Path | None = typer.Option(None, "-o", "--output", help="medseg model folder to write."),
    checkpoint: str = typer.Option("final", "--checkpoint", help="final (checkpoint_final.pth) | best."),
    folds: list[str] | None = typer.Option(
        None, "-f", "--fold", help="Fold to import (repeatable; default: all found)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model folder."),
    old_results: Path | None = typer.Argument(None, hidden=True),
    old_output: Path | None = typer.Argument(None, hidden=True),
):
    """Convert a trained nnU-Net v2 model into a medseg model folder (weights read with weights_only=True)."""
    from medseg.interop.nnunet import import_nnunet as _import

    results_folder = _input_output(input, old_results, "-i/--input")
    output = _input_output(output, old_output, "-o/--output")

    r = _import(results_folder, output, checkpoint=checkpoint, folds=folds, overwrite=overwrite)
    tta = "mirror TTA on axes " + ",".join(map(str, r.mirror_axes)) if r.mirror_axes else "no mirror TTA"
    print(f"imported {r.trainer} / {r.plans_name} / {r.configuration} ({r.checkpoint}, folds {', '.join(r.folds)})")
    print(f"model '{r.model}', {tta}")
    for note in r.notes:
        print(f"note: {note}")
    print(f"model folder written: {r.output}")


@app.command("convert-msd")
def convert_msd(
    input: Path | None = typer.Option(
        None, "-i", "--input", help="MSD task folder (dataset.json, imagesTr/ of 4D NIfTI)."
    ),
    output: Path | None = typer.Option(None, "-o", "--output", help="nnU-Net v2 raw dataset folder to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    old_msd: Path | None = typer.Argument(None, hidden=True),
    old_output: Path | None = typer.Argument(None, hidden=True),
):
    """Convert a Medical Segmentation Decathlon task to the nnU-Net v2 raw layout."""
    from medseg.io.dataset import convert_msd as _convert
    from medseg.outputs import check_new_outputs

    msd_folder = _input_output(input, old_msd, "-i/--input")
    output = _input_output(output, old_output, "-o/--output")
    check_new_outputs([output / n for n in ("dataset.json", "imagesTr", "labelsTr")], overwrite=overwrite)
    print(f"converted to {_convert(msd_folder, output)}")


@app.command()
def models(
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
    patch: tuple[int, int, int] = typer.Option((128, 128, 128), "--patch", help="Patch (voxels) for FLOPs."),
    in_channels: int = typer.Option(1, "--in-channels", help="Input channels (STU-Net convention: 1 CT)."),
    num_classes: int = typer.Option(
        105, "--num-classes", help="Output classes (STU-Net convention: 105 TotalSegmentator)."
    ),
    cost: bool = typer.Option(True, "--cost/--no-cost", help="Measure parameters and FLOPs (meta device)."),
):
    """List registered model architectures: parameters, GFLOPs (2 x MACs, batch 1) and optional dependencies.

    Each network is measured with its builder's default topology; where that cannot take PATCH (a
    total stride that does not divide it), with the topology the planner gives PATCH at 1 mm spacing.
    A fixed-input model (LiteMedSAM: 3 x 256 x 256, one mask per prompt) is measured at its own input.
    """
    from medseg.models import count_parameters, create_model, get_entry, list_models
    from medseg.models.flops import measure

    rows = []
    for name in list_models():
        e = get_entry(name)
        req = e.available()
        row = {
            "name": name,
            "description": e.description,
            "task": e.task,
            "encoder": list(e.encoder),
            "head": list(e.head),
            "requires": req,
            "available": all(req.values()),
            "patch": list(patch),
            "in_channels": in_channels,
            "num_classes": num_classes,
            "params": None,
            "flops": None,
            "macs": None,
            "topology": None,
            "test_config_params": None,
            "error": None,
        }
        if row["available"]:
            try:
                tiny = {k: v for k, v in e.test_config.items() if k != "input_size"}
                row["test_config_params"] = count_parameters(create_model(name, 1, 2, **tiny))
                if cost and e.input_shape:  # a fixed-input model (SAM): its own input, one mask per prompt
                    c = measure(name, e.input_shape[1:], in_channels=e.input_shape[0], num_classes=1)
                    shape = "x".join(map(str, e.input_shape))
                    row.update(params=c.params, flops=c.flops, macs=c.macs, topology=f"fixed input {shape}")
                elif cost:
                    c, row["topology"] = _measure_at_patch(name, patch, in_channels, num_classes)
                    row.update(params=c.params, flops=c.flops, macs=c.macs)
            except Exception as exc:  # one model that cannot be built on meta must not hide the others
                row["error"] = " ".join(f"{type(exc).__name__}: {exc}".split())
        rows.append(row)
    if json_out:
        print(json.dumps(rows, indent=1))
        return
    deps = {r["name"]: ", ".join(f"{m} {'ok' if ok else 'MISSING'}" for m, ok in r["requires"].items()) or "-"
            for r in rows}  # fmt: skip
    width = max(8, *map(len, deps.values()))
    print(
        f"{'name':14s} {'params':>10s} {'GFLOPs':>9s}  {'requires':{width}s}  description  "
        f"(patch {'x'.join(map(str, patch))}, {in_channels} -> {num_classes} classes, GFLOPs = 2 x MACs)"
    )
    for r in rows:
        params = f"{r['params'] / 1e6:.2f}M" if r["params"] is not None else "n/a"
        gflops = f"{r['flops'] / 1e9:.1f}" if r["flops"] is not None else "n/a"
        note = " [topology planned for the patch]" if r["topology"] == "planned" else ""
        if (r["topology"] or "").startswith("fixed input"):
            note = f" [at its {r['topology']}]"
        note += f"  [{r['error']}]" if r["error"] else ""
        print(f"{r['name']:14s} {params:>10s} {gflops:>9s}  {deps[r['name']]:{width}s}  {r['description']}{note}")


def _measure_at_patch(name: str, patch, in_channels: int, num_classes: int):
    """(cost, "default" | "planned"): the builder's default network, or, if its total stride does not
    divide ``patch``, the network with the topology the planner gives ``patch`` at 1 mm spacing."""
    from medseg.models.flops import measure
    from medseg.models.registry import accepted_kwargs
    from medseg.planning.planner import pool_and_conv_props

    try:
        return measure(name, patch, in_channels=in_channels, num_classes=num_classes), "default"
    except Exception:
        strides, kernels, padded, _ = pool_and_conv_props([1.0] * len(patch), patch)
        if accepted_kwargs(name, ("strides",)) != {"strides"} or list(padded) != list(patch):
            raise
    kw = {"strides": strides, **({"kernel_sizes": kernels} if accepted_kwargs(name, ("kernel_sizes",)) else {})}
    return measure(name, patch, in_channels=in_channels, num_classes=num_classes, **kw), "planned"


# the CT, DICOM-SEG and cohort commands, and `sam`, live in their own modules; importing them registers them on `app`
from medseg.cli import ct_commands, sam_commands  # noqa: E402,F401


def main() -> None:
    from medseg.errors import MedsegError

    try:
        app()
    except MedsegError as exc:
        print(f"medseg: error: {exc.one_line()}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # the OS refused a named file (permissions, disk full): the user's to fix
        if exc.filename is None:
            raise
        print(f"medseg: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("medseg: interrupted", file=sys.stderr)
        sys.exit(130)
