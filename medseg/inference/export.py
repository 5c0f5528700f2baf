"""Undo preprocessing: resample probabilities back to the cropped shape, un-crop, argmax."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medseg.io.image import label_dtype
from medseg.preprocessing.resampling import resample_probabilities


def probabilities_to_native(probs: torch.Tensor, props: dict, *, background: bool = True) -> np.ndarray:
    """(K, *preprocessed) probabilities -> (K, *original shape) numpy, background 1 outside the crop
    (``background=False``: 0 everywhere outside the crop, for continuous maps such as OOD scores).

    Resampling runs in torch (trilinear, on the prediction device) unless the data were
    anisotropic, where the separate-z rule needs the scipy path.
    """
    crop_shape = tuple(props["shape_after_crop"])
    if tuple(probs.shape[1:]) != crop_shape:
        if props.get("separate_z_axis") is None:
            mode = "trilinear" if probs.ndim == 4 else "bilinear"
            probs = F.interpolate(probs[None], size=crop_shape, mode=mode, align_corners=False)[0]
        else:
            probs = torch.from_numpy(
                resample_probabilities(probs.cpu().numpy(), crop_shape, separate_z_axis=props["separate_z_axis"])
            )
    probs = probs.cpu().numpy()
    full = tuple(props["original_shape"])
    out = np.zeros((probs.shape[0], *full), dtype=np.float32)
    if background:
        out[0] = 1.0
    sl = tuple(slice(a, b) for a, b in props["bbox"])
    out[(slice(None), *sl)] = probs
    return out


def segmentation_from_logits(
    logits: torch.Tensor, props: dict, *, return_probabilities: bool = False, interpolate: str = "probabilities"
):
    """Native-space label map (uint8, uint16 past 255 labels) and optionally probabilities (float32).

    ``interpolate="logits"`` resamples the logits and applies the softmax afterwards (nnU-Net v2's
    export); the default resamples probabilities. Outside the crop both give background.
    """
    if interpolate == "logits":
        native = probabilities_to_native(logits.float(), props)  # outside the crop: (1, 0, ...) -> background
        inside = (slice(None), *(slice(a, b) for a, b in props["bbox"]))
        native[inside] = torch.softmax(torch.from_numpy(native[inside]), 0).numpy()
    else:
        native = probabilities_to_native(torch.softmax(logits.float(), 0), props)
    seg = native.argmax(0)
    return seg.astype(label_dtype(native.shape[0] - 1)), (native if return_probabilities else None)


def to_input_grid(array, props: dict):
    """A label map (z, y, x) or probabilities (K, z, y, x) on the reoriented grid of ``props``
    -> the same voxels on the input's own grid (an exact axis permutation and flips; unchanged
    when the plan did not reorient). ``None`` passes through, so optional outputs need no test."""
    if array is None:
        return None
    from medseg.preprocessing.orientation import restore

    return restore(array, props.get("orientation"))


def map_to_native(values: torch.Tensor, props: dict) -> np.ndarray:
    """A continuous named map (K, *preprocessed) -> (K, *input grid): resampled like probabilities,
    0 outside the crop, back in the input's voxel order."""
    return to_input_grid(probabilities_to_native(values.float(), props, background=False), props)
