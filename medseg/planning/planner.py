"""nnU-Net's planning rules as pure functions: spacing, topology, patch, batch, normalisation.

Budgets: ``gpu`` sizes the network like nnU-Net v2 for an 8 GiB GPU (base 32 features, AMP);
``cpu`` keeps nnU-Net's patch and topology rules but halves the widths (base 16) and caps the
batch so one training iteration stays around a second on a 2-core machine.

Presets (``make_plan(..., presets=("resenc_m", "resenc_l"))``, ``medseg plan --preset``) are registry
models that declare a planner hook; each adds a ``3d_fullres_<preset>`` configuration planned like
nnU-Net's nnUNetPlannerResEncM/L: the same patch and topology rules, but the patch is shrunk until the
model's own memory estimate fits the model's own GPU budget, whatever ``budget`` says. What the network
looks like for a topology and what it costs is the model's business (``medseg.models.registry``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medseg.io.dataset import DatasetInfo
from medseg.planning.fingerprint import Fingerprint
from medseg.planning.plan import Configuration, Normalization, Plan
from medseg.preprocessing.orientation import CANONICAL
from medseg.preprocessing.resampling import ANISOTROPY_THRESHOLD

MIN_FEATURE_MAP = 4
MAX_BATCH_FRACTION = 0.05  # a batch never covers more than 5 % of the dataset's voxels


@dataclass(frozen=True)
class Budget:
    name: str
    memory_gb: float  # activation memory available for one training step
    base_features: int
    max_features_3d: int
    max_features_2d: int
    bytes_per_activation: float  # fp16 (AMP) on GPU, fp32 on CPU, x stored tensors per conv
    max_batch_3d: int
    max_batch_2d: int


BUDGETS = {
    "gpu": Budget("gpu", 8.0, 32, 320, 512, 2 * 6, 64, 512),
    "cpu": Budget("cpu", 3.0, 16, 256, 256, 4 * 6, 2, 32),
}


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Median spacing; for strongly anisotropic data the coarse axis takes the 10th percentile.

    nnU-Net's rule: if one axis is > 3x coarser than the others *and* has few voxels, using the
    median would make the network see ever thinner slabs, so a finer target is taken for it.
    """
    target = np.median(spacings, axis=0)
    shape = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    if target[worst] > ANISOTROPY_THRESHOLD * max(target[others]) and shape[worst] * ANISOTROPY_THRESHOLD < min(
        shape[others]
    ):
        t = np.percentile(spacings[:, worst], 10)
        target[worst] = max(t, max(target[others]) * 1.00001)
    return target


def pool_and_conv_props(spacing, patch_size, max_pools: int = 5):
    """Downsampling strides and conv kernels per stage, and the patch padded to fit them.

    An axis is pooled while its feature map stays >= 2*4 voxels and its spacing is within 2x
    of the finest; conv kernels are 1 along an axis until its spacing is within 2x of the
    finest (so thick slices get in-plane convolutions first).
    """
    dim = len(spacing)
    sp, size = list(map(float, spacing)), list(map(float, patch_size))
    strides, kernels = [[1] * dim], []
    kernel = [1] * dim
    pools = [0] * dim
    while True:
        valid = [i for i in range(dim) if size[i] >= 2 * MIN_FEATURE_MAP and pools[i] < max_pools]
        if not valid:
            break
        finest = min(sp[i] for i in valid)
        valid = [i for i in valid if sp[i] / finest < 2]
        if len(valid) == 1 and size[valid[0]] < 3 * MIN_FEATURE_MAP:
            break
        if not valid:
            break
        finest_all = min(sp)
        kernel = [3 if kernel[d] == 3 or sp[d] / finest_all < 2 else 1 for d in range(dim)]
        stride = [2 if i in valid else 1 for i in range(dim)]
        for i in valid:
            pools[i] += 1
            sp[i] *= 2
            size[i] = np.ceil(size[i] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dim)  # bottleneck convs
    divisor = [2**p for p in pools]
    padded = [int(np.ceil(s / d) * d) for s, d in zip(patch_size, divisor)]
    return strides, kernels, padded, divisor


def features_per_stage(n_stages: int, budget: Budget, dim: int) -> list[int]:
    cap = budget.max_features_3d if dim == 3 else budget.max_features_2d
    return [min(budget.base_features * 2**i, cap) for i in range(n_stages)]


