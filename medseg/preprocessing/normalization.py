"""Intensity normalisation per channel, following nnU-Net's schemes."""

from __future__ import annotations

import numpy as np

from medseg.planning.plan import Normalization


def normalize_channel(x: np.ndarray, norm: Normalization, mask: np.ndarray | None = None) -> np.ndarray:
    """Normalise one channel (float32 out).

    ``ct``: clip to dataset-wide foreground percentiles, subtract dataset mean, divide by std.
    ``zscore``: per-case mean/std, inside ``mask`` if ``norm.use_mask`` (outside set to 0).
    """
    x = x.astype(np.float32, copy=True)
    if norm.scheme == "ct":
        np.clip(x, norm.clip_low, norm.clip_high, out=x)
        x -= norm.mean
        x /= max(norm.std, 1e-8)
        return x
    if norm.scheme == "zscore":
        region = mask if (norm.use_mask and mask is not None) else None
        vals = x[region] if region is not None else x
        mean, std = float(vals.mean()) if vals.size else 0.0, float(vals.std()) if vals.size else 1.0
        x -= mean
        x /= max(std, 1e-8)
        if region is not None:
            x[~region] = 0
        return x
    if norm.scheme == "none":
        return x
    raise ValueError(f"unknown normalisation scheme {norm.scheme!r}")


def normalize(image: np.ndarray, schemes, mask: np.ndarray | None = None) -> np.ndarray:
    """Normalise a (C, *spatial) image channel by channel."""
    return np.stack([normalize_channel(image[c], schemes[c], mask) for c in range(image.shape[0])])
