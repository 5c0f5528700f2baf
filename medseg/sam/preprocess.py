"""MedSAM / LiteMedSAM pre- and post-processing, as the official inference does it (pure functions).

1. intensities to 0..255 (:func:`to_display_range`): 8-bit images as they are, CT through a window
   (MedSAM: clip to the window, rescale), other images clipped to their 0.5-99.5th percentiles;
2. grey to three identical channels; resize so the longest side is 256 (area averaging when shrinking,
   as ``cv2.INTER_AREA``), rounded to uint8;
3. min-max to [0, 1] over the whole image, zero-padded bottom/right to 256 x 256;
4. boxes scaled by 256 / max(H, W); the 256 x 256 logits cropped to the resized extent and resized
   bilinearly to the input size; mask = logit > 0 (sigmoid > 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Resized:
    """How an image of ``original`` (H, W) sits in the network's square input."""

    original: tuple[int, int]
    resized: tuple[int, int]
    size: int

    @property
    def scale(self) -> float:
        return self.size / max(self.original)


def to_display_range(image: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """(H, W) or (H, W, 3) intensities -> float32 in 0..255."""
    x = np.asarray(image, dtype=np.float32)
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
    elif image.dtype == np.uint8:
        return x
    else:
        finite = x[np.isfinite(x)]
        lo, hi = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
    if not hi > lo:
        return np.zeros_like(x)
    return (np.clip(x, lo, hi) - lo) / (hi - lo) * 255.0


def resized_shape(shape: tuple[int, int], size: int = 256) -> tuple[int, int]:
    """MedSAM's ``resize_longest_side`` target (H', W'): round-half-up of shape * size / max(shape)."""
    scale = size / max(shape)
    return int(shape[0] * scale + 0.5), int(shape[1] * scale + 0.5)


def _resize_channel(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    shrink = hw[0] < x.shape[0] or hw[1] < x.shape[1]
    im = Image.fromarray(x.astype(np.float32), mode="F")
    out = im.resize((hw[1], hw[0]), Image.BOX if shrink else Image.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def prepare_image(image: np.ndarray, size: int = 256, window=None) -> tuple[torch.Tensor, Resized]:
    """(H, W) grey or (H, W, 3) RGB image -> (3, size, size) float32 tensor in [0, 1] and its placement."""
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {image.shape}")
    x = to_display_range(image, window)
    rgb = np.repeat(x[..., None], 3, axis=2) if x.ndim == 2 else x
    hw = resized_shape(rgb.shape[:2], size)
    chans = [np.clip(np.rint(_resize_channel(rgb[..., c], hw)), 0, 255) for c in range(3)]
    arr = np.stack(chans)  # (3, h, w), uint8 values as the official pipeline holds them
    arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-8)
    out = torch.zeros(3, size, size)
    out[:, : hw[0], : hw[1]] = torch.from_numpy(arr.astype(np.float32))
    return out, Resized((int(image.shape[0]), int(image.shape[1])), hw, size)


def scale_boxes(boxes: np.ndarray, placement: Resized) -> torch.Tensor:
    """(P, 4) x0 y0 x1 y1 in input pixels -> network pixels."""
    return torch.as_tensor(np.asarray(boxes, dtype=np.float32) * placement.scale)


def logits_to_input(logits: torch.Tensor, placement: Resized, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(P, 1, S, S) network logits -> (P, H, W) float32 logits at the input size (or ``size``: the
    input's extent on another pixel grid, e.g. half or twice its resolution)."""
    h, w = placement.resized
    crop = logits[:, :, :h, :w].float()
    out = tuple(size) if size is not None else placement.original
    return F.interpolate(crop, size=out, mode="bilinear", align_corners=False)[:, 0]
