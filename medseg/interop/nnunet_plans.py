"""nnU-Net v2 ``plans.json`` + ``dataset.json`` -> medseg :class:`~medseg.planning.plan.Plan` and model kwargs.

Used by :mod:`medseg.interop.nnunet` (the importer); see docs/nnunet_import.md for what is converted.
"""

from __future__ import annotations

from pathlib import Path

from medseg.errors import CheckpointError
from medseg.io.jsonio import read_json_object
from medseg.planning.plan import Configuration, Normalization, Plan

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
# plans.json -> medseg Plan + model kwargs


def _load_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(path, f"missing {what} (not an nnU-Net v2 results folder)")
    return read_json_object(path, CheckpointError, what)


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
