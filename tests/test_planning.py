"""Unit tests for nnU-Net's planning rules (planner.py) and the Plan document (plan.py)."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest

from medseg.errors import PlanError
from medseg.io.dataset import DatasetInfo
from medseg.planning.fingerprint import Fingerprint
from medseg.planning.plan import SCHEMA_VERSION, Configuration, Normalization, Plan
from medseg.planning.planner import (
    BUDGETS,
    MIN_FEATURE_MAP,
    estimate_memory_gb,
    features_per_stage,
    make_plan,
    plan_configuration,
    plan_normalization,
    pool_and_conv_props,
    target_spacing,
)

CT_STATS = {
    "mean": 40.0,
    "std": 100.0,
    "percentile_00_5": -950.0,
    "percentile_99_5": 1200.0,
    "min": -1024.0,
    "max": 3000.0,
}
MR_STATS = {"mean": 300.0, "std": 80.0, "percentile_00_5": 10.0, "percentile_99_5": 900.0, "min": 0.0, "max": 1500.0}


def fingerprint(spacings, shapes, *, crop_fraction=1.0, intensity=(CT_STATS,)) -> Fingerprint:
    return Fingerprint(
        dataset_name="toy",
        spacings=[[float(v) for v in s] for s in spacings],
        shapes_after_crop=[[int(v) for v in s] for s in shapes],
        crop_fraction=crop_fraction,
        intensity=list(intensity),
        class_fraction={"0": 0.9, "1": 0.1},
        num_cases=len(spacings),
    )


def info(channels=("CT",), labels=None) -> DatasetInfo:
    return DatasetInfo("toy", tuple(channels), labels or {"background": 0, "organ": 1, "tumour": 2}, ".nii.gz")


@pytest.fixture
def no_hang():
    """Fail (instead of hanging the suite) if the code under test loops forever."""

    def handler(*_):
        raise TimeoutError("planner did not terminate")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- target spacing
def test_target_spacing_is_median():
    sp = np.array([[1.0, 0.7, 0.7], [1.2, 0.8, 0.9], [0.9, 1.0, 0.8], [1.1, 0.6, 1.0]])
    shapes = np.array([[100, 120, 120]] * 4, float)
    np.testing.assert_allclose(target_spacing(sp, shapes), np.median(sp, axis=0))


def test_target_spacing_anisotropic_takes_10th_percentile():
    z = np.array([5.0] * 8 + [2.5, 3.0])
    sp = np.stack([z, np.full(10, 0.8), np.full(10, 0.8)], 1)
    few_slices = np.array([[40, 400, 400]] * 10, float)
    t = target_spacing(sp, few_slices)
    assert t[0] == pytest.approx(np.percentile(z, 10))
    assert t[0] < 5.0
    np.testing.assert_allclose(t[1:], [0.8, 0.8])
    # many slices along the thick axis: the rule does not fire, median stays
    many_slices = np.array([[300, 400, 400]] * 10, float)
    assert target_spacing(sp, many_slices)[0] == pytest.approx(5.0)


def test_target_spacing_anisotropic_never_finer_than_inplane():
    z = np.array([5.0] * 8 + [0.5, 0.5])  # 10th percentile 0.5 < in-plane 0.8
    sp = np.stack([z, np.full(10, 0.8), np.full(10, 0.8)], 1)
    t = target_spacing(sp, np.array([[40, 400, 400]] * 10, float))
    assert 0.8 < t[0] < 0.801


# ----------------------------------------------------------------------------- topology
def test_pool_and_conv_props_hippocampus_matches_nnunet():
    strides, kernels, padded, divisor = pool_and_conv_props((1.0, 1.0, 1.0), (36, 50, 35))
    assert padded == [40, 56, 40]
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert kernels == [[3, 3, 3]] * 4
    assert divisor == [8, 8, 8]


def test_pool_and_conv_props_anisotropic_pools_z_later():
    strides, kernels, padded, divisor = pool_and_conv_props((3.6, 0.8, 0.8), (40, 160, 160))
    assert kernels[0] == [1, 3, 3] and kernels[1] == [1, 3, 3]
    assert strides[1] == [1, 2, 2] and strides[2] == [1, 2, 2]
    assert strides[3] == [2, 2, 2]
    assert all(k == [3, 3, 3] for k in kernels[2:])
    assert len(kernels) == len(strides)
    # every padded axis is divisible by the product of its strides
    for axis in range(3):
        assert divisor[axis] == int(np.prod([s[axis] for s in strides]))
        assert padded[axis] % divisor[axis] == 0


def test_pool_and_conv_props_bottleneck_not_below_min_feature_map():
    for spacing, patch in [((1, 1, 1), (128, 128, 128)), ((2.5, 0.7, 0.7), (48, 192, 160)), ((1, 1), (512, 384))]:
        strides, kernels, padded, divisor = pool_and_conv_props(spacing, patch)
        bottleneck = np.array(padded) / np.array(divisor)
        assert bottleneck.min() >= MIN_FEATURE_MAP
        assert all(len(s) == len(spacing) for s in strides)
        assert all(p >= q for p, q in zip(padded, patch))


def test_features_capped():
    f = features_per_stage(7, BUDGETS["gpu"], 3)
    assert f == [32, 64, 128, 256, 320, 320, 320]
    assert features_per_stage(3, BUDGETS["cpu"], 2) == [16, 32, 64]


def test_estimate_memory_scales_with_batch_and_patch():
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    feats = [16, 32, 64]
    m1 = estimate_memory_gb((32, 32, 32), strides, feats, 2, BUDGETS["cpu"])
    assert estimate_memory_gb((32, 32, 32), strides, feats, 4, BUDGETS["cpu"]) == pytest.approx(2 * m1)
    assert estimate_memory_gb((64, 32, 32), strides, feats, 2, BUDGETS["cpu"]) == pytest.approx(2 * m1)


# ----------------------------------------------------------------------------- configurations
@pytest.mark.parametrize("budget", ["cpu", "gpu"])
@pytest.mark.parametrize(
    "spacing,median",
    [
        ((1, 1, 1), (36, 50, 35)),
        ((1, 1, 1), (300, 300, 300)),
        ((3.0, 0.8, 0.8), (60, 512, 512)),
        ((0.7, 0.7, 0.7), (512, 512, 700)),
    ],
)
def test_plan_configuration_respects_budget(no_hang, budget, spacing, median):
    b = BUDGETS[budget]
    cfg = plan_configuration("3d_fullres", spacing, median, 100, 1, b)
    assert cfg.estimated_memory_gb <= b.memory_gb
    assert 2 <= cfg.batch_size <= b.max_batch_3d
    strides = cfg.model_kwargs["strides"]
    div = np.prod(np.array(strides), axis=0)
    assert all(p % d == 0 for p, d in zip(cfg.patch_size, div))
    # patch never much larger than the median case (only padding to the divisor)
    assert all(p < m + d for p, m, d in zip(cfg.patch_size, median, div))
    assert len(cfg.model_kwargs["features"]) == len(strides) == len(cfg.model_kwargs["kernel_sizes"])
    assert cfg.spatial_dims == 3


@pytest.mark.parametrize("spacing,median", [((1.0, 0.5, 0.5), (8, 1024, 1024)), ((1, 1, 1), (5, 2048, 2048))])
def test_plan_configuration_terminates_when_an_axis_is_at_its_minimum(no_hang, spacing, median):
    """A thin axis that cannot shrink further must not stop the others from shrinking."""
    for budget in ("cpu", "gpu"):
        cfg = plan_configuration("3d_fullres", spacing, median, 50, 1, BUDGETS[budget])
        assert cfg.estimated_memory_gb <= BUDGETS[budget].memory_gb
        assert cfg.batch_size >= 2


def test_hippocampus_like_plan(no_hang):
    """208 hippocampus-like cases at 1 mm: nnU-Net v2's 3d_fullres patch (40, 56, 40) and 4 stages."""
    fp = fingerprint([[1, 1, 1]] * 208, [[36, 50, 35]] * 208, intensity=(MR_STATS,))
    plan = make_plan(info(("MRI",)), fp, "gpu")
    full = plan.configuration("3d_fullres")
    assert full.patch_size == (40, 56, 40)
    assert full.model_kwargs["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert full.median_shape == (36, 50, 35)
    assert full.spacing == (1.0, 1.0, 1.0)
    assert "3d_lowres" not in plan.configurations
    two = plan.configuration("2d")
    assert two.patch_size == (56, 40) and two.spatial_dims == 2
    assert two.spacing == (1.0, 1.0, 1.0)
    # 2d batch: 5 % of the dataset's *3d* voxels (nnU-Net gets 366 on the 260-case set); the
    # 2d median slice alone would allow only 8
    cap = int(np.floor(0.05 * 208 * 36 * 50 * 35 / (56 * 40)))
    assert two.batch_size == min(cap, BUDGETS["gpu"].max_batch_2d)
    assert two.batch_size > 100
    assert plan.normalization == (Normalization("zscore", False),)


def test_make_plan_lowres_only_for_large_cases(no_hang):
    small = make_plan(info(), fingerprint([[1, 1, 1]] * 10, [[48, 48, 48]] * 10), "cpu")
    assert set(small.configurations) == {"2d", "3d_fullres"}
    big = make_plan(info(), fingerprint([[1, 1, 1]] * 10, [[300, 300, 300]] * 10), "gpu")
    assert set(big.configurations) == {"2d", "3d_fullres", "3d_lowres"}
    full, low = big.configuration("3d_fullres"), big.configuration("3d_lowres")
    assert np.prod(full.patch_size) / np.prod(full.median_shape) < 0.25
    assert all(ls > fs for ls, fs in zip(low.spacing, full.spacing))
    assert all(lm < fm for lm, fm in zip(low.median_shape, full.median_shape))
    assert np.prod(low.patch_size) / np.prod(low.median_shape) >= 0.25 * 0.95  # (median truncated to int)


def test_make_plan_anisotropic(no_hang):
    z = [5.0] * 9 + [2.5]
    fp = fingerprint([[s, 0.8, 0.8] for s in z], [[40, 400, 400]] * 10)
    plan = make_plan(info(), fp, "cpu")
    full = plan.configuration("3d_fullres")
    assert full.spacing[0] == pytest.approx(np.percentile(z, 10))
    assert full.anisotropic_axis == 0 and full.separate_z
    assert full.model_kwargs["kernel_sizes"][0] == [1, 3, 3]
    assert full.model_kwargs["strides"][1] == [1, 2, 2]
    assert plan.configuration("2d").anisotropic_axis is None


def test_make_plan_unknown_budget():
    with pytest.raises(ValueError):
        make_plan(info(), fingerprint([[1, 1, 1]] * 2, [[20, 20, 20]] * 2), "tpu")


# ----------------------------------------------------------------------------- normalisation plan
def test_plan_normalization_ct_and_mask():
    fp = fingerprint([[1, 1, 1]] * 3, [[20, 20, 20]] * 3, crop_fraction=0.5, intensity=(CT_STATS, MR_STATS, MR_STATS))
    norms = plan_normalization(info(("CT", "T2", "noNorm")), fp)
    assert norms[0] == Normalization("ct", False, -950.0, 1200.0, 40.0, 100.0)
    assert norms[1] == Normalization("zscore", True)
    assert norms[2].scheme == "none"
    fp_full = fingerprint([[1, 1, 1]] * 3, [[20, 20, 20]] * 3, crop_fraction=0.9, intensity=(MR_STATS,))
    assert plan_normalization(info(("T1",)), fp_full) == (Normalization("zscore", False),)


# ----------------------------------------------------------------------------- Plan JSON
def test_plan_json_round_trip(tmp_path, no_hang):
    fp = fingerprint([[2.5, 0.7, 0.7]] * 6, [[120, 260, 260]] * 6)
    plan = make_plan(info(), fp, "gpu")
    path = plan.save(tmp_path / "plan.json")
    loaded = Plan.load(path)
    assert loaded == plan
    assert loaded.num_classes == 3
    for name, cfg in plan.configurations.items():
        assert loaded.configuration(name) == cfg
        assert isinstance(loaded.configuration(name).patch_size, tuple)
    d = json.loads(path.read_text())
    assert d["schema_version"] == SCHEMA_VERSION
    assert d["configurations"]["3d_fullres"]["model"] == "unet"  # registry key, not an import path


def test_plan_with_configuration_and_missing_configuration():
    cfg = Configuration("3d_fullres", (1.0, 1.0, 1.0), (10, 10, 10), (8, 8, 8), 2)
    plan = Plan("toy", ("CT",), {"background": 0, "a": 1}, (Normalization(),), {"3d_fullres": cfg})
    with pytest.raises(PlanError, match="2d"):
        plan.configuration("2d")
    new = plan.with_configuration(Configuration("2d", (1.0, 1.0, 1.0), (10, 10), (8, 8), 4))
    assert set(new.configurations) == {"3d_fullres", "2d"} and set(plan.configurations) == {"3d_fullres"}


def test_plan_errors(tmp_path):
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="plan is not valid JSON") as exc:
        Plan.load(bad)
    assert exc.value.path == str(bad)
    bad.write_text("[1, 2]")  # valid JSON, but not an object
    with pytest.raises(PlanError, match="plan is not a JSON object"):
        Plan.load(bad)
    cfg = Configuration("3d_fullres", (1.0, 1.0, 1.0), (10, 10, 10), (8, 8, 8), 2)
    plan = Plan("toy", ("CT",), {"background": 0, "a": 1}, (Normalization(),), {"3d_fullres": cfg})
    d = plan.to_json()
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**d, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(PlanError, match="newer"):
        Plan.load(newer)
    missing_key = tmp_path / "missing_key.json"
    missing_key.write_text(json.dumps({k: v for k, v in d.items() if k != "labels"}))
    with pytest.raises(PlanError, match="invalid plan"):
        Plan.load(missing_key)
    bad_cfg = json.loads(json.dumps(d))
    bad_cfg["configurations"]["3d_fullres"]["unknown_field"] = 1
    (tmp_path / "bad_cfg.json").write_text(json.dumps(bad_cfg))
    with pytest.raises(PlanError):
        Plan.load(tmp_path / "bad_cfg.json")


