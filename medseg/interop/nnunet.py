"""Import an nnU-Net v2 trained model (a results folder) as a medseg model folder.

An nnU-Net v2 results folder is ``TRAINER__PLANS__CONFIGURATION/`` holding ``dataset.json``,
``plans.json`` and ``fold_K/checkpoint_final.pth`` (and ``checkpoint_best.pth``) for folds 0-4 or
``all``. :func:`import_nnunet` turns it into ``MODEL/model.json`` + ``MODEL/fold_K/model.safetensors``:

* the configuration's preprocessing (target spacing, per-channel normalisation with nnU-Net's
  dataset-wide CT statistics, masked z-score, separate-z resampling) becomes a medseg
  :class:`~medseg.planning.plan.Plan`; patch size and spacing are re-ordered from nnU-Net's transposed
  axis order (``transpose_forward``) to the image's own (z, y, x);
* the network (``PlainConvUNet`` -> ``unet``, ``ResidualEncoderUNet`` -> ``resenc``) keeps nnU-Net's
  topology, conv bias, norm epsilon and LeakyReLU slope, and works in nnU-Net's axis order itself
  (``transpose``), so its weights are used unchanged; the state-dict keys are renamed (PlainConvUNet)
  or only stripped of nnU-Net's aliases (ResEnc, whose names medseg shares);
* the trainer's ``inference_allowed_mirroring_axes`` become the configuration's ``mirror_axes``.

Safety: ``.pth`` files are pickles. They are read only with ``torch.load(weights_only=True)``, which
rebuilds tensors and plain containers and refuses every other global; numpy scalars and dtypes (found in
nnU-Net's training log) are the only additions allowed. Anything else is a :class:`CheckpointError`
naming the refused global -- never a fallback to ``weights_only=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medseg.errors import CheckpointError
from medseg.planning.plan import Configuration, Normalization, Plan

CHECKPOINT_FILES = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
NORMALIZATION = {"ZScoreNormalization": "zscore", "CTNormalization": "ct", "NoNormalization": "none"}
NETWORKS = {"PlainConvUNet": "unet", "ResidualEncoderUNet": "resenc"}
DEFAULT_DATA_RESAMPLING = {"order": 3, "order_z": 0, "force_separate_z": None}
DEFAULT_PROB_RESAMPLING = {"order": 1, "order_z": 0, "force_separate_z": None}
ANISOTROPY_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD
# arch_kwargs this importer understands; any other key could change the network, so it is refused
KNOWN_ARCH_KWARGS = {
    "n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage",
    "n_blocks_per_stage", "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op",
    "dropout_op_kwargs", "nonlin", "nonlin_kwargs", "nonlin_first", "pool", "block", "stem_channels",
    "bottleneck_channels", "deep_supervision",
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# reading .pth files safely


def _numpy_safe_globals() -> list:
    """numpy scalars and dtypes: nnU-Net's checkpoint['logging'] holds numpy floats. They rebuild a
    number from raw bytes (``scalar(dtype, bytes)``) and run no code. Both module spellings are
    listed: numpy < 2 pickles ``numpy.core.multiarray.scalar``, numpy >= 2 ``numpy._core...``."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    dtypes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"}  # bool, ints, floats, complex
    return [
        np.dtype,
        *sorted(dtypes, key=lambda t: t.__name__),
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
    ]


