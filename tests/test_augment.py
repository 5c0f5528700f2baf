"""Unit tests for the batched torch augmentation (medseg/augment/transforms.py)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from medseg.augment.transforms import (
    NO_AUGMENTATION,
    AugmentConfig,
    affine_theta,
    augment_batch,
    gaussian_blur,
    intensity_transforms,
    mirror,
    spatial_transform,
)


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def warp(image, theta, patch, mode="bilinear"):
    grid = F.affine_grid(theta, (image.shape[0], image.shape[1], *patch), align_corners=False)
    return F.grid_sample(image, grid, mode=mode, padding_mode="zeros", align_corners=False)


def labels_batch(shape, g, values=(0, 1, 3)):
    idx = torch.randint(0, len(values), shape, generator=g)
    return torch.tensor(values)[idx]


# ----------------------------------------------------------------------------- spatial
@pytest.mark.parametrize(
    "region,patch", [((20, 22, 18), (16, 16, 16)), ((16, 16, 16), (16, 16, 16)), ((30, 26), (24, 20))]
)
def test_no_augmentation_is_exact_centre_crop(region, patch):
    g = gen()
    image = torch.randn(3, 2, *region, generator=g)
    seg = labels_batch((3, 1, *region), g)
    out, out_seg = augment_batch(image, seg, patch, NO_AUGMENTATION, gen(1))
    assert tuple(out.shape) == (3, 2, *patch) and tuple(out_seg.shape) == (3, 1, *patch)
    sl = tuple(slice((r - p) // 2, (r - p) // 2 + p) for r, p in zip(region, patch))
    assert torch.equal(out, image[(slice(None), slice(None), *sl)])
    assert torch.equal(out_seg, seg[(slice(None), slice(None), *sl)])


def test_zero_angle_rotation_path_equals_centre_crop():
    """Forcing the grid_sample path with a 0-degree rotation must sample exactly the voxel centres
    of the centred patch (region and patch with the same parity)."""
    cfg = replace(NO_AUGMENTATION, p_rotation=1.0, rotation_deg_3d=0.0)
    g = gen()
    image = torch.randn(2, 1, 20, 18, 24, generator=g)
    seg = labels_batch((2, 1, 20, 18, 24), g)
    out, out_seg = spatial_transform(image, seg, (12, 12, 16), cfg, gen(1))
    ref = image[:, :, 4:16, 3:15, 4:20]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(out_seg, seg[:, :, 4:16, 3:15, 4:20])


@pytest.mark.parametrize("k,dims", [(0, (3, 4)), (1, (2, 4)), (2, (2, 3))])
def test_90_degree_rotation_matches_rot90(k, dims):
    n = 9
    image = torch.randn(1, 2, n, n, n, generator=gen(k))
    angles = torch.zeros(1, 3)
    angles[0, k] = math.pi / 2
    theta = affine_theta(angles, torch.ones(1), (n, n, n), (n, n, n))
    out = warp(image, theta, (n, n, n))
    # +90 degrees maps output offset o to input offset R o, i.e. torch.rot90 with k=-1
    torch.testing.assert_close(out, torch.rot90(image, -1, dims), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, torch.rot90(image, 1, dims), atol=1e-2)
    seg = labels_batch((1, 1, n, n, n), gen(5)).float()
    assert torch.equal(warp(seg, theta, (n, n, n), mode="nearest"), torch.rot90(seg, -1, dims))


def test_90_degree_rotation_2d_and_inplane_only():
    n = 10
    image = torch.randn(2, 1, n, n, generator=gen(3))
    theta = affine_theta(torch.full((2, 1), math.pi / 2), torch.ones(2), (n, n), (n, n))
    torch.testing.assert_close(warp(image, theta, (n, n)), torch.rot90(image, -1, (2, 3)), atol=1e-4, rtol=1e-4)
    # in-plane only: the first angle rotates (y, x); the other two are ignored
    vol = torch.randn(1, 1, 5, n, n, generator=gen(4))
    theta = affine_theta(
        torch.tensor([[math.pi / 2, 0.3, 0.7]]), torch.ones(1), (5, n, n), (5, n, n), inplane_only=True
    )
    torch.testing.assert_close(warp(vol, theta, (5, n, n)), torch.rot90(vol, -1, (3, 4)), atol=1e-4, rtol=1e-4)


def test_scale_zooms_about_the_centre():
    """On a linear ramp (exact under bilinear sampling), scale s multiplies the slope by s."""
    n = 16
    x = torch.arange(n, dtype=torch.float32)
    image = x.view(1, 1, 1, 1, n).expand(1, 1, n, n, n).clone()
    for s in (0.5, 0.8):
        theta = affine_theta(torch.zeros(1, 3), torch.tensor([s]), (n, n, n), (n, n, n))
        out = warp(image, theta, (n, n, n))
        c = (n - 1) / 2
        torch.testing.assert_close(out[0, 0, 5, 5], c + s * (x - c), atol=1e-4, rtol=1e-4)
    # a larger region with a smaller patch: patch voxel centres land on the region's central voxels
    theta = affine_theta(torch.zeros(1, 3), torch.ones(1), (n, n, n), (8, 8, 8))
    torch.testing.assert_close(warp(image, theta, (8, 8, 8))[0, 0, 0, 0], x[4:12], atol=1e-4, rtol=1e-4)


def test_rotated_seg_stays_in_label_set():
    cfg = AugmentConfig(p_rotation=1.0, p_scale=1.0)
    g = gen(2)
    image = torch.randn(4, 1, 24, 24, 24, generator=g)
    seg = labels_batch((4, 1, 24, 24, 24), g, values=(0, 2, 5))
    out, out_seg = augment_batch(image, seg, (16, 16, 16), cfg, gen(3))
    assert tuple(out.shape) == (4, 1, 16, 16, 16) and tuple(out_seg.shape) == (4, 1, 16, 16, 16)
    assert out_seg.dtype == torch.int64
    assert set(out_seg.unique().tolist()) <= {0, 2, 5}
    assert torch.isfinite(out).all()


def test_mirror_flips_image_and_seg_consistently():
    cfg = replace(NO_AUGMENTATION, p_mirror=0.5)
    g = gen(6)
    image = torch.randn(8, 2, 12, 10, 14, generator=g)
    seg = (image[:, :1] > 0).long()
    out, out_seg = augment_batch(image, seg, (12, 10, 14), cfg, gen(7))
    assert torch.equal(out_seg, (out[:, :1] > 0).long())
    # each output is its input flipped along some subset of axes, chosen per sample
    subsets = [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    used = []
    for i in range(8):
        match = [axes for axes in subsets if torch.equal(out[i], image[i].flip([1 + a for a in axes]))]
        assert len(match) == 1
        used.append(match[0])
    assert len(set(used)) >= 3


def test_mirror_restricted_axes_and_p1():
    image = torch.randn(2, 1, 6, 7, 8, generator=gen(8))
    seg = (image > 0).long()
    cfg = replace(NO_AUGMENTATION, p_mirror=1.0, mirror_axes=(1, 2))
    out, out_seg = mirror(image, seg, cfg, gen(9))
    assert torch.equal(out, image.flip(3).flip(4)) and torch.equal(out_seg, seg.flip(3).flip(4))


# ----------------------------------------------------------------------------- intensity
def two_channel_batch(b=4, shape=(10, 12, 9), g=None):
    g = g or gen(10)
    a = torch.randn(b, 1, *shape, generator=g) * 3 + 5
    c = torch.rand(b, 1, *shape, generator=g) * 1000 - 200
    return torch.cat([a, c], 1)


@pytest.mark.parametrize("invert", [False, True])
def test_gamma_keeps_mean_and_std_per_channel(invert):
    cfg = replace(
        NO_AUGMENTATION,
        p_gamma=0.0 if invert else 1.0,
        p_gamma_inverted=1.0 if invert else 0.0,
        gamma_range=(0.5, 0.6) if invert else (1.6, 1.8),
    )
    x = two_channel_batch()
    y = intensity_transforms(x, cfg, gen(11))
    dims = (2, 3, 4)
    torch.testing.assert_close(y.mean(dims), x.mean(dims), atol=1e-2, rtol=1e-4)
    torch.testing.assert_close(y.std(dims), x.std(dims), atol=1e-2, rtol=1e-4)
    assert (y - x).abs().max() > 0.1  # it did something


def test_contrast_preserves_each_channels_range():
    cfg = replace(NO_AUGMENTATION, p_contrast=1.0, contrast_range=(1.3, 1.4))
    x = two_channel_batch()
    y = intensity_transforms(x, cfg, gen(12))
    dims = (2, 3, 4)
    assert torch.all(y.amin(dims) >= x.amin(dims) - 1e-4)
    assert torch.all(y.amax(dims) <= x.amax(dims) + 1e-4)
    torch.testing.assert_close(y.mean(dims), x.mean(dims), atol=0.5, rtol=0.05)


def test_gaussian_blur_keeps_constants_and_mean():
    x = torch.full((2, 1, 8, 9, 10), 3.0)
    torch.testing.assert_close(gaussian_blur(x, torch.tensor([0.7, 1.0])), x)
    noise = torch.randn(1, 2, 16, 16, generator=gen(13))
    blurred = gaussian_blur(noise, torch.tensor([1.0]))
    assert blurred.shape == noise.shape
    assert blurred.std() < 0.7 * noise.std()


def test_all_intensity_transforms_on():
    cfg = AugmentConfig(p_noise=1, p_blur=1, p_brightness=1, p_contrast=1, p_lowres=1, p_gamma_inverted=1, p_gamma=1)
    for shape in [(3, 2, 10, 12, 8), (3, 1, 20, 16)]:
        x = torch.randn(shape, generator=gen(14))
        y = intensity_transforms(x, cfg, gen(15))
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert not torch.allclose(x, y)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("region,patch", [((22, 22, 22), (16, 16, 16)), ((46, 34), (32, 24))])
def test_default_augmentation_shapes_labels_and_replay(region, patch):
    g = gen(16)
    image = torch.randn(4, 2, *region, generator=g)
    seg = labels_batch((4, 1, *region), g)
    cfg = AugmentConfig()
    out, out_seg = augment_batch(image, seg, patch, cfg, gen(17))
    assert tuple(out.shape) == (4, 2, *patch) and tuple(out_seg.shape) == (4, 1, *patch)
    assert set(out_seg.unique().tolist()) <= {0, 1, 3}
    assert torch.isfinite(out).all()
    again, again_seg = augment_batch(image, seg, patch, cfg, gen(17))  # same seed: same augmentation
    assert torch.equal(out, again) and torch.equal(out_seg, again_seg)