# ----------------------------------------------------------------------------- ResEnc M/L presets
def _resenc_elements(cfg: Configuration, num_classes: int = 3) -> int:
    """nnU-Net's VRAM proxy for the planned network: conv feature-map elements at batch 1."""
    from medseg.models.flops import build_meta, feature_map_elements

    return feature_map_elements(build_meta(cfg.model, 1, num_classes, **cfg.model_kwargs), cfg.patch_size, 1)


def _check_resenc_config(cfg: Configuration, preset: str) -> int:
    from medseg.models.flops import build_meta
    from medseg.models.resenc import ENCODER_BLOCKS, PRESETS, ResEncUNet, nnunet_features

    kw, n = cfg.model_kwargs, len(cfg.model_kwargs["strides"])
    assert cfg.model == preset and isinstance(build_meta(cfg.model, 1, 3, **kw), ResEncUNet)
    assert kw["features"] == nnunet_features(n) and kw["blocks_per_stage"] == list(ENCODER_BLOCKS[:n])
    p = PRESETS[preset]
    elements = _resenc_elements(cfg)
    assert elements <= p["reference_val_3d"]  # the patch fits the preset's own budget (its VRAM target)
    assert cfg.batch_size >= 2
    assert cfg.estimated_memory_gb == pytest.approx(
        p["reference_gb"] * elements * cfg.batch_size / (2 * p["reference_val_3d"]), abs=1e-3
    )
    return elements


