"""``medseg ct``, ``ct-stats``, ``dicom-seg``, ``cohort`` and ``cohort-analyse``: the whole-body CT and
cohort commands of the CLI (registered on :data:`medseg.cli.app`)."""

from __future__ import annotations

from pathlib import Path

import typer

from medseg.cli import DEVICE_HELP, OVERWRITE_HELP, _err, _fail, _input_output, app

CLASS_MAP_HELP = "total | total_v1 | total_mr | a JSON file (dataset.json, model.json, {name: value})."


@app.command()
def ct(
    input: Path = typer.Option(..., "-i", "--input", help="CT: NIfTI/NRRD/MHA file, DICOM series folder or zip."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder (or a .nii.gz file with --multilabel)."),
    model: str = typer.Option(..., "-m", "--model", help="Model folder (medseg, or imported with import-nnunet)."),
    fast: bool = typer.Option(False, "--fast", help="Use the model's lower-resolution variant (MODEL/fast)."),
    roi_subset: list[str] | None = typer.Option(None, "--roi-subset", help="Only these structures (repeatable)."),
    multilabel: bool = typer.Option(False, "--multilabel", help="One label map instead of one file per structure."),
    statistics: bool = typer.Option(
        False, "--statistics", help="Volume and HU per structure (OUT/statistics.json, or SEG_statistics.json)."
    ),
    stats_format: str = typer.Option("medseg", "--stats-format", help="medseg | totalsegmentator."),
    preview: bool = typer.Option(
        False, "--preview", help="PNG overlay: axial, coronal, sagittal (OUT/preview.png, or SEG_preview.png)."
    ),
    dicom_seg: bool = typer.Option(
        False, "--dicom-seg", help="Also write a DICOM-SEG, OUT/segmentation.dcm or SEG.dcm (DICOM input only)."
    ),
    class_map: str | None = typer.Option(
        None, "--class-map", help=f"Structure names (default: the model's; a map must fit it): {CLASS_MAP_HELP}"
    ),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    no_tta: bool = typer.Option(False, "--no-tta", help="Disable mirror test-time augmentation (faster)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """Segment a CT into named structures, with statistics, previews and DICOM-SEG on request."""
    from medseg.apps.ct_stats import FORMATS
    from medseg.apps.ct_tool import segment_ct

    if stats_format not in FORMATS:
        _fail(f"--stats-format: expected one of {', '.join(FORMATS)}, got {stats_format!r}")
    segment_ct(
        input,
        output,
        model,
        fast=fast,
        roi_subset=roi_subset or None,
        multilabel=multilabel,
        statistics=statistics,
        stats_format=stats_format,
        preview=preview,
        dicom_seg=dicom_seg,
        class_map=class_map,
        device=device,
        tta=not no_tta,
        overwrite=overwrite,
    )


@app.command("ct-stats")
def ct_stats(
    image: Path = typer.Option(..., "-i", "--input", help="CT image (NIfTI, NRRD, MHA or a DICOM series folder)."),
    seg: Path = typer.Option(..., "--seg", help="Label map on the same grid."),
    output: Path = typer.Option(..., "-o", "--output", help="JSON to write (medseg format: CSV beside it)."),
    model: str | None = typer.Option(
        None,
        "-m",
        "--model",
        help="Model folder or shipped name that made SEG: its labels name the values (default: as recorded by predict).",
    ),
    class_map: str | None = typer.Option(
        None, "--class-map", help=f"Structure names when SEG has no model (or to rename a model's): {CLASS_MAP_HELP}"
    ),
    modality: str = typer.Option(
        "auto", "--modality", help="ct (HU) | other (the image's own units) | auto (air near -1000 means CT)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    fmt: str = typer.Option("medseg", "--format", help="medseg | totalsegmentator (its statistics.json)."),
    erode_mm: float = typer.Option(0.0, "--erode-mm", help="Also report HU inside the mask eroded by this radius."),
    include_incomplete: bool = typer.Option(
        False, "--include-incomplete", help="totalsegmentator format: keep structures touching the border."
    ),
    metric: str = typer.Option("mean", "--metric", help="totalsegmentator format: mean | median."),
):
    """Per-structure volume (mm3, mL) and attenuation (HU) of a CT label map."""
    from medseg.apps.ct_stats import FORMATS, MODALITIES, ct_statistics_files

    if fmt not in FORMATS:
        _fail(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if modality not in MODALITIES:
        _fail(f"--modality: expected one of {', '.join(MODALITIES)}, got {modality!r}")
    if metric not in ("mean", "median"):
        _fail(f"--metric: expected mean or median, got {metric!r}")
    stats = ct_statistics_files(
        image,
        seg,
        output,
        class_map=class_map,
        model=model,
        fmt=fmt,
        erode_mm=erode_mm,
        exclude_masks_at_border=not include_incomplete,
        metric=metric,
        modality=modality,
        overwrite=overwrite,
    )
    if fmt == "totalsegmentator":
        present = sum(1 for v in stats.values() if v["volume"] > 0)
        print(f"{present} of {len(stats)} structures with statistics -> {output}")
        return
    present = {k: v for k, v in stats.items() if v["voxels"]}
    for name, row in present.items():
        flag = "  (touches border)" if row["touches_border"] else ""
        hu = f"{row['hu_mean']:8.1f} HU" if "hu_mean" in row else f"mean intensity {row['intensity_mean']:10.2f}"
        print(f"{name:32s} {row['volume_ml']:10.2f} mL  {hu}{flag}")
    print(f"{len(present)} of {len(stats)} structures present -> {output} (+ {output.with_suffix('.csv').name})")


@app.command("dicom-seg")
def dicom_seg(
    series: Path = typer.Option(..., "-i", "--input", help="DICOM series folder the label map was made on."),
    seg: Path = typer.Option(..., "--seg", help="Label map on the series' grid (NIfTI, NRRD, MHA)."),
    out: Path = typer.Option(..., "-o", "--output", help="DICOM-SEG file to write."),
    model: str | None = typer.Option(
        None,
        "-m",
        "--model",
        help="Model folder or shipped name that made SEG: its labels name the segments (default: as recorded by predict).",
    ),
    class_map: str | None = typer.Option(
        None, "--class-map", help=f"Segment names when SEG has no model (or to rename a model's): {CLASS_MAP_HELP}"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """Convert a label map into a DICOM-SEG (highdicom); segment numbers equal label values."""
    from medseg.ct.class_maps import class_map_for_label_map, unnamed_values_problem
    from medseg.errors import DatasetError
    from medseg.io.dicom_seg import dicom_seg_from_files
    from medseg.io.image import read_image
    from medseg.outputs import check_new_outputs

    check_new_outputs([out], overwrite=overwrite)
    labels = class_map_for_label_map(class_map, seg, model=model)
    problem = unnamed_values_problem(read_image(seg)[0], labels)  # they would become segments 'label_N'
    if problem:
        raise DatasetError(seg, problem)
    path = dicom_seg_from_files(series, seg, out, labels)
    print(f"DICOM-SEG written: {path}")


@app.command()
def cohort(
    input: Path = typer.Option(..., "-i", "--input", help="Folder of scans, or a CSV: path[,case][,seg],covariates..."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder (resumable: done cases are skipped)."),
    model: str | None = typer.Option(None, "-m", "--model", help="Model folder or shipped name (segments the scans)."),
    segmentations: Path | None = typer.Option(
        None, "--segmentations", help="Folder of existing label maps CASE.nii.gz."
    ),
    class_map: str | None = typer.Option(
        None, "--class-map", help=f"Structure names (default: the model's; a map must fit it): {CLASS_MAP_HELP}"
    ),
    workers: int = typer.Option(1, "--workers", help="Parallel workers, one model each."),
    backend: str = typer.Option("local", "--backend", help="local | ray (optional extra)."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Ray cluster address (default: local Ray)."),
    erode_mm: float = typer.Option(0.0, "--erode-mm", help="Also measure HU inside masks eroded by this radius."),
    no_tta: bool = typer.Option(False, "--no-tta", help="Disable mirror test-time augmentation (faster)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    analyse: list[str] = typer.Option([], "--analyse", help="Covariate column(s) to correlate with, e.g. age."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Redo cases already done (without it they are skipped: a rerun resumes)."
    ),
):
    """Per-structure volume and attenuation for a whole cohort -> cohort.csv/.parquet (+ correlations)."""
    from medseg.apps.cohort import run_cohort

    if backend not in ("local", "ray"):
        _fail(f"--backend: expected local or ray, got {backend!r}")
    res = run_cohort(
        input,
        output,
        model=model,
        segmentations=segmentations,
        class_map=class_map,
        workers=workers,
        backend=backend,
        ray_address=ray_address,
        device=device,
        tta=not no_tta,
        erode_mm=erode_mm,
        overwrite=overwrite,
        echo=_err,
    )
    for cov in analyse:
        _print_analysis(res["rows"], cov, output)
    if res["failed"]:
        _fail(f"{len(res['failed'])} case(s) failed (listed in {output / 'failed.json'}); rerun to retry them", 1)


def _print_analysis(rows, covariate: str, output: Path, *, overwrite: bool = True) -> None:
    from medseg.apps.cohort_analysis import analyse_cohort
    from medseg.outputs import check_new_outputs

    check_new_outputs([output / f"correlations_{covariate}.csv", output / f"plots_{covariate}"], overwrite=overwrite)
    res = analyse_cohort(rows, covariate, output)
    sig = [r for r in res["results"] if r["significant_fdr"]]
    for r in sig[:20]:
        print(
            f"{r['structure']:28s} {r['measure']:10s} r={r['pearson_r']:+.2f} rho={r['spearman_rho']:+.2f} "
            f"q={r['pearson_p_fdr']:.2g} n={r['n']}"
        )
    print(
        f"{covariate}: {len(res['results'])} tests, {len(sig)} significant at FDR 5 % -> {res['table']}, "
        f"{len(res['plots'])} plots"
    )


@app.command("cohort-analyse")
def cohort_analyse(
    input: Path | None = typer.Option(None, "-i", "--input", help="cohort.csv written by `medseg cohort`."),
    covariate: str = typer.Option(..., "--covariate", help="Column to correlate with, e.g. age."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for the correlation table and plots."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    old_table: Path | None = typer.Argument(None, hidden=True),
):
    """Pearson/Spearman of each structure's volume and HU with a covariate, FDR-corrected, with plots."""
    from medseg.apps.cohort_analysis import read_table

    table = _input_output(input, old_table, "-i/--input")
    _print_analysis(read_table(table), covariate, output, overwrite=overwrite)