def estimate_memory_gb(patch_size, strides, features, batch_size: int, budget: Budget, n_conv: int = 2) -> float:
    """Activation memory of one training step: sum of feature-map elements in encoder+decoder."""
    size = np.array(patch_size, dtype=float)
    elems = 0.0
    for stride, feat in zip(strides, features):
        size = np.ceil(size / np.array(stride))
        elems += n_conv * feat * np.prod(size) * 2  # encoder stage + matching decoder stage
    return float(elems * batch_size * budget.bytes_per_activation / 1024**3)


def initial_patch(spacing, median_shape) -> np.ndarray:
    """Isotropic in mm, 256^3 (3d) / 2048^2 (2d) voxels, clipped to the median shape."""
    dim = len(spacing)
    ref = 256**3 if dim == 3 else 2048**2
    inv = 1.0 / np.asarray(spacing, float)
    patch = np.round(inv * (ref / np.prod(inv)) ** (1 / dim))
    return np.minimum(patch, median_shape).astype(int)


def fit_patch(spacing, median_shape, cost, limit: float):
    """Shrink the initial patch until ``cost(padded_patch, strides, kernels) <= limit``.

    Each step takes one divisor step off the axis that is largest relative to the median shape, and
    the topology is re-planned for the new patch. Returns (strides, kernels, padded, divisor, cost).
    """
    dim = len(spacing)
    patch = initial_patch(spacing, median_shape)
    while True:
        strides, kernels, padded, divisor = pool_and_conv_props(spacing, patch)
        value = cost(padded, strides, kernels)
        if value <= limit or np.prod(patch) <= np.prod([2 * MIN_FEATURE_MAP] * dim):
            return strides, kernels, padded, divisor, value
        ratio = np.array(padded) / median_shape
        ratio[patch <= 2 * MIN_FEATURE_MAP] = -np.inf  # axes already at the minimum cannot shrink
        if not np.isfinite(ratio).any():
            return strides, kernels, padded, divisor, value
        axis = int(np.argmax(ratio))
        patch[axis] = max(int(patch[axis]) - max(divisor[axis], 1), 2 * MIN_FEATURE_MAP)


def plan_configuration(
    name: str,
    spacing,
    median_shape,
    num_cases: int,
    num_channels: int,
    budget: Budget,
    *,
    anisotropic_axis=None,
    dataset_voxels: float | None = None,
) -> Configuration:
    """Fit patch size, topology and batch size for one configuration to the budget.

    ``dataset_voxels``: voxels in the whole (resampled) dataset, for the 5 % batch cap; defaults to
    ``num_cases * prod(median_shape)``. A 2d configuration must pass the 3d count (nnU-Net does),
    otherwise each case would count as a single slice.
    """
    spacing = np.asarray(spacing, float)
    median_shape = np.asarray(median_shape, float)
    dim = len(spacing)
    ref_batch = 2 if dim == 3 else 12

    def memory(padded, strides, _kernels):
        return estimate_memory_gb(padded, strides, features_per_stage(len(strides), budget, dim), ref_batch, budget)

    strides, kernels, padded, _, mem = fit_patch(spacing, median_shape, memory, budget.memory_gb)
    feats = features_per_stage(len(strides), budget, dim)
    # batch: as many as the budget allows, but at most 5 % of the dataset's voxels
    batch = int(np.floor(ref_batch * budget.memory_gb / max(mem, 1e-9)))
    if dataset_voxels is None:
        dataset_voxels = num_cases * float(np.prod(median_shape))
    max_by_data = int(np.floor(MAX_BATCH_FRACTION * dataset_voxels / np.prod(padded)))
    cap = budget.max_batch_3d if dim == 3 else budget.max_batch_2d
    batch = int(max(2, min(batch, max_by_data, cap)))
    mem = estimate_memory_gb(padded, strides, feats, batch, budget)
    kwargs = {
        "features": feats,
        "strides": strides,
        "kernel_sizes": kernels,
        "n_conv_per_stage": 2,
        "spatial_dims": dim,
    }
    return Configuration(
        name=name,
        spacing=tuple(float(s) for s in spacing),
        median_shape=tuple(int(s) for s in median_shape),
        patch_size=tuple(int(p) for p in padded),
        batch_size=batch,
        model="unet",
        model_kwargs=kwargs,
        separate_z=anisotropic_axis is not None,
        anisotropic_axis=anisotropic_axis,
        estimated_memory_gb=round(mem, 3),
    )


