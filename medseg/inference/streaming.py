"""Memory-bounded prediction for large volumes: sliding window and export streamed along z.

The plain path holds the logits of every class for the whole volume, then the softmax, then the
probabilities resampled to the native grid: for a 512x512x900 CT and 118 classes that is far more
than 100 GB. Here tiles are visited in order of their z start; once every tile that can touch a
slice has been added, the slice is final, is normalised, turned into probabilities, resampled to
the native grid (bilinear in-plane, then linear — or nearest for thick-slice data — along z, the
same separable mapping as ``F.interpolate(..., align_corners=False)``) and reduced to labels at
once. Peak memory is one tile-height slab of logits plus two native probability slices, whatever
the volume's length. Results equal the plain path up to float rounding
(``tests/test_streaming.py``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from medseg.inference.sliding_window import importance_weights, pad_to_tile, predict_tile_batches, tile_starts
from medseg.io.image import label_dtype


class _NativeExporter:
    """Receives final preprocessed probability slices in z order; writes native label slices."""

    def __init__(self, props: dict, num_classes: int, device, z_mode: str):
        self.crop = [int(s) for s in props["shape_after_crop"]]
        self.pre = [int(s) for s in props["shape_after_resampling"]]
        self.bbox = [tuple(b) for b in props["bbox"]]
        full = tuple(int(s) for s in props["original_shape"])
        self.seg = np.zeros(full, dtype=label_dtype(num_classes - 1))
        self.z_mode, self.device = z_mode, device
        self.slices: dict[int, torch.Tensor] = {}  # preprocessed z index -> in-plane-resampled probs
        self.next_native = 0
        self.scale = self.pre[0] / self.crop[0]

    def _source(self, j: int) -> tuple[int, int, float]:
        c = max((j + 0.5) * self.scale - 0.5, 0.0)
        if self.z_mode == "nearest":
            i = min(int(math.floor(c + 0.5)), self.pre[0] - 1)
            return i, i, 0.0
        i0 = min(int(math.floor(c)), self.pre[0] - 1)
        return i0, min(i0 + 1, self.pre[0] - 1), c - i0

    def push(self, z: int, probs: torch.Tensor) -> None:
        """``probs``: (K, y, x) probabilities of preprocessed slice ``z``."""
        if tuple(probs.shape[1:]) != tuple(self.crop[1:]):
            probs = F.interpolate(probs[None], size=self.crop[1:], mode="bilinear", align_corners=False)[0]
        self.slices[z] = probs
        (z0, _), (y0, y1), (x0, x1) = self.bbox
        while self.next_native < self.crop[0]:
            i0, i1, w = self._source(self.next_native)
            if i1 > z:
                break
            p = self.slices[i0] if w == 0.0 else torch.lerp(self.slices[i0], self.slices[i1], w)
            self.seg[z0 + self.next_native, y0:y1, x0:x1] = p.argmax(0).cpu().numpy()
            self.next_native += 1
        keep = self._source(self.next_native)[0] if self.next_native < self.crop[0] else z + 1
        for k in [k for k in self.slices if k < keep]:
            del self.slices[k]


def streaming_segmentation(
    image: torch.Tensor,
    predict_tiles: Callable[[torch.Tensor], torch.Tensor],
    tile_size,
    num_classes: int,
    props: dict,
    *,
    step: float = 0.5,
    mirror_axes=(),
    tile_batch: int = 1,
    progress: Callable[[int], None] | None = None,
    numerics: str = "medseg",
) -> np.ndarray:
    """Native-geometry label map for a preprocessed (C, z, y, x) image, streamed along z.

    ``numerics="nnunet"``: nnU-Net's Gaussian, and logits (not probabilities) are resampled to the
    native grid before the argmax, as nnU-Net v2 exports."""
    axis = props.get("separate_z_axis")
    if axis not in (None, 0):
        raise ValueError("streaming export supports thick slices only along the first axis")
    device = image.device
    spatial = image.shape[1:]
    tile = tuple(int(t) for t in tile_size)
    image, pad = pad_to_tile(image, tile)
    padded = image.shape[1:]
    offset = [p // 2 for p in pad]  # padded coordinate of preprocessed voxel 0
    weights = importance_weights(tile, numerics, device=device)
    zs, ys, xs = tile_starts(padded, tile, step)
    exporter = _NativeExporter(props, num_classes, device, "nearest" if axis == 0 else "linear")
    buf = torch.zeros((num_classes, tile[0], *padded[1:]), dtype=torch.float32, device=device)
    norm = torch.zeros((tile[0], *padded[1:]), dtype=torch.float32, device=device)
    base = 0  # padded z of buf[:, 0]
    for k, z in enumerate(zs):
        slicers = [(slice(z, z + tile[0]), slice(y, y + tile[1]), slice(x, x + tile[2]))
                   for y, x in itertools.product(ys, xs)]  # fmt: skip
        batches = predict_tile_batches(image, predict_tiles, slicers, tile_batch=tile_batch, mirror_axes=mirror_axes)
        for chunk, maps, _ in batches:
            for sl, p in zip(chunk, maps["logits"]):
                local = (slice(sl[0].start - base, sl[0].stop - base), sl[1], sl[2])
                buf[(slice(None), *local)] += p * weights
                norm[local] += weights
            if progress:
                progress(len(chunk))
        final_to = zs[k + 1] if k + 1 < len(zs) else padded[0]  # no later tile reaches below this
        n = final_to - base
        if n <= 0:
            continue
        ylo, xlo = offset[1], offset[2]
        for d in range(n):
            zp = base + d - offset[0]
            if 0 <= zp < spatial[0]:
                logits = (
                    buf[:, d, ylo : ylo + spatial[1], xlo : xlo + spatial[2]]
                    / norm[d, ylo : ylo + spatial[1], xlo : xlo + spatial[2]]
                )
                exporter.push(zp, logits if numerics == "nnunet" else torch.softmax(logits, 0))
        buf = torch.cat([buf[:, n:], torch.zeros_like(buf[:, :n])], 1)
        norm = torch.cat([norm[n:], torch.zeros_like(norm[:n])], 0)
        base = final_to
    return exporter.seg
