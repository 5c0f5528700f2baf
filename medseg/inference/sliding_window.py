"""Sliding-window tiling with Gaussian weighting: pure functions shared by every model family.

A 2D model on a 3D volume is the same thing with a (1, h, w) tile: ``predict_tiles`` receives
(B, C, *tile) and the caller's network function decides how to feed it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


def tile_starts(image_size, tile_size, step: float = 0.5) -> list[list[int]]:
    """Start offsets per axis: tiles overlap by (1 - step) and the last tile ends at the border."""
    starts = []
    for im, t in zip(image_size, tile_size):
        if im <= t:
            starts.append([0])
            continue
        # at least one voxel per step: a (1, h, w) tile visits every slice once, not twice
        n = int(np.ceil((im - t) / max(t * step, 1.0))) + 1
        stride = (im - t) / (n - 1)
        starts.append(sorted({int(round(stride * i)) for i in range(n)}))
    return starts


@lru_cache(maxsize=8)
def _gaussian_np(tile_size: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(t, dtype=np.float64) for t in tile_size], indexing="ij")
    g = np.ones(tile_size, dtype=np.float64)
    for grid, t in zip(grids, tile_size):
        if t > 1:
            sigma = t * sigma_scale
            g *= np.exp(-0.5 * ((grid - (t - 1) / 2) / sigma) ** 2)
    g /= g.max()
    g = np.maximum(g, g[g > 0].min() if (g > 0).any() else 1.0)
    return g.astype(np.float32)


def gaussian_weights(tile_size, sigma_scale: float = 1 / 8, device="cpu") -> torch.Tensor:
    """Importance map, 1 at the tile centre, never 0 (so every voxel gets a weight)."""
    # a copy: the cached array must not be changed through the returned tensor
    return torch.tensor(_gaussian_np(tuple(int(t) for t in tile_size), float(sigma_scale)), device=device)


@lru_cache(maxsize=8)
def _nnunet_gaussian_np(tile_size: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(tile_size)
    impulse[tuple(t // 2 for t in tile_size)] = 1
    g = gaussian_filter(impulse, [t * sigma_scale for t in tile_size], 0, mode="constant", cval=0)
    g /= g.max()
    g[g == 0] = g[g > 0].min()
    return g.astype(np.float32)


def nnunet_gaussian_weights(tile_size, sigma_scale: float = 1 / 8, device="cpu") -> torch.Tensor:
    """nnU-Net v2's importance map (``compute_gaussian``): an impulse at ``size // 2`` smoothed by scipy's
    truncated Gaussian filter. It differs from :func:`gaussian_weights` by half a voxel at even tile sizes
    and in the tails, which moves blended logits where overlapping tiles disagree."""
    return torch.tensor(_nnunet_gaussian_np(tuple(int(t) for t in tile_size), float(sigma_scale)), device=device)


def importance_weights(tile_size, numerics: str = "medseg", device="cpu") -> torch.Tensor:
    """The Gaussian tile weights of a configuration's ``numerics`` ("medseg" or "nnunet")."""
    if numerics == "nnunet":
        return nnunet_gaussian_weights(tile_size, device=device)
    return gaussian_weights(tile_size, device=device)


