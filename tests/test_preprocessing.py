"""Unit tests for the pure preprocessing functions: cropping, resampling, normalisation.

Also one geometry round trip through preprocess_array -> export (the inverse used at prediction).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.inference.export import probabilities_to_native, segmentation_from_logits
from medseg.io.image import ImageMeta
from medseg.planning.plan import Configuration, Normalization, Plan
from medseg.preprocessing.cropping import bbox_of, crop_to_nonzero, nonzero_mask, uncrop
from medseg.preprocessing.normalization import normalize, normalize_channel
from medseg.preprocessing.pipeline import preprocess_array
from medseg.preprocessing.resampling import (
    anisotropic_axis,
    new_shape,
    resample_image,
    resample_label,
    resample_probabilities,
)


def sphere(shape, center, radius, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Boolean ball of ``radius`` mm around ``center`` (voxel units) on a grid with ``spacing``."""
    grids = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, center, spacing)], indexing="ij")
    return sum(g**2 for g in grids) <= radius**2


# ----------------------------------------------------------------------------- cropping
def test_crop_uncrop_round_trip(rng):
    image = np.zeros((2, 12, 14, 16), np.float32)
    image[0, 3:9, 2:10, 5:15] = rng.normal(size=(6, 8, 10)) + 5
    image[1, 4:10, 6:11, 1:7] = 1.0  # second channel widens the box
    label = np.zeros((12, 14, 16), np.uint8)
    label[4:7, 3:5, 6:8] = 2
    cropped, lab, bbox, mask = crop_to_nonzero(image, label)
    assert bbox == ((3, 10), (2, 11), (1, 15))
    assert cropped.shape == (2, 7, 9, 14)
    assert lab.shape == (7, 9, 14) and mask.shape == (7, 9, 14)
    assert lab.sum() == label.sum()
    np.testing.assert_array_equal(uncrop(cropped, bbox, image.shape[1:]), image)
    np.testing.assert_array_equal(uncrop(lab, bbox, label.shape), label)
    # uncrop of a spatial-only array and a custom fill value
    back = uncrop(np.ones((7, 9, 14), np.int16), bbox, (12, 14, 16), fill=-1)
    assert back.dtype == np.int16 and (back == 1).sum() == 7 * 9 * 14 and (back == -1).sum() == back.size - 7 * 9 * 14


def test_bbox_of_empty_and_single_voxel():
    assert bbox_of(np.zeros((3, 4, 5), bool)) == ((0, 3), (0, 4), (0, 5))
    m = np.zeros((3, 4, 5), bool)
    m[1, 3, 0] = True
    assert bbox_of(m) == ((1, 2), (3, 4), (0, 1))


def test_crop_of_all_zero_image_keeps_everything():
    image = np.zeros((1, 5, 6, 7), np.float32)
    cropped, _, bbox, mask = crop_to_nonzero(image)
    assert cropped.shape == image.shape
    assert bbox == ((0, 5), (0, 6), (0, 7))
    assert not mask.any()


def test_nonzero_mask_multichannel_and_holes():
    image = np.zeros((2, 9, 9, 9), np.float32)
    image[0, 1:8, 1:8, 1:8] = 1.0
    image[0, 3:6, 3:6, 3:6] = 0.0  # enclosed hole: filled
    image[1, 0, 0, 0] = -2.0  # only the second channel is non-zero here (negative counts)
    m = nonzero_mask(image)
    assert m[4, 4, 4] and m[0, 0, 0]
    assert m.sum() == 7**3 + 1
    cropped, _, bbox, mask = crop_to_nonzero(image)
    assert bbox == ((0, 8), (0, 8), (0, 8))
    assert mask.sum() == 7**3 + 1


# ----------------------------------------------------------------------------- resampling
def test_new_shape():
    assert new_shape((10, 20, 30), (1, 1, 1), (1, 1, 1)) == (10, 20, 30)
    assert new_shape((10, 20, 30), (2.0, 0.5, 1.0), (1.0, 1.0, 1.5)) == (20, 10, 20)
    assert new_shape((5, 7, 9), (3.0, 1.0, 1.0), (1.0, 1.0, 1.0)) == (15, 7, 9)
    assert new_shape((1, 10, 10), (1.0, 1.0, 1.0), (3.0, 1.0, 1.0)) == (1, 10, 10)  # a single slice stays


