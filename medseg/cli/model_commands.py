"""The commands about model folders and the registry: ``export-model``, ``import-nnunet``,
``convert-msd`` (a dataset converter, kept with the other importer), ``models`` and
``crossval``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from medseg.cli import DEVICE_HELP, OVERWRITE_HELP, _input_output, app


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
    from medseg.models.registry import accepted_kwargs, get_entry
    from medseg.planning.planner import pool_and_conv_props

    if len(patch) not in get_entry(name).spatial_dims:  # a 2D-only model: one slice of the patch
        patch = tuple(patch)[1:] if len(patch) == 3 else tuple(patch)
    try:
        return measure(name, patch, in_channels=in_channels, num_classes=num_classes), "default"
    except Exception:
        strides, kernels, padded, _ = pool_and_conv_props([1.0] * len(patch), patch)
        if accepted_kwargs(name, ("strides",)) != {"strides"} or list(padded) != list(patch):
            raise
    kw = {"strides": strides, **({"kernel_sizes": kernels} if accepted_kwargs(name, ("kernel_sizes",)) else {})}
    return measure(name, patch, in_channels=in_channels, num_classes=num_classes, **kw), "planned"


@app.command("crossval")
def crossval(
    model: Path = typer.Option(..., "-m", "--model", help="Model folder with its numbered folds (fold_0 ... fold_4)."),
    dataset: Path = typer.Argument(..., help="The dataset the folds were trained on (its labelsTr is the reference)."),
    splits: Path | None = typer.Option(
        None, "--splits", help="splits_final.json: predict the validation cases of folds that have none."
    ),
    output: Path | None = typer.Option(None, "-o", "--output", help="Output folder (default: MODEL/crossval)."),
    postprocessing: bool = typer.Option(
        True, "--postprocessing/--no-postprocessing", help="Also choose largest-component postprocessing per label."
    ),
    nsd_tolerance: float = typer.Option(1.0, help="Surface-Dice tolerance in mm."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """Cross-validation: every case predicted by the fold that did not train on it, evaluated as one set."""
    from medseg.evaluation.crossval import cross_validate
    from medseg.evaluation.report import metrics_summary_lines
    from medseg.outputs import check_new_outputs

    out = output or model / "crossval"
    check_new_outputs([out / "summary.json", out / "summary.csv"], overwrite=overwrite)
    s = cross_validate(model, dataset, splits=splits, output=out, postprocessing=postprocessing,
                       nsd_tolerance_mm=nsd_tolerance, device=device)  # fmt: skip
    folds = ", ".join(f"fold {f}: {n}" for f, n in s["folds"].items())
    print(f"cross-validation of {s['num_cases']} cases ({folds})")
    for line in metrics_summary_lines(s):
        print(line)
    if s["missing_cases"]:
        print(
            f"warning: {len(s['missing_cases'])} reference case(s) in no fold's validation, e.g. {s['missing_cases'][0]}"
        )
    if "postprocessing" in s:
        kept = s["postprocessing"]["largest_component"]
        print("postprocessing: keep the largest component of labels " + ", ".join(map(str, kept)) if kept
              else "postprocessing: none raises a class's Dice (keeping the largest component changes nothing or less)")  # fmt: skip
    print(f"written {out / 'summary.json'}")