def mirror_combinations(axes) -> list[tuple[int, ...]]:
    axes = tuple(axes)
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def pad_to_tile(image: torch.Tensor, tile_size) -> tuple[torch.Tensor, list[int]]:
    """Zero-pad a (C, *spatial) image, centred, to at least one tile; returns (image, pad per axis).
    The padded coordinate of voxel 0 is ``pad // 2`` per axis."""
    pad = [max(int(t) - s, 0) for s, t in zip(image.shape[1:], tile_size)]
    if any(pad):
        pads = []
        for p in reversed(pad):
            pads += [p // 2, p - p // 2]
        image = F.pad(image, pads)
    return image, pad


def _average_flips(x: torch.Tensor, predict, flips) -> tuple[dict[str, torch.Tensor], bool]:
    """Mirror TTA: predict every flip of the batch, flip each named map back, average. Also says
    whether the network returned named maps (a dict) rather than one tensor."""
    total: dict[str, torch.Tensor] = {}
    named = False
    for flip in flips:
        dims = [2 + a for a in flip]
        out = predict(x.flip(dims) if dims else x, flip)
        named = isinstance(out, dict)
        out = out if named else {"logits": out}
        for name, y in out.items():
            if tuple(y.shape[2:]) != tuple(x.shape[2:]):
                raise ValueError(
                    f"output '{name}' has spatial shape {tuple(y.shape[2:])}, the tile {tuple(x.shape[2:])}"
                )
            y = y.float()
            y = y.flip(dims) if dims else y
            total[name] = y if name not in total else total[name] + y
    return {k: v / len(flips) for k, v in total.items()}, named


def predict_tile_batches(
    image: torch.Tensor, predict_tiles: Callable, slicers, *, tile_batch: int = 1, mirror_axes=(),
    tile_conditions: Callable | None = None, offset=None,
):  # fmt: skip
    """The one tiling + mirror-TTA loop (plain and streaming prediction): yields ``(chunk, maps)``
    for consecutive batches of ``tile_batch`` tiles, ``maps`` = {name: (B, K, *tile)} averaged over
    the flips of ``mirror_axes``, and whether the network returned named maps. ``tile_conditions(starts, flip)`` (optional) returns the keyword
    inputs for the tiles starting at ``starts`` (voxel coordinates of the unpadded image: padded
    start minus ``offset``) under mirror ``flip``; they are passed to ``predict_tiles``."""
    flips = mirror_combinations(mirror_axes)
    offset = list(offset or [0] * (image.ndim - 1))
    for i in range(0, len(slicers), tile_batch):
        chunk = slicers[i : i + tile_batch]
        batch = torch.stack([image[(slice(None), *sl)] for sl in chunk])
        if tile_conditions is None:
            predict = lambda x, flip: predict_tiles(x)  # noqa: E731
        else:
            starts = [[s.start - o for s, o in zip(sl, offset)] for sl in chunk]
            predict = lambda x, flip, st=starts: predict_tiles(x, **tile_conditions(st, flip))  # noqa: E731
        yield (chunk, *_average_flips(batch, predict, flips))


def sliding_window_predict(
    image: torch.Tensor,
    predict_tiles: Callable[..., torch.Tensor | dict[str, torch.Tensor]],
    tile_size,
    num_classes: int | None = None,
    *,
    step: float = 0.5,
    gaussian: bool = True,
    mirror_axes=(),
    tile_batch: int = 1,
    output_device=None,
    progress: Callable[[int], None] | None = None,
    numerics: str = "medseg",
    tile_conditions: Callable | None = None,
):
    """Logits (K, *spatial) for a (C, *spatial) image.

    ``predict_tiles`` maps (B, C, *tile) to logits (B, K, *tile), or to a dict of named maps
    ({"logits": ..., "ood_score": ...}, each (B, K_name, *tile)): then a dict of blended maps is
    returned. ``mirror_axes``: spatial axes for mirror test-time augmentation; every map of all 2^n
    flips is flipped back and averaged (nnU-Net's TTA). The image is zero-padded to at least one
    tile. ``numerics="nnunet"`` uses nnU-Net v2's Gaussian (:func:`nnunet_gaussian_weights`).
    ``tile_conditions``: see :func:`predict_tile_batches`.
    """
    out_dev = output_device or image.device
    spatial = image.shape[1:]
    tile_size = tuple(int(t) for t in tile_size)
    image, pad = pad_to_tile(image, tile_size)
    padded = image.shape[1:]
    weights = (
        importance_weights(tile_size, numerics, device=out_dev) if gaussian else torch.ones(tile_size, device=out_dev)
    )
    sums: dict[str, torch.Tensor] = {}
    norm = torch.zeros(padded, dtype=torch.float32, device=out_dev)
    slicers = [
        tuple(slice(s, s + t) for s, t in zip(start, tile_size))
        for start in itertools.product(*tile_starts(padded, tile_size, step))
    ]
    batches = predict_tile_batches(
        image, predict_tiles, slicers, tile_batch=tile_batch, mirror_axes=mirror_axes,
        tile_conditions=tile_conditions, offset=[p // 2 for p in pad],
    )  # fmt: skip
    named = False
    for chunk, maps, is_named in batches:
        named = is_named
        for name, pred in maps.items():
            if name not in sums:
                channels = num_classes if name == "logits" and num_classes else pred.shape[1]
                sums[name] = torch.zeros((channels, *padded), dtype=torch.float32, device=out_dev)
            for sl, p in zip(chunk, pred.to(out_dev)):
                sums[name][(slice(None), *sl)] += p * weights
        for sl in chunk:
            norm[sl] += weights
        if progress:
            progress(len(chunk))
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pad, spatial))
    out = {name: (acc / norm)[(slice(None), *crop)] if any(pad) else acc / norm for name, acc in sums.items()}
    return out if named else out["logits"]
