"""``medseg`` command line: a thin typer layer over medseg.api (imports are lazy).

Every user-facing failure prints ``medseg: error: <file>: <reason>`` on one line and exits 2.
"""

from __future__ import annotations

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
LAYOUT_HELP = (
    "Memory layout of the network on CPUs: auto (measured once per machine and network, cached) | "
    "contiguous | channels_last."
)
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
    lr: float | None = typer.Option(
        None, "--lr", help="Initial learning rate (default: the task's; 1e-2, mask transformers 3e-4)."
    ),
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
    optimizer: str | None = typer.Option(
        None, help="sgd_nesterov | adamw | adam (default: the task's; sgd_nesterov, mask transformers adamw)."
    ),
    schedule: str = typer.Option("poly", help="LR schedule: poly | warmup_cosine | constant."),
    weight_decay: float | None = typer.Option(
        None, help="Weight decay, AdamW: decoupled (default: the task's; 3e-5, mask transformers 1e-4)."
    ),
    ema_decay: float | None = typer.Option(None, help="Keep an EMA of the weights (e.g. 0.999); it is exported."),
    param_groups: str | None = typer.Option(
        None, help='JSON list of per-group LR scales, e.g. \'[{"prefix": "encoder.", "lr_scale": 0.1}]\'.'
    ),
    task_options: str | None = typer.Option(
        None, help="JSON object of the task's own options, e.g. '{\"train_points\": 8192}' (docs/cli.md)."
    ),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    seed: int = typer.Option(0, help="Random seed (patches, augmentation, initialisation)."),
    threads: int | None = typer.Option(None, help="CPU threads for torch."),
    amp: bool | None = typer.Option(
        None, "--amp/--no-amp", help="Mixed precision (default: fp16 on CUDA, bf16 on CPUs with native bf16)."
    ),
    layout: str = typer.Option("auto", "--layout", help=LAYOUT_HELP),
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
        options = json_value(task_options, "--task-options", dict) if task_options else {}
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
        task_options=options,
        device=device,
        seed=seed,
        num_threads=threads,
        amp=amp,
        layout=layout,
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
    layout: str = typer.Option("auto", "--layout", help=LAYOUT_HELP),
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
    ood_score: list[str] = typer.Option(
        [],
        "--ood-score",
        help="OOD score: maxquery (models with queries; their default) | msp (others' default) | "
        "maxlogit | entropy (docs/ood.md); repeatable: the first is CASE_ood, the others CASE_ood_<score>.",
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
    if ood_score and not ood_map:
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
        layout=layout,
        conditions=common,
        case_conditions=per_case,
        ood_map=(ood_score or ["auto"]) if ood_map else None,
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


# the CT, DICOM-SEG and cohort commands, `sam`, and the model-folder commands live in their own modules;
# importing them registers them on `app`
from medseg.cli import (  # noqa: E402,F401
    adapt_commands,
    ct_commands,
    model_commands,
    report_commands,
    sam_commands,
    synthesis_commands,
    weak_label_commands,
)


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