def test_resample_single_slice_to_coarser_spacing():
    img = np.ones((1, 1, 10, 10), np.float32)
    out = resample_image(img, (1.0, 1.0, 1.0), (3.0, 2.0, 2.0))
    assert out.shape == (1, 1, 5, 5)
    np.testing.assert_allclose(out, 1.0, atol=1e-5)


def test_anisotropic_axis():
    assert anisotropic_axis((5, 0.8, 0.8)) == 0
    assert anisotropic_axis((0.8, 0.8, 5)) == 2
    assert anisotropic_axis((1, 1, 1)) is None
    assert anisotropic_axis((3, 1, 1)) is None  # exactly 3x: not anisotropic
    assert anisotropic_axis((5, 5, 0.8)) is None  # two coarse axes: no single slice axis


def test_resample_image_identity(rng):
    img = rng.normal(size=(2, 8, 9, 10)).astype(np.float64)
    out = resample_image(img, (1.5, 1, 1), (1.5, 1, 1))
    assert out.dtype == np.float32 and out.shape == img.shape
    np.testing.assert_allclose(out, img, rtol=1e-6)


def test_resample_image_shape_and_smooth_function():
    """A linear ramp is reproduced exactly by cubic/linear interpolation away from the border."""
    z, y, x = np.meshgrid(np.arange(12), np.arange(12), np.arange(12), indexing="ij")
    img = (0.5 * z + 0.25 * y - 0.1 * x).astype(np.float32)[None]
    out = resample_image(img, (1, 1, 1), (0.5, 0.5, 0.5))
    assert out.shape == (1, 24, 24, 24)
    # output voxel i (0.5 mm) is centred at input coordinate (i + 0.5) / 2 - 0.5
    c = (np.arange(24) + 0.5) / 2 - 0.5
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    expected = 0.5 * zz + 0.25 * yy - 0.1 * xx
    # (the spline prefilter's 'nearest' border extension is felt a few voxels inwards)
    inner = (slice(None), slice(10, -10), slice(10, -10), slice(10, -10))
    np.testing.assert_allclose(out[inner], expected[None][inner], atol=2e-3)


def test_resample_label_keeps_label_set_and_volume():
    lab = np.zeros((24, 24, 24), np.uint8)
    lab[sphere(lab.shape, (11.5, 11.5, 11.5), 7.0)] = 1
    lab[sphere(lab.shape, (11.5, 11.5, 11.5), 3.5)] = 2  # nested inner class
    up = resample_label(lab, (1, 1, 1), (0.5, 0.5, 0.5), num_classes=3)
    assert up.shape == (48, 48, 48) and up.dtype == lab.dtype
    assert set(np.unique(up)) == {0, 1, 2}
    back = resample_label(up, (0.5, 0.5, 0.5), (1, 1, 1), num_classes=3)
    assert back.shape == lab.shape
    for c in (1, 2):
        v0 = (lab == c).sum()
        assert abs((up == c).sum() / 8 - v0) / v0 < 0.05
        assert abs((back == c).sum() - v0) / v0 < 0.05
        inter = ((back == c) & (lab == c)).sum()
        assert 2 * inter / ((back == c).sum() + v0) > 0.95


def test_resample_label_without_num_classes_matches_explicit():
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[2:6, 3:8, 4:9] = 3
    lab[6:9, 1:4, 1:4] = 1
    a = resample_label(lab, (1, 1, 1), (0.7, 1.3, 1.0))
    b = resample_label(lab, (1, 1, 1), (0.7, 1.3, 1.0), num_classes=4)
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a)) == {0, 1, 3}


def test_resample_label_is_argmax_of_block_fractions_including_background(rng):
    """Downsampling by exactly 2 with linear weights averages 2x2x2 blocks: the result must be the
    argmax (first index on ties, background included) of each block's class fractions."""
    for seed in range(3):
        lab = np.random.default_rng(seed).integers(0, 4, size=(8, 8, 8)).astype(np.uint8)
        out = resample_label(lab, (1, 1, 1), (2, 2, 2), num_classes=4)
        onehot = np.stack([(lab == c) for c in range(4)]).astype(float)
        frac = onehot.reshape(4, 4, 2, 4, 2, 4, 2).mean(axis=(2, 4, 6))
        np.testing.assert_array_equal(out, frac.argmax(0))
    # hand-made block: 2 voxels of class 1, 3 of class 2, 3 background -> tie 2 vs 0 goes to background
    lab = np.zeros((2, 2, 2), np.uint8)
    lab.flat[:2] = 1
    lab.flat[2:5] = 2
    assert resample_label(lab, (1, 1, 1), (2, 2, 2), num_classes=3).item() == 0
    lab.flat[5] = 2  # now 4 of class 2
    assert resample_label(lab, (1, 1, 1), (2, 2, 2), num_classes=3).item() == 2