def plan_model_configuration(
    name: str,
    model: str,
    spacing,
    median_shape,
    num_channels: int,
    num_classes: int,
    *,
    dataset_voxels: float,
    anisotropic_axis=None,
) -> Configuration:
    """nnU-Net's ResEncUNetPlanner rules for registry model ``model`` (one with a planner hook, e.g.
    ``resenc_m`` | ``resenc_l``).

    The cost of a patch is the model's ``memory_estimate`` (GiB per training sample) at the reference
    batch (2 in 3d, 12 in 2d), the limit the hook's ``memory_gb``; the batch then fills the budget,
    capped only at the whole dataset (nnU-Net's ``max_dataset_covered = 1`` for these presets), never below 2.
    """
    from medseg.models.registry import get_entry, plannable_models

    entry = get_entry(model)
    if entry.planner is None:
        raise ValueError(f"model {model!r} has no planner hook; plannable: {', '.join(plannable_models())}")
    hook = entry.planner
    spacing = np.asarray(spacing, float)
    median_shape = np.asarray(median_shape, float)
    dim = len(spacing)
    ref_batch = 2 if dim == 3 else 12

    def arch(strides, kernels) -> dict:
        return {**hook.model_kwargs(strides, kernels, dim), "spatial_dims": dim}

    cache: dict[str, float] = {}

    def per_sample(padded, strides, kernels) -> float:
        key = f"{list(padded)}_{strides}_{kernels}"
        if key not in cache:
            cache[key] = entry.memory_estimate(
                padded, arch(strides, kernels), in_channels=num_channels, num_classes=num_classes
            )
        return cache[key]

    def cost(padded, strides, kernels) -> float:
        return per_sample(padded, strides, kernels) * ref_batch

    strides, kernels, padded, _, _ = fit_patch(spacing, median_shape, cost, hook.memory_gb)
    sample_gb = per_sample(padded, strides, kernels)
    batch = round(hook.memory_gb / sample_gb)
    batch = int(max(min(batch, round(dataset_voxels / np.prod(padded, dtype=np.float64))), 2))
    return Configuration(
        name=name,
        spacing=tuple(float(s) for s in spacing),
        median_shape=tuple(int(s) for s in median_shape),
        patch_size=tuple(int(v) for v in padded),
        batch_size=batch,
        model=model,
        model_kwargs=arch(strides, kernels),
        separate_z=anisotropic_axis is not None,
        anisotropic_axis=anisotropic_axis,
        estimated_memory_gb=round(sample_gb * batch, 3),
    )


def plan_normalization(info: DatasetInfo, fp: Fingerprint) -> tuple[Normalization, ...]:
    """CT channels: dataset-wide 0.5/99.5 percentile clip + z-score. Others: per-case z-score,
    masked to the non-zero region when cropping removed at least a quarter of the volume."""
    out = []
    use_mask = fp.crop_fraction < 0.75
    for c, name in enumerate(info.channel_names):
        if name.strip().lower() == "ct":
            st = fp.intensity[c]
            out.append(Normalization("ct", False, st["percentile_00_5"], st["percentile_99_5"], st["mean"], st["std"]))
        elif name.strip().lower() in ("noNorm".lower(), "none"):
            out.append(Normalization("none"))
        else:
            out.append(Normalization("zscore", use_mask))
    return tuple(out)


def normalization_from_spec(spec: str, channel: int, num_channels: int, fp: Fingerprint) -> Normalization:
    """A user's choice for one channel, by scheme name: ``zscore``, ``zscore_masked``, ``ct``
    (statistics from the fingerprint), ``range:LOW,HIGH`` (fixed window -> [0, 1]), ``imagenet``,
    ``none``, or any other registered scheme without parameters."""
    from medseg.preprocessing.normalization import NORMALIZATIONS, imagenet_normalization

    name, _, args = spec.partition(":")
    if name == "zscore_masked":
        return Normalization("zscore", True)
    if name == "ct":
        st = fp.intensity[channel]
        return Normalization("ct", False, st["percentile_00_5"], st["percentile_99_5"], st["mean"], st["std"])
    if name == "range":
        try:
            low, high = (float(v) for v in args.split(","))
        except ValueError:
            raise ValueError(f"normalisation '{spec}': expected range:LOW,HIGH, e.g. range:0,10") from None
        if not high > low:
            raise ValueError(f"normalisation '{spec}': LOW must be below HIGH")
        return Normalization("range", clip_low=low, clip_high=high)
    if name == "imagenet":
        return imagenet_normalization(num_channels)[channel]
    NORMALIZATIONS.entry(name)  # unknown: one error listing the registered schemes
    return Normalization(name)