def test_resenc_presets_on_the_real_hippocampus_fingerprint(no_hang):
    """nnUNetPlannerResEncM/L on MSD hippocampus: ResEnc networks, L's patch >= M's, L's batch larger."""
    from conftest import HIPPO_SHARED as HIPPO  # the whole dataset's fingerprint, not the 10 shipped cases
    from conftest import require

    from medseg.io.dataset import load_dataset_json
    from medseg.planning.fingerprint import compute_fingerprint

    require(HIPPO)
    fp = compute_fingerprint(HIPPO, progress=False, workers=1)
    dinfo = load_dataset_json(HIPPO)
    plan = make_plan(dinfo, fp, "cpu", presets=("resenc_m", "resenc_l"))
    full, m, l_ = (plan.configuration(f"3d_fullres{s}") for s in ("", "_resenc_m", "_resenc_l"))
    assert full == make_plan(dinfo, fp, "cpu").configuration("3d_fullres")  # the U-Net plan is untouched
    for cfg in (m, l_):
        assert cfg.spacing == full.spacing and cfg.median_shape == full.median_shape  # shares its data
    _check_resenc_config(m, "resenc_m")
    _check_resenc_config(l_, "resenc_l")
    assert all(a >= b for a, b in zip(l_.patch_size, m.patch_size))
    assert l_.batch_size * np.prod(l_.patch_size) > m.batch_size * np.prod(m.patch_size)
    # small cases: both take the whole median case; the budget goes into the batch (nnU-Net caps it only at
    # the whole dataset for these presets, not at 5 %)
    assert m.patch_size == (40, 56, 40) and m.model_kwargs["strides"] == full.model_kwargs["strides"]
    assert m.batch_size > plan.configuration("3d_fullres").batch_size


def test_resenc_l_plans_a_larger_patch_than_m_on_large_cases(no_hang):
    fp = fingerprint([[1, 1, 1]] * 10, [[160, 160, 160]] * 10)
    plan = make_plan(info(), fp, "gpu", presets=("resenc_l", "resenc_m"))
    m, l_ = plan.configuration("3d_fullres_resenc_m"), plan.configuration("3d_fullres_resenc_l")
    assert m.patch_size == (128, 128, 128) and l_.patch_size == (160, 160, 160)  # 8 GB vs 24 GB
    assert _check_resenc_config(l_, "resenc_l") > _check_resenc_config(m, "resenc_m")
    assert plan.to_json()["configurations"]["3d_fullres_resenc_l"]["model"] == "resenc_l"


def test_unknown_resenc_preset():
    with pytest.raises(ValueError, match="resenc_xl"):
        make_plan(info(), fingerprint([[1, 1, 1]] * 2, [[20, 20, 20]] * 2), "cpu", presets=("resenc_xl",))