def test_resample_separate_z_never_mixes_thick_slices(rng):
    """order_z=0 along the thick axis: every output slice equals one in-plane-resampled input slice."""
    img = rng.normal(size=(1, 5, 16, 16)).astype(np.float32)
    spacing, target = (5.0, 0.8, 0.8), (1.0, 1.0, 1.0)
    out = resample_image(img, spacing, target, separate_z_axis=0, order_z=0)
    assert out.shape == (1, 25, 13, 13)
    # independent reference: each thick slice resampled in-plane on its own
    ref = np.stack([ndimage.zoom(s, 13 / 16, order=3, mode="nearest", grid_mode=True) for s in img[0]])
    match = []
    for k in range(out.shape[1]):
        err = np.abs(ref - out[0, k][None]).max(axis=(1, 2))
        assert err.min() < 1e-4, f"output slice {k} is not any input slice (min err {err.min()})"
        match.append(int(err.argmin()))
    assert match == sorted(match) and set(match) == set(range(5))
    # each thick slice is repeated 5 times
    assert np.bincount(match).tolist() == [5] * 5
    # without the separate-z rule, cubic interpolation does mix slices
    mixed = resample_image(img, spacing, target)
    errs = [np.abs(ref - mixed[0, k][None]).max(axis=(1, 2)).min() for k in range(25)]
    assert max(errs) > 1e-2


