"""``medseg synthesize``: new lesions in real images with a LeFusion denoiser (medseg.apps.synthesis)."""

from __future__ import annotations

from pathlib import Path

import typer

from medseg.cli import DEVICE_HELP, app


@app.command("synthesize")
def synthesize(
    model: str = typer.Option(
        ..., "-m", "--model", help="A lesion-diffusion model folder (medseg train --arch lefusion_unet)."
    ),
    image: Path | None = typer.Option(
        None,
        "-i",
        "--input",
        help="The real image (HU) to put lesions into; or a dataset folder; or a CSV batch table.",
    ),
    mask: Path | None = typer.Option(None, "--mask", help="Lesion label map on the image's grid: 0 keep, k = class k."),
    output: Path | None = typer.Option(
        None, "-o", "--output", help="Image to write (the mask beside it, *_mask); a folder for a dataset or table."
    ),
    texture: int | None = typer.Option(None, "--texture", help="Texture id (--list-textures), jittered by up to 10 %."),
    histogram: Path | None = typer.Option(
        None, "--histogram", help="JSON list of the target lesion histogram(s) (default: the input lesion's own)."
    ),
    list_textures: bool = typer.Option(False, "--list-textures", help="Print the model's textures, one per line."),
    samples: int = typer.Option(1, "--samples", help="With a dataset folder as -i: synthetic cases per real case."),
    all_textures: bool = typer.Option(False, "--all-textures", help="With a dataset folder: each texture in turn."),
    steps: int = typer.Option(20, "--steps", help="Denoising steps of the respaced schedule (RePaint jumps on top)."),
    jump_length: int = typer.Option(5, "--jump-length", help="RePaint: steps between jumps back."),
    jump_n_sample: int = typer.Option(2, "--jump-n-sample", help="RePaint: passes over each jumped stretch."),
    guidance: float | None = typer.Option(
        None,
        "--guidance",
        help="Classifier-free guidance weight (1: none; default: 2 for models trained with cond_dropout, else 1).",
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed of the sampling."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs that exist."),
):
    """Synthesise lesions into a real image (LeFusion, RePaint sampling); outside the mask the image is kept
    bit for bit. docs/synthesis.md."""
    from medseg.apps import synthesis as syn_app
    from medseg.errors import MedsegError
    from medseg.io.checkpoint import resolve_model
    from medseg.outputs import check_new_outputs

    if list_textures:
        for line in syn_app.texture_lines(syn_app.read_textures(resolve_model(model))):
            print(line)
        return
    if image is None or output is None or (mask is None and not (image.is_dir() or image.suffix.lower() == ".csv")):
        raise MedsegError(
            None, "synthesize needs -i/--input (an image with --mask, a dataset folder or a CSV table) and -o"
        )
    if texture is not None and histogram is not None:
        raise MedsegError(None, "give --texture or --histogram, not both")
    syn = syn_app.Synthesizer.from_folder(model, device=device)
    sampling = {"steps": steps, "jump_length": jump_length, "jump_n_sample": jump_n_sample,
                "guidance": syn.check_guidance(guidance)}  # fmt: skip
    if image.is_dir():  # a dataset: every labelled case, --samples times, into a new nnU-Net dataset at -o
        syn_app.synthesize_dataset(syn, resolve_model(model), image, output, samples=samples, texture=texture,
                                   all_textures=all_textures, seed=seed, **sampling)  # fmt: skip
        return
    if image.suffix.lower() == ".csv":  # a batch table: one job per row, into the folder -o
        syn_app.synthesize_table(syn, resolve_model(model), image, output, seed=seed, **sampling)
        return
    mask_out = syn_app.mask_name(output)
    check_new_outputs([output, mask_out], overwrite=overwrite)
    h = syn_app.read_histogram(histogram) if histogram is not None else None
    if texture is not None:
        h = syn_app.texture_histogram(syn_app.read_textures(resolve_model(model)), texture, seed)
    seconds = syn_app.synthesize_file(syn, image, mask, output, mask_out, h, seed=seed, **sampling)
    print(f"synthesised in {seconds:.1f} s -> {output}, {mask_out}")


@app.command("synthesize-mask")
def synthesize_mask(
    model: str = typer.Option(
        ..., "-m", "--model", help="A mask-diffusion model folder (medseg train --arch diffmask_unet)."
    ),
    like: Path = typer.Option(..., "--like", help="Image whose grid the new mask is drawn on."),
    centre: tuple[float, float, float] = typer.Option(..., "--centre", help="Lesion centre: voxel z y x of --like."),
    radius: float = typer.Option(..., "--radius", help="Radius of the ball the lesion is drawn in, mm."),
    output: Path = typer.Option(..., "-o", "--output", help="Mask to write (uint8, 1 = lesion)."),
    steps: int = typer.Option(50, "--steps", help="Denoising steps of the respaced schedule."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the sampling."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an output that exists."),
):
    """A new lesion shape (DiffMask): mask diffusion conditioned on a ball, then hole filling, size-dependent
    smoothing and the largest component. docs/synthesis.md."""
    from medseg.apps.synthesis import Synthesizer
    from medseg.errors import MedsegError
    from medseg.io.image import read_image, write_image
    from medseg.outputs import check_new_outputs

    check_new_outputs([output], overwrite=overwrite)
    img, meta = read_image(like)
    if not all(0 <= c < n for c, n in zip(centre, img.shape)):
        raise MedsegError(like, f"--centre {list(centre)} is outside the image (shape {list(img.shape)})")
    if not radius > 0:
        raise MedsegError(None, f"--radius must be positive, got {radius}")
    syn = Synthesizer.from_folder(model, device=device, task="mask_diffusion")
    mask = syn.synthesize_mask(img, meta, centre, radius, steps=steps, seed=seed)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_image(mask, meta, output)
    print(f"mask of {int(mask.sum())} voxels -> {output}")