def make_plan(info: DatasetInfo, fp: Fingerprint, budget: str = "cpu", presets=()) -> Plan:
    """``presets``: registry models with a planner hook (``resenc_m``, ``resenc_l``) to add as
    ``3d_fullres_<preset>``."""
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose from {', '.join(BUDGETS)}")
    if presets:
        from medseg.models.registry import plannable_models

        known = plannable_models()
        unknown = [p for p in presets if p not in known]
        if unknown:
            raise ValueError(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    b = BUDGETS[budget]
    if is_2d_dataset(fp):
        return make_plan_2d(info, fp, b, presets)
    spacings = np.array(fp.spacings, float)
    shapes = np.array(fp.shapes_after_crop, float)
    tsp = target_spacing(spacings, shapes)
    resampled = np.array([s * sp / tsp for s, sp in zip(shapes, spacings)])
    median = np.median(resampled, axis=0)
    aniso = None
    from medseg.preprocessing.resampling import anisotropic_axis

    aniso = anisotropic_axis(tsp)
    configs = {}
    full = plan_configuration(
        "3d_fullres", tsp, median, fp.num_cases, len(info.channel_names), b, anisotropic_axis=aniso
    )
    configs["3d_fullres"] = full
    labels = dict(info.labels)
    for preset in dict.fromkeys(presets):  # same spacing as 3d_fullres: it shares its preprocessed data
        configs[f"3d_fullres_{preset}"] = plan_model_configuration(
            f"3d_fullres_{preset}",
            preset,
            tsp,
            median,
            len(info.channel_names),
            max(labels.values()) + 1,
            dataset_voxels=fp.num_cases * float(np.prod(median)),
            anisotropic_axis=aniso,
        )
    # 2d: slices along the first (z) axis, in-plane spacing/shape
    configs["2d"] = plan_configuration(
        "2d",
        tsp[1:],
        median[1:],
        fp.num_cases,
        len(info.channel_names),
        b,
        dataset_voxels=fp.num_cases * float(np.prod(median)),
    )
    configs["2d"] = Configuration(**{**configs["2d"].__dict__, "spacing": tuple(float(s) for s in tsp)})
    # 3d_lowres: only when the full-resolution patch covers less than a quarter of the median case
    if np.prod(full.patch_size) / np.prod(median) < 0.25:
        factor, low = 1.0, full
        while np.prod(low.patch_size) / np.prod(median / factor) < 0.25 and factor < 8:
            factor *= 1.03
            sp_low = tsp * factor
            low = plan_configuration(
                "3d_lowres",
                sp_low,
                median / factor,
                fp.num_cases,
                len(info.channel_names),
                b,
                anisotropic_axis=anisotropic_axis(sp_low),
            )
        configs["3d_lowres"] = low
    return Plan(
        dataset_name=info.name,
        channel_names=info.channel_names,
        labels=dict(info.labels),
        normalization=plan_normalization(info, fp),
        configurations=configs,
        budget=budget,
        file_ending=info.file_ending,
        orientation=CANONICAL,  # every case in RAS voxel order, as TotalSegmentator; the fingerprint is too
    )


def is_2d_dataset(fp: Fingerprint) -> bool:
    """Every case a single slice (z = 1): PNG/TIFF images, or volumes of one slice."""
    return bool(fp.shapes_after_crop) and all(int(s[0]) == 1 for s in fp.shapes_after_crop)


def make_plan_2d(info: DatasetInfo, fp: Fingerprint, b: Budget, presets=()) -> Plan:
    """A plan for 2D images: only a ``2d`` configuration, its spacing and patch (y, x) (2 elements),
    planned with the same rules as the ``2d`` configuration of a 3D dataset (nnU-Net's 2D planner:
    2048^2 initial patch clipped to the median shape, shrunk to the budget, reference batch 12).
    Preprocessing resamples only y and x; the voxel order stays as stored (no reorientation)."""
    from medseg.errors import PlanError

    if presets:
        raise PlanError(None, f"ResEnc presets ({', '.join(presets)}) are 3D configurations; this dataset is 2D")
    spacings = np.array(fp.spacings, float)[:, 1:]
    shapes = np.array(fp.shapes_after_crop, float)[:, 1:]
    tsp = target_spacing(spacings, shapes)
    median = np.median(np.array([s * sp / tsp for s, sp in zip(shapes, spacings)]), axis=0)
    config = plan_configuration(
        "2d",
        tsp,
        median,
        fp.num_cases,
        len(info.channel_names),
        b,
        dataset_voxels=fp.num_cases * float(np.prod(median)),
    )
    return Plan(
        dataset_name=info.name,
        channel_names=info.channel_names,
        labels=dict(info.labels),
        normalization=plan_normalization(info, fp),
        configurations={"2d": config},
        budget=b.name,
        file_ending=info.file_ending,
    )