def test_resample_label_separate_z_copies_slices():
    lab = np.zeros((4, 12, 12), np.uint8)
    lab[1, 2:10, 2:10] = 1
    lab[2, 4:8, 4:8] = 2
    out = resample_label(lab, (4.0, 1, 1), (1.0, 1, 1), num_classes=3, separate_z_axis=0)
    assert out.shape == (16, 12, 12)
    for k in range(16):
        np.testing.assert_array_equal(out[k], lab[k // 4])


def test_resample_probabilities_sums_to_one(rng):
    logits = rng.normal(size=(3, 6, 7, 8))
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    out = resample_probabilities(probs.astype(np.float32), (9, 5, 12))
    assert out.shape == (3, 9, 5, 12)
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)
    out_z = resample_probabilities(probs.astype(np.float32), (12, 5, 12), separate_z_axis=0)
    np.testing.assert_allclose(out_z.sum(0), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------- normalisation
def test_zscore(rng):
    x = rng.normal(3.0, 7.0, size=(10, 11, 12))
    y = normalize_channel(x, Normalization("zscore"))
    assert y.dtype == np.float32
    assert abs(y.mean()) < 1e-5 and abs(y.std() - 1) < 1e-5
    assert x.mean() > 1  # input untouched


def test_zscore_masked(rng):
    x = rng.normal(100.0, 20.0, size=(10, 10, 10)).astype(np.float32)
    mask = np.zeros(x.shape, bool)
    mask[2:8, 2:8, 2:8] = True
    x[~mask] = 0
    y = normalize_channel(x, Normalization("zscore", use_mask=True), mask)
    assert np.all(y[~mask] == 0)
    assert abs(y[mask].mean()) < 1e-4 and abs(y[mask].std() - 1) < 1e-4
    # use_mask=False ignores the mask
    y2 = normalize_channel(x, Normalization("zscore", use_mask=False), mask)
    assert abs(y2.mean()) < 1e-4 and np.all(y2[~mask] < -0.1)


def test_ct_normalisation_clips_with_dataset_stats(rng):
    x = rng.uniform(-1500, 2500, size=(8, 8, 8))
    norm = Normalization("ct", False, clip_low=-200.0, clip_high=300.0, mean=50.0, std=25.0)
    y = normalize_channel(x, norm)
    expected = (np.clip(x, -200, 300) - 50.0) / 25.0
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4)
    assert y.min() == pytest.approx(-10.0) and y.max() == pytest.approx(10.0)


def test_normalize_per_channel(rng):
    img = np.stack([rng.normal(5, 2, (6, 6, 6)), rng.uniform(-1000, 1000, (6, 6, 6))])
    schemes = (Normalization("zscore"), Normalization("ct", False, -100.0, 100.0, 0.0, 50.0))
    out = normalize(img, schemes)
    assert out.shape == img.shape
    assert abs(out[0].mean()) < 1e-5
    assert out[1].min() == pytest.approx(-2.0) and out[1].max() == pytest.approx(2.0)
    np.testing.assert_array_equal(normalize(img[:1], (Normalization("none"),))[0], img[0].astype(np.float32))
    with pytest.raises(ValueError):
        normalize_channel(img[0], Normalization("bogus"))


# ----------------------------------------------------------------------------- preprocess -> export
def _plan(spacing, patch=(8, 8, 8), num_classes=3, norm=Normalization("zscore", use_mask=True)):
    cfg = Configuration("3d_fullres", tuple(spacing), (8, 8, 8), patch, 2)
    return Plan(
        "toy", ("MRI",), {"background": 0, **{f"c{i}": i for i in range(1, num_classes)}}, (norm,), {"3d_fullres": cfg}
    ), cfg


@pytest.mark.parametrize(
    "spacing,target",
    [((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)), ((2.0, 1.0, 1.0), (1.0, 1.0, 1.0)), ((4.0, 1.0, 1.0), (2.0, 1.0, 1.0))],
)
def test_preprocess_then_export_restores_label(rng, spacing, target):
    shape = (10, 20, 22)
    image = np.zeros((1, *shape), np.float32)
    image[0, 1:9, 2:18, 3:21] = rng.normal(10, 2, (8, 16, 18))
    label = np.zeros(shape, np.uint8)
    label[3:7, 5:14, 6:15] = 1
    label[4:6, 8:11, 9:12] = 2
    plan, cfg = _plan(target)
    meta = ImageMeta(spacing=spacing, shape=shape)
    data, seg, props = preprocess_array(image, meta, plan, cfg, label)
    assert data.dtype == np.float32
    assert data.shape[1:] == seg.shape
    assert props["original_shape"] == list(shape)
    assert props["bbox"] == [[1, 9], [2, 18], [3, 21]]
    assert props["separate_z_axis"] == (0 if spacing[0] / spacing[1] > 3 else None)
    assert seg.shape == new_shape((8, 16, 18), spacing, target)
    # perfect one-hot "logits" of the preprocessed label -> native label map
    logits = torch.from_numpy(np.stack([(seg == c) for c in range(3)]).astype(np.float32) * 20)
    native, probs = segmentation_from_logits(logits, props, return_probabilities=True)
    assert native.shape == shape and probs.shape == (3, *shape)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    assert np.all(native[:1] == 0) and np.all(probs[0, 0] == 1.0)  # outside the crop: background
    dice = [2 * ((native == c) & (label == c)).sum() / ((native == c).sum() + (label == c).sum()) for c in (1, 2)]
    assert min(dice) > 0.85, dice


def test_probabilities_to_native_identity_geometry():
    probs = torch.rand(2, 4, 5, 6)
    props = {
        "shape_after_crop": [4, 5, 6],
        "original_shape": [6, 7, 8],
        "bbox": [[1, 5], [1, 6], [2, 8]],
        "separate_z_axis": None,
    }
    out = probabilities_to_native(probs, props)
    np.testing.assert_allclose(out[:, 1:5, 1:6, 2:8], probs.numpy())
    assert out[0, 0, 0, 0] == 1 and out[1, 0, 0, 0] == 0


def test_resample_label_of_a_sparse_many_class_map_equals_looping_over_every_class(rng):
    """Only present classes are interpolated; the result must equal the loop over all 117 classes."""
    from medseg.preprocessing.resampling import _resample_channel

    lab = np.zeros((14, 16, 12), np.int16)
    for c in (5, 40, 116):
        z, y, x = rng.integers(0, 8, 3)
        lab[z : z + 5, y : y + 6, x : x + 4] = c  # overlapping blocks of three classes out of 117
    shape = (11, 21, 13)
    out = resample_label(lab, (1, 1, 1), None, shape=shape, num_classes=117)
    best, total, ref = np.zeros(shape, np.float32), np.zeros(shape, np.float32), np.zeros(shape, np.int16)
    for c in range(1, 117):
        prob = _resample_channel((lab == c).astype(np.float32), shape, 1, None, 0)
        take = prob > best
        ref[take], best[take] = c, prob[take]
        total += prob
    ref[(1.0 - total) >= best] = 0
    assert np.array_equal(out, ref) and set(np.unique(out)) == {0, 5, 40, 116}