def load_pth(path: str | Path):
    """Whatever a ``torch.save`` file holds, read with ``torch.load(weights_only=True)`` plus numpy scalars
    and dtypes only (nnU-Net v1/v2 and STU-Net checkpoints need those); CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file not found")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights only" not in text.lower() and "weights_only" not in text:
            raise CheckpointError(path, f"not a readable PyTorch checkpoint ({_first_line(exc)})") from None
        name = re.search(r"GLOBAL (\S+)", text)
        what = f"it pickles {name.group(1)}, which is not tensor or number data" if name else _weights_only_reason(text)
        raise CheckpointError(
            path,
            f"refused to load: {what}; medseg reads .pth files only with torch.load(weights_only=True) "
            "and never runs code from them",
        ) from None
    except Exception as exc:  # zip/storage errors, truncated files, not a torch file at all
        raise CheckpointError(path, f"not a readable PyTorch checkpoint ({_first_line(exc)})") from None
    return ck


def read_checkpoint(path: str | Path) -> dict:
    """An nnU-Net v2 ``.pth`` checkpoint (:func:`load_pth`) with a ``network_weights`` state dict."""
    path = Path(path)
    ck = load_pth(path)
    if not isinstance(ck, dict) or not isinstance(ck.get("network_weights"), dict):
        raise CheckpointError(path, "not an nnU-Net checkpoint (no 'network_weights' state dict)")
    bad = [k for k, v in ck["network_weights"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(path, f"'network_weights' entry {bad[0]!r} is not a tensor")
    return ck


def _first_line(exc: BaseException) -> str:
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "").split(". ")[0]
    return f"{type(exc).__name__}: {line[:200]}" if line else f"{type(exc).__name__}, truncated or empty file"


def _weights_only_reason(text: str) -> str:
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    detail = f" ({m.group(1).strip()[:150]})" if m else ""
    return f"its pickle holds something that is not tensor or number data{detail}"


# ----------------------------------------------------------------------------------------------
# plans.json -> medseg Plan + model kwargs


def _load_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(path, f"missing {what} (not an nnU-Net v2 results folder)")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"{what} is not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise CheckpointError(path, f"{what} is not a JSON object")
    return d


def resolve_configuration(plans: dict, name: str, source: Path) -> dict:
    """The configuration dict with ``inherits_from`` resolved (as nnU-Net's PlansManager does)."""
    configs = plans.get("configurations") or {}
    if name not in configs:
        raise CheckpointError(source, f"plans.json has no configuration '{name}' (has: {', '.join(configs)})")
    cfg = dict(configs[name])
    seen = {name}
    while "inherits_from" in cfg:
        parent = cfg.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise CheckpointError(source, f"configuration '{name}' inherits from unknown or cyclic '{parent}'")
        seen.add(parent)
        cfg = {**configs[parent], **cfg}
    return _modernise(cfg, source)


def _modernise(cfg: dict, source: Path) -> dict:
    """Plans written by nnU-Net < 2.4 (e.g. TotalSegmentator's) describe the U-Net with flat keys
    (UNet_class_name, UNet_base_num_features, ...); rebuild the ``architecture`` entry from them exactly
    as nnU-Net's ConfigurationManager does."""
    if "architecture" in cfg:
        return cfg
    try:
        cls = cfg["UNet_class_name"]
        n = len(cfg["n_conv_per_stage_encoder"])
        dim = len(cfg["patch_size"])
        blocks_key = "n_conv_per_stage" if cls == "PlainConvUNet" else "n_blocks_per_stage"
        arch = {
            "network_class_name": cls,
            "arch_kwargs": {
                "n_stages": n,
                "features_per_stage": [
                    min(cfg["UNet_base_num_features"] * 2**i, cfg["unet_max_num_features"]) for i in range(n)
                ],
                "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
                "kernel_sizes": cfg["conv_kernel_sizes"],
                "strides": cfg["pool_op_kernel_sizes"],
                blocks_key: cfg["n_conv_per_stage_encoder"],
                "n_conv_per_stage_decoder": cfg["n_conv_per_stage_decoder"],
                "conv_bias": True,
                "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
        }
    except (KeyError, TypeError) as exc:
        raise CheckpointError(
            source, f"plans.json configuration has neither 'architecture' nor the old keys ({exc})"
        ) from None
    return {**cfg, "architecture": arch}


def _per_stage(value, n: int, dim: int, what: str, source: Path) -> list:
    """nnU-Net allows a scalar for "the same in every stage/axis"."""
    if isinstance(value, (int, float)):
        value = [value] * n
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise CheckpointError(source, f"plans.json {what} needs {n} entries, got {value!r}")
    if dim:
        value = [[v] * dim if isinstance(v, (int, float)) else list(v) for v in value]
        if any(len(v) != dim for v in value):
            raise CheckpointError(source, f"plans.json {what}: every entry needs {dim} axes")
    return list(value)


def _short(name) -> str:
    return str(name or "").rsplit(".", 1)[-1]


def network_from_plans(cfg: dict, transpose, source: Path) -> tuple[str, dict]:
    """(medseg registry name, model kwargs) equivalent to the configuration's nnU-Net network."""
    arch = cfg["architecture"]
    cls = _short(arch.get("network_class_name"))
    if cls not in NETWORKS:
        raise CheckpointError(
            source,
            f"network {arch.get('network_class_name')} is not supported "
            f"(supported: {', '.join(NETWORKS)} from dynamic_network_architectures)",
        )
    kw = dict(arch.get("arch_kwargs") or {})
    unknown = sorted(set(kw) - KNOWN_ARCH_KWARGS)
    if unknown:
        raise CheckpointError(source, f"{cls} option(s) {', '.join(unknown)} not supported by the importer")
    dim = len(cfg["patch_size"])
    if dim != 3:
        raise CheckpointError(
            source,
            "only 3D configurations can be imported (nnU-Net's 2d keeps each case's slice spacing, "
            "medseg's 2d resamples it)",
        )
    n = int(kw["n_stages"])
    if _short(kw.get("conv_op")) != f"Conv{dim}d":
        raise CheckpointError(source, f"conv_op {kw.get('conv_op')} not supported (expected Conv{dim}d)")
    if _short(kw.get("norm_op")) != f"InstanceNorm{dim}d":
        raise CheckpointError(source, f"norm_op {kw.get('norm_op')} not supported (medseg builds InstanceNorm)")
    norm_kw = kw.get("norm_op_kwargs") or {}
    if not norm_kw.get("affine", False):
        raise CheckpointError(source, "norm_op_kwargs.affine false not supported (medseg's InstanceNorm is affine)")
    nonlin, nonlin_kw = _short(kw.get("nonlin")), kw.get("nonlin_kwargs") or {}
    if nonlin == "LeakyReLU":
        slope = float(nonlin_kw.get("negative_slope", 0.01))
    elif nonlin == "ReLU":
        slope = 0.0
    else:
        raise CheckpointError(source, f"nonlin {kw.get('nonlin')} not supported (LeakyReLU or ReLU)")
    if kw.get("nonlin_first"):
        raise CheckpointError(source, "nonlin_first=true not supported")
    if kw.get("pool", "conv") != "conv":
        raise CheckpointError(source, f"pool={kw['pool']!r} not supported (strided convolutions only)")
    if _short(kw.get("block", "BasicBlockD")) != "BasicBlockD":
        raise CheckpointError(source, f"block {kw['block']} not supported (BasicBlockD only)")
    features = _per_stage(kw["features_per_stage"], n, 0, "features_per_stage", source)
    if kw.get("stem_channels") not in (None, features[0]):
        raise CheckpointError(source, "stem_channels different from features_per_stage[0] not supported")
    common = {
        "spatial_dims": dim,
        "features": [int(f) for f in features],
        "strides": _per_stage(kw["strides"], n, dim, "strides", source),
        "kernel_sizes": _per_stage(kw["kernel_sizes"], n, dim, "kernel_sizes", source),
        "n_conv_per_stage_decoder": [
            int(c) for c in _per_stage(kw["n_conv_per_stage_decoder"], n - 1, 0, "n_conv_per_stage_decoder", source)
        ],
        "conv_bias": bool(kw.get("conv_bias", False)),  # dynamic_network_architectures' default
        "norm_eps": float(norm_kw.get("eps", 1e-5)),
        "negative_slope": slope,
        "transpose": None if list(transpose) == sorted(transpose) else [int(a) for a in transpose],
    }
    if cls == "PlainConvUNet":
        common["n_conv_per_stage"] = [
            int(c) for c in _per_stage(kw["n_conv_per_stage"], n, 0, "n_conv_per_stage", source)
        ]
    else:
        common["blocks_per_stage"] = [
            int(b) for b in _per_stage(kw["n_blocks_per_stage"], n, 0, "n_blocks_per_stage", source)
        ]
    return NETWORKS[cls], common


def _lowres_axis(spacing) -> int | None:
    """nnU-Net's get_lowres_axis + its 'exactly one axis' rule: the single coarsest axis, or None."""
    coarse = [i for i, s in enumerate(spacing) if s == max(spacing)]
    return coarse[0] if len(coarse) == 1 else None


def plan_from_nnunet(plans: dict, dataset: dict, configuration: str, *, mirror_axes, source: Path):
    """(Plan, model name, model kwargs, labels, notes) for one nnU-Net configuration."""
    notes: list[str] = []
    cfg = resolve_configuration(plans, configuration, source)
    if cfg.get("previous_stage"):
        raise CheckpointError(source, f"'{configuration}' is a cascade stage (needs the low-res prediction)")
    tf = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    if sorted(tf) != [0, 1, 2]:
        raise CheckpointError(source, f"plans.json transpose_forward {tf} is not a permutation of 0, 1, 2")
    model, kwargs = network_from_plans(cfg, tf, source)

    def native(values):  # nnU-Net's transposed axis j is the image's axis tf[j]
        out = [None] * 3
        for j, a in enumerate(tf):
            out[a] = values[j]
        return out

    labels_raw = dataset.get("labels") or {}
    if any(isinstance(v, (list, tuple)) for v in labels_raw.values()):
        raise CheckpointError(source, "region-based models (labels with lists of values) are not supported")
    labels = {str(k): int(v) for k, v in labels_raw.items() if str(k) != "ignore"}
    if "ignore" in labels_raw:
        notes.append(f"label 'ignore' ({labels_raw['ignore']}) dropped: nnU-Net never predicts it")
    if sorted(labels.values()) != list(range(len(labels))) or len(labels) < 2:
        raise CheckpointError(source, f"dataset.json labels must be 0..K-1 with background 0, got {labels_raw}")
    channels = dataset.get("channel_names") or dataset.get("modality") or {}
    channel_names = tuple(str(channels[k]) for k in sorted(channels, key=int))
    if not channel_names:
        raise CheckpointError(source, "dataset.json has no channel_names")

    schemes = cfg["normalization_schemes"]
    use_mask = cfg.get("use_mask_for_norm") or [False] * len(schemes)
    props = plans.get("foreground_intensity_properties_per_channel") or {}
    norms = []
    for c, scheme in enumerate(schemes):
        name = NORMALIZATION.get(_short(scheme))
        if name is None:
            raise CheckpointError(
                source, f"normalization {scheme} not supported (supported: {', '.join(NORMALIZATION)})"
            )
        if name == "ct":
            p = props.get(str(c)) or props.get(c)
            if not p:
                raise CheckpointError(source, f"CTNormalization of channel {c} needs foreground intensity properties")
            norms.append(
                Normalization("ct", False, float(p["percentile_00_5"]), float(p["percentile_99_5"]),
                              float(p["mean"]), float(p["std"]))
            )  # fmt: skip
        else:
            norms.append(Normalization(name, bool(use_mask[c]) and name == "zscore"))
    if len(norms) != len(channel_names):
        raise CheckpointError(source, f"{len(norms)} normalization schemes for {len(channel_names)} channels")

    for key, default in (
        ("resampling_fn_data_kwargs", DEFAULT_DATA_RESAMPLING),
        ("resampling_fn_probabilities_kwargs", DEFAULT_PROB_RESAMPLING),
    ):
        got = {k: (cfg.get(key) or {}).get(k) for k in default}
        if got != default:
            notes.append(f"{key} {got} differs from nnU-Net's default {default}; medseg resamples with the default")
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if cfg.get(key, "resample_data_or_seg_to_shape") != "resample_data_or_seg_to_shape":
            notes.append(f"{key} {cfg[key]} replaced by medseg's scipy resampling (nnU-Net's default)")
    reader = plans.get("image_reader_writer", "SimpleITKIO")
    if reader not in ("SimpleITKIO", "NibabelIO"):
        notes.append(
            f"nnU-Net read images with {reader}; medseg reads them as stored (SimpleITK), so inputs must "
            "already be in the orientation that reader produced (e.g. RAS for NibabelIOWithReorient)"
        )

    spacing = [float(s) for s in native(cfg["spacing"])]
    sep_axis = _lowres_axis(spacing) if max(spacing) / min(spacing) > ANISOTROPY_THRESHOLD else None
    mirror = None if mirror_axes is None else tuple(sorted(tf[int(a)] for a in mirror_axes))
    conf = Configuration(
        name=configuration,
        spacing=tuple(spacing),
        median_shape=tuple(int(round(float(s))) for s in native(cfg.get("median_image_size_in_voxels", [0, 0, 0]))),
        patch_size=tuple(int(p) for p in native(cfg["patch_size"])),
        batch_size=int(cfg.get("batch_size", 2)),
        model=model,
        model_kwargs=kwargs,
        separate_z=sep_axis is not None,
        anisotropic_axis=sep_axis,
        mirror_axes=mirror if mirror is not None else (),
        numerics="nnunet",
    )
    plan = Plan(
        dataset_name=str(plans.get("dataset_name", dataset.get("name", "nnunet"))),
        channel_names=channel_names,
        labels=labels,
        normalization=tuple(norms),
        configurations={configuration: conf},
        budget="nnunet",
        file_ending=str(dataset.get("file_ending", ".nii.gz")),
    )
    return plan, model, kwargs, labels, notes


# ----------------------------------------------------------------------------------------------
# state dicts

_PLAIN_RULES = [
    (re.compile(r"^encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.conv\.(weight|bias)$"), r"encoder.\1.\2.0.\3"),
    (re.compile(r"^encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.norm\.(weight|bias)$"), r"encoder.\1.\2.1.\3"),
    (re.compile(r"^decoder\.stages\.(\d+)\.convs\.(\d+)\.conv\.(weight|bias)$"), r"decoder.\1.\2.0.\3"),
    (re.compile(r"^decoder\.stages\.(\d+)\.convs\.(\d+)\.norm\.(weight|bias)$"), r"decoder.\1.\2.1.\3"),
    (re.compile(r"^decoder\.transpconvs\.(\d+)\.(weight|bias)$"), r"upsample.\1.\2"),
    (re.compile(r"^decoder\.seg_layers\.(\d+)\.(weight|bias)$"), r"heads.\1.\2"),
]


def _is_alias(key: str) -> bool:
    """nnU-Net registers every conv/norm twice (``all_modules.N``) and the encoder again under the decoder."""
    return key.startswith("decoder.encoder.") or ".all_modules." in key


def convert_state_dict(weights: dict, model: str, source: Path, trainer: str = "?") -> dict[str, torch.Tensor]:
    """nnU-Net ``network_weights`` -> medseg state dict (aliases dropped, PlainConvUNet keys renamed)."""
    out = {}
    for key, tensor in weights.items():
        if _is_alias(key):
            continue
        if model == "unet":
            for pattern, repl in _PLAIN_RULES:
                if pattern.match(key):
                    key = pattern.sub(repl, key)
                    break
            else:
                raise CheckpointError(
                    source,
                    f"weight '{key}' is not a PlainConvUNet weight: trainer {trainer} builds its own network, "
                    "which the importer does not support",
                )
        out[key] = tensor.detach().to(torch.float32).contiguous()
    return out


def _check_weights(spec, state: dict, source: Path, trainer: str) -> None:
    from medseg.inference.predictor import _state_dict_mismatch

    net = spec.build(deep_supervision=False)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            source,
            f"weights do not fit the {spec.model} built from plans.json ({_state_dict_mismatch(exc)}); "
            f"does trainer {trainer} build its own network?",
        ) from None


# ----------------------------------------------------------------------------------------------
# the import


@dataclass
class ImportResult:
    output: Path
    model: str
    configuration: str
    trainer: str
    plans_name: str
    folds: list[str]
    checkpoint: str
    mirror_axes: tuple[int, ...]
    notes: list[str] = field(default_factory=list)


def find_results_folder(folder: str | Path) -> Path:
    """The folder holding plans.json: ``folder`` itself, or its only ``TRAINER__PLANS__CONFIG`` subfolder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, "nnU-Net results folder not found")
    if (folder / "plans.json").is_file():
        return folder
    found = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "plans.json").is_file())
    if len(found) == 1:
        return found[0]
    if found:
        raise CheckpointError(
            folder, f"holds {len(found)} nnU-Net results folders ({', '.join(p.name for p in found)}); name one"
        )
    raise CheckpointError(
        folder / "plans.json",
        "missing plans.json: not an nnU-Net v2 results folder "
        "(expected TRAINER__PLANS__CONFIGURATION/ with dataset.json, plans.json and fold_K/)",
    )


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_nnunet(
    results_folder: str | Path,
    output: str | Path,
    *,
    checkpoint: str = "final",
    folds=None,
    overwrite: bool = False,
) -> ImportResult:
    """Convert an nnU-Net v2 results folder into the medseg model folder ``output``.

    Everything is read and checked before anything is written; the model folder appears complete or
    not at all (written beside ``output`` and renamed into place).
    """
    from medseg import __version__
    from medseg.io.checkpoint import ModelSpec, save_spec, save_weights
    from medseg.io.jsonio import write_json

    if checkpoint not in CHECKPOINT_FILES:
        raise CheckpointError(None, f"--checkpoint must be one of {', '.join(CHECKPOINT_FILES)}, got {checkpoint!r}")
    src = find_results_folder(results_folder)
    output = Path(output)
    if output.exists() and not overwrite:
        raise CheckpointError(output, "already exists (use --overwrite to replace it)")
    if output.resolve() == src.resolve() or src.resolve() in output.resolve().parents:
        raise CheckpointError(output, "must not be inside the nnU-Net results folder")
    plans = _load_json(src / "plans.json", "plans.json")
    dataset = _load_json(src / "dataset.json", "dataset.json")

    ck_name = CHECKPOINT_FILES[checkpoint]
    present = sorted(p.name[len("fold_") :] for p in src.glob("fold_*") if (p / ck_name).is_file())
    wanted = [str(f) for f in folds] if folds else present
    if not wanted:
        raise CheckpointError(src, f"no fold_K/{ck_name} found")
    missing = [f for f in wanted if f not in present]
    if missing:
        raise CheckpointError(src / f"fold_{missing[0]}" / ck_name, "not found")

    # keep only the weights and a few fields of each checkpoint (not optimizer state and logs)
    weights, meta = {}, {}
    for f in wanted:
        ck = read_checkpoint(src / f"fold_{f}" / ck_name)
        weights[f] = ck.pop("network_weights")
        meta[f] = {k: ck.get(k) for k in ("init_args", "trainer_name", "inference_allowed_mirroring_axes")}
        meta[f]["current_epoch"] = ck.get("current_epoch")
        del ck
    first = meta[wanted[0]]
    parts = src.name.split("__")
    init = first.get("init_args") if isinstance(first.get("init_args"), dict) else {}
    configuration = str(init.get("configuration") or (parts[2] if len(parts) == 3 else ""))
    if not configuration:
        raise CheckpointError(src, "cannot tell the configuration (folder is not TRAINER__PLANS__CONFIG)")
    trainer = str(first.get("trainer_name") or (parts[0] if len(parts) == 3 else "?"))
    plans_name = str(plans.get("plans_name") or (parts[1] if len(parts) == 3 else "?"))
    axes = [m["inference_allowed_mirroring_axes"] for m in meta.values()]
    mirror = None if any(a is None for a in axes) else sorted(set.intersection(*[{int(i) for i in a} for a in axes]))

    try:
        plan, model, kwargs, labels, notes = plan_from_nnunet(
            plans, dataset, configuration, mirror_axes=mirror, source=src / "plans.json"
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:  # a key missing or of the wrong type
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(src / "plans.json", f"unexpected content ({detail[:200]})") from None
    spec = ModelSpec(
        model=model,
        model_kwargs=kwargs,
        in_channels=len(plan.channel_names),
        num_classes=plan.num_classes,
        labels=labels,
        plan=plan,
        configuration=configuration,
        description=(
            f"imported from nnU-Net v2: {src.name} ({plans.get('dataset_name', '?')}), "
            f"{ck_name}, folds {', '.join(wanted)}"
        ),
    )
    states = {}
    for f in wanted:
        source = src / f"fold_{f}" / ck_name
        states[f] = convert_state_dict(weights.pop(f), model, source, trainer)
        _check_weights(spec, states[f], source, trainer)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.importing-", dir=output.parent))
    try:
        save_spec(tmp, spec)
        for f, state in states.items():
            source = src / f"fold_{f}" / ck_name
            epoch = meta[f]["current_epoch"]
            save_weights(
                tmp / f"fold_{f}",
                state,
                info={
                    "fold": f,
                    "epoch": int(epoch) if isinstance(epoch, int) else None,
                    "source": {"framework": "nnU-Net v2", "file": str(source), "sha256": _file_sha256(source)},
                },
            )
        (tmp / "nnunet").mkdir()
        shutil.copyfile(src / "plans.json", tmp / "nnunet" / "plans.json")
        shutil.copyfile(src / "dataset.json", tmp / "nnunet" / "dataset.json")
        write_json(
            tmp / "nnunet" / "import.json",
            {
                "source": str(src.resolve()),
                "trainer": trainer,
                "plans_name": plans_name,
                "configuration": configuration,
                "checkpoint": ck_name,
                "folds": wanted,
                "mirror_axes_nnunet": mirror,
                "transpose_forward": plans.get("transpose_forward", [0, 1, 2]),
                "notes": notes,
                "medseg_version": __version__,
            },
        )
        if output.exists():  # --overwrite: swap only once the new folder is complete
            old = output.with_name(f".{output.name}.replaced")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportResult(
        output=output,
        model=model,
        configuration=configuration,
        trainer=trainer,
        plans_name=plans_name,
        folds=wanted,
        checkpoint=ck_name,
        mirror_axes=plan.configurations[configuration].mirror_axes,
        notes=notes,
    )
