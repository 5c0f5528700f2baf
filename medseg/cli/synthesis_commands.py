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
    image: Path | None = typer.Option(None, "-i", "--input", help="The real image (HU) to put lesions into."),
    mask: Path | None = typer.Option(None, "--mask", help="Lesion label map on the image's grid: 0 keep, k = class k."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Image to write (the mask beside it, *_mask)."),
    texture: int | None = typer.Option(None, "--texture", help="Texture id (--list-textures), jittered by up to 10 %."),
    histogram: Path | None = typer.Option(
        None, "--histogram", help="JSON list of the target lesion histogram(s) (default: the input lesion's own)."
    ),
    list_textures: bool = typer.Option(False, "--list-textures", help="Print the model's textures, one per line."),
    samples: int = typer.Option(1, "--samples", help="With a dataset folder as -i: synthetic cases per real case."),
    all_textures: bool = typer.Option(False, "--all-textures", help="With a dataset folder: each texture in turn."),
    steps: int = typer.Option(50, "--steps", help="Denoising steps of the respaced schedule (RePaint jumps on top)."),
    jump_length: int = typer.Option(5, "--jump-length", help="RePaint: steps between jumps back."),
    jump_n_sample: int = typer.Option(5, "--jump-n-sample", help="RePaint: passes over each jumped stretch."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the sampling."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs that exist."),
):
    """Synthesise lesions into a real image (LeFusion, RePaint sampling); outside the mask the image is kept
    bit for bit. docs/synthesis.md."""
    import json
    import time

    from medseg.apps.synthesis import Synthesizer, read_textures, texture_histogram, texture_lines
    from medseg.errors import DatasetError, MedsegError
    from medseg.io.checkpoint import resolve_model
    from medseg.io.image import read_image, write_image
    from medseg.outputs import check_new_outputs

    if list_textures:
        for line in texture_lines(read_textures(resolve_model(model))):
            print(line)
        return
    if image is None or output is None or (mask is None and not image.is_dir()):
        raise MedsegError(None, "synthesize needs -i/--input (an image with --mask, or a dataset folder) and -o")
    if texture is not None and histogram is not None:
        raise MedsegError(None, "give --texture or --histogram, not both")
    if image.is_dir():  # a dataset: every labelled case, --samples times, into a new nnU-Net dataset at -o
        from medseg.apps.synthesis import synthesize_dataset

        syn = Synthesizer.from_folder(model, device=device)
        synthesize_dataset(syn, resolve_model(model), image, output, samples=samples, texture=texture,
                           all_textures=all_textures, seed=seed, steps=steps, jump_length=jump_length,
                           jump_n_sample=jump_n_sample)  # fmt: skip
        return
    mask_out = output.with_name(output.name.replace(".nii.gz", "").rsplit(".", 1)[0] + "_mask" + _ending(output))
    check_new_outputs([output, mask_out], overwrite=overwrite)
    img, meta = read_image(image)
    lab, lab_meta = read_image(mask)
    if lab.shape != img.shape:
        raise DatasetError(mask, f"shape {lab.shape} is not the image's {img.shape}")
    if not (lab > 0).any():
        raise DatasetError(mask, "the mask is empty: nothing to synthesise")
    h = None
    if histogram is not None:
        try:
            h = json.loads(histogram.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DatasetError(histogram, f"cannot read a JSON histogram ({exc})") from None
    if texture is not None:
        h = texture_histogram(read_textures(resolve_model(model)), texture, seed)
    t0 = time.perf_counter()
    syn = Synthesizer.from_folder(model, device=device)
    out = syn.synthesize(
        img, meta, lab, h, steps=steps, jump_length=jump_length, jump_n_sample=jump_n_sample, seed=seed
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    write_image(out, meta, output)
    write_image(lab, lab_meta, mask_out)
    print(
        f"synthesised {int((lab > 0).sum())} lesion voxels in {time.perf_counter() - t0:.1f} s -> {output}, {mask_out}"
    )


def _ending(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix


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
