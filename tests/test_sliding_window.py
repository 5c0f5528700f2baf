"""Unit tests for sliding-window tiling, Gaussian weighting and mirror TTA."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg.inference.sliding_window import (
    gaussian_weights,
    mirror_combinations,
    sliding_window_predict,
    tile_starts,
)


# ----------------------------------------------------------------------------- tiling
@pytest.mark.parametrize(
    "im,t,step",
    [
        (10, 4, 0.5),
        (37, 16, 0.5),
        (64, 32, 0.5),
        (33, 32, 0.5),
        (100, 24, 0.33),
        (50, 50, 0.5),
        (7, 16, 0.5),
        (20, 1, 0.5),
        (9, 3, 1.0),
        (40, 8, 0.25),
    ],
)
def test_tile_starts_cover_the_image(im, t, step):
    (starts,) = tile_starts([im], [t], step)
    assert starts[0] == 0
    if im <= t:
        assert starts == [0]
        return
    assert starts[-1] + t == im, "last tile must end at the border"
    diffs = np.diff(starts)
    assert np.all(diffs > 0), f"duplicate or unordered tiles: {starts}"
    assert np.all(diffs <= max(int(np.ceil(t * step)), 1)), "consecutive tiles must overlap by at least 1 - step"
    covered = np.zeros(im, bool)
    for s in starts:
        covered[s : s + t] = True
    assert covered.all()


def test_tile_starts_per_axis_and_unit_tiles():
    starts = tile_starts((5, 40, 24), (1, 16, 24), 0.5)
    assert starts[0] == [0, 1, 2, 3, 4]  # a 2d model visits every slice exactly once
    assert starts[1] == [0, 8, 16, 24]
    assert starts[2] == [0]


def test_gaussian_weights():
    for tile in [(8, 8, 8), (5, 12, 7), (1, 16, 16), (16, 16)]:
        w = gaussian_weights(tile)
        assert tuple(w.shape) == tile and w.dtype == torch.float32
        assert float(w.max()) == pytest.approx(1.0)
        assert float(w.min()) > 0
        # symmetric about the centre, peaked in the middle
        for axis in range(len(tile)):
            assert torch.allclose(w, w.flip(axis))
        centre = tuple(t // 2 for t in tile)
        corner = tuple(0 for _ in tile)
        assert w[centre] > w[corner] or all(t == 1 for t in tile)


def test_gaussian_weights_cache_is_not_shared_mutable_state():
    w = gaussian_weights((6, 6, 6))
    w.mul_(0)
    assert float(gaussian_weights((6, 6, 6)).max()) == pytest.approx(1.0)


def test_mirror_combinations():
    assert mirror_combinations(()) == [()]
    combos = mirror_combinations((0, 1, 2))
    assert len(combos) == 8 and len(set(combos)) == 8 and () in combos and (0, 1, 2) in combos


# ----------------------------------------------------------------------------- prediction
def _identity(x):
    return x.clone()


@pytest.mark.parametrize(
    "shape,tile",
    [
        ((2, 20, 23, 17), (8, 8, 8)),
        ((1, 16, 16, 16), (16, 16, 16)),
        ((2, 5, 7, 6), (8, 8, 8)),  # smaller than the tile: padded
        ((1, 10, 5, 30), (8, 8, 8)),  # mixed: padded along one axis
        ((3, 24, 18), (8, 12)),
    ],
)  # 2d image, 2d tile
@pytest.mark.parametrize("gaussian", [True, False])
def test_identity_predictor_reproduces_input(shape, tile, gaussian):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(shape, generator=g)
    out = sliding_window_predict(image, _identity, tile, shape[0], gaussian=gaussian)
    assert out.shape == image.shape
    torch.testing.assert_close(out, image, atol=1e-5, rtol=1e-5)


def test_constant_predictor_gives_constant_logits():
    image = torch.zeros(1, 19, 21, 11)

    def const(x):
        return torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1).expand(x.shape[0], 3, *x.shape[2:])

    out = sliding_window_predict(image, const, (8, 8, 8), 3, step=0.5)
    torch.testing.assert_close(out, torch.tensor([1.0, -2.0, 0.5]).view(3, 1, 1, 1).expand(3, 19, 21, 11))


def test_2d_tiles_on_a_3d_volume():
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 6, 20, 18, generator=g)
    seen = []

    def predict(x):
        assert x.shape[2] == 1 and tuple(x.shape[3:]) == (16, 16)
        seen.append(x.shape[0])
        y = x[:, :, 0] * 2.0  # what a 2d network sees: (B, C, h, w)
        return y[:, :, None]

    out = sliding_window_predict(image, predict, (1, 16, 16), 2, step=0.5)
    torch.testing.assert_close(out, image * 2.0, atol=1e-5, rtol=1e-5)
    # 6 slices x 2 x 2 in-plane tiles, each visited exactly once
    assert sum(seen) == 6 * 2 * 2


def test_tile_batch_and_progress_do_not_change_the_result():
    g = torch.Generator().manual_seed(2)
    image = torch.randn(1, 18, 18, 18, generator=g)

    def blur(x):  # not tile-invariant near tile borders: checks the weighting is the same
        return F.avg_pool3d(x, 3, stride=1, padding=1)

    ticks = []
    a = sliding_window_predict(image, blur, (8, 8, 8), 1, tile_batch=1)
    b = sliding_window_predict(image, blur, (8, 8, 8), 1, tile_batch=5, progress=ticks.append)
    torch.testing.assert_close(a, b)
    n_tiles = len(list(itertools.product(*tile_starts((18, 18, 18), (8, 8, 8)))))
    assert sum(ticks) == n_tiles


def test_mirror_tta_with_equivariant_function_equals_no_tta():
    g = torch.Generator().manual_seed(3)
    image = torch.randn(2, 14, 12, 10, generator=g)
    w = torch.randn(3, 2, 1, 1, 1, generator=g)

    def net(x):  # pointwise channel mixing + symmetric blur: commutes with every flip
        return F.avg_pool3d(F.conv3d(x, w), 3, stride=1, padding=1)

    plain = sliding_window_predict(image, net, (8, 8, 8), 3)
    tta = sliding_window_predict(image, net, (8, 8, 8), 3, mirror_axes=(0, 1, 2))
    torch.testing.assert_close(plain, tta, atol=1e-5, rtol=1e-5)


def test_mirror_tta_flips_back():
    """f(x) = x + ramp along z (within the tile). Averaging f over a z-flip (flipped back) gives
    x + the ramp's mean; forgetting to flip the prediction back would mix x with flip(x)."""
    image = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(4))
    ramp = torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1, 1)

    def net(x):
        return x + ramp

    out = sliding_window_predict(image, net, (8, 8, 8), 1, mirror_axes=(0,))
    torch.testing.assert_close(out, image + 3.5, atol=1e-5, rtol=1e-5)
    no_tta = sliding_window_predict(image, net, (8, 8, 8), 1)
    torch.testing.assert_close(no_tta, image + ramp[0], atol=1e-5, rtol=1e-5)
