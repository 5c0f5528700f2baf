"""Intensity normalisation per channel: nnU-Net's schemes and more, selected by name in the plan.

A scheme is ``fn(x, norm, mask) -> x`` on one float32 channel (a fresh copy it may change in
place), ``norm`` the channel's :class:`~medseg.planning.plan.Normalization` (its fields are the
scheme's parameters) and ``mask`` the non-zero region of the case (or None). Register another with
``@register_normalization("name")``; a plan names it per channel, e.g.
``{"scheme": "range", "clip_low": 0, "clip_high": 10}`` for PET SUV 0-10.
"""

from __future__ import annotations

import numpy as np

from medseg.planning.plan import Normalization
from medseg.registry import Registry

NORMALIZATIONS = Registry("normalisation scheme")
register_normalization = NORMALIZATIONS.register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@register_normalization("ct")
def ct(x: np.ndarray, norm: Normalization, mask) -> np.ndarray:
    """Clip to the dataset-wide foreground 0.5/99.5 percentiles, subtract the dataset mean, divide by
    its std (nnU-Net's CTNormalization)."""
    np.clip(x, norm.clip_low, norm.clip_high, out=x)
    x -= norm.mean
    x /= max(norm.std, 1e-8)
    return x


@register_normalization("zscore")
def zscore(x: np.ndarray, norm: Normalization, mask) -> np.ndarray:
    """Per-case mean/std, inside the non-zero mask if ``use_mask`` (outside set to 0)."""
    region = mask if (norm.use_mask and mask is not None) else None
    vals = x[region] if region is not None else x
    mean, std = float(vals.mean()) if vals.size else 0.0, float(vals.std()) if vals.size else 1.0
    x -= mean
    x /= max(std, 1e-8)
    if region is not None:
        x[~region] = 0
    return x


@register_normalization("range")
def fixed_range(x: np.ndarray, norm: Normalization, mask) -> np.ndarray:
    """Clip to the fixed window [clip_low, clip_high] and scale it to [0, 1] (PET SUV 0-10, a CT
    window such as -150..250 HU)."""
    lo, hi = norm.clip_low, norm.clip_high
    if lo is None or hi is None or not hi > lo:
        raise ValueError(f"normalisation 'range' needs clip_low < clip_high, got {lo}, {hi}")
    np.clip(x, lo, hi, out=x)
    x -= lo
    x /= hi - lo
    return x


@register_normalization("minmax")
def minmax(x: np.ndarray, norm: Normalization, mask) -> np.ndarray:
    """Per-case min-max to [0, 1] over the whole channel (a constant channel becomes 0): the input
    range of Segment-Anything models (LiteMedSAM, I-MedSAM), as MedSAM's preprocessing scales each
    image. Volumes are scaled as a whole, not slice by slice."""
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    x -= lo
    if hi > lo:
        x /= hi - lo
    return x


@register_normalization("imagenet")
def imagenet(x: np.ndarray, norm: Normalization, mask) -> np.ndarray:
    """Scale 0..255 to 0..1, then subtract ``mean`` and divide by ``std`` (the ImageNet statistics
    of the channel, :func:`imagenet_normalization`), for encoders pretrained on natural images."""
    if norm.mean is None or norm.std is None:
        raise ValueError("normalisation 'imagenet' needs the channel's mean and std")
    x /= 255.0
    x -= norm.mean
    x /= max(norm.std, 1e-8)
    return x


@register_normalization("none")
def none(x: np.ndarray, norm: Normalization, mask) -> np.ndarray:
    """Intensities as stored."""
    return x


def imagenet_normalization(num_channels: int = 3) -> tuple[Normalization, ...]:
    """Per-channel ImageNet schemes (RGB; a single grey channel gets the mean of the three)."""
    if num_channels == 1:
        return (Normalization("imagenet", mean=float(np.mean(IMAGENET_MEAN)), std=float(np.mean(IMAGENET_STD))),)
    if num_channels != 3:
        raise ValueError(f"ImageNet normalisation is defined for 1 or 3 channels, not {num_channels}")
    return tuple(Normalization("imagenet", mean=m, std=s) for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))


def normalize_channel(x: np.ndarray, norm: Normalization, mask: np.ndarray | None = None) -> np.ndarray:
    """Normalise one channel (float32 out) with its scheme."""
    return NORMALIZATIONS.get(norm.scheme)(x.astype(np.float32, copy=True), norm, mask)


def normalize(image: np.ndarray, schemes, mask: np.ndarray | None = None) -> np.ndarray:
    """Normalise a (C, *spatial) image channel by channel."""
    return np.stack([normalize_channel(image[c], schemes[c], mask) for c in range(image.shape[0])])
