"""Frozen LiteMedSAM image embeddings of every slice of a volume (SAMDA's "generic" component).

Each slice along axis 0 of the preprocessed array (the axis a ``2d`` configuration slices) goes
through MedSAM's own preprocessing (:func:`medseg.sam.preprocess.prepare_image`: intensities to 0..255
through the volume's 0.5-99.5th percentile window, so every slice of a case shares one window; longest
side resized to the encoder's input; min-max; zero padding), then the frozen TinyViT encoder. The part
of the (256, S/4, S/4) embedding that covers the slice is resampled to the slice's voxel grid and
averaged into cells of ``stride`` voxels: a :class:`~medseg.data.derived.DenseMap` of
(256, D, ceil(H/stride), ceil(W/stride)) with stride (1, stride, stride).

``input_size`` is the encoder's square input. LiteMedSAM was trained at 256; its TinyViT weights do not
depend on the resolution, so a smaller input (128) runs the same network about 6x faster on a CPU,
which suits small slices (a 50 x 35 hippocampus slice is blown up 5x at 256, 2.6x at 128).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medseg.data.derived import DenseMap, register_derived_input

_ENCODERS: dict[tuple, torch.nn.Module] = {}


def frozen_encoder(weights: str, input_size: int, device) -> torch.nn.Module:
    """LiteMedSAM's TinyViT at ``input_size``, weights of ``weights`` (``litemedsam`` or a model
    folder), BatchNorm folded, channels-last, eval; built once per process."""
    key = (str(weights), int(input_size), str(device))
    if key not in _ENCODERS:
        with torch.inference_mode(False):  # normal tensors even when first asked for inside inference mode
            _ENCODERS[key] = _build_encoder(weights, input_size, device)
    return _ENCODERS[key]


def _build_encoder(weights: str, input_size: int, device) -> torch.nn.Module:
    from medseg.io.checkpoint import load_spec
    from medseg.models.sam.tinyvit import TinyViT
    from medseg.sam.weights import read_base_weights, resolve_sam_model

    folder = resolve_sam_model(weights)
    arch = load_spec(folder).model_kwargs
    enc = TinyViT(int(input_size), 3, arch["embed_dims"], arch["depths"], arch["num_heads"], arch["window_sizes"])
    prefix = "image_encoder."
    state = {k[len(prefix) :]: v for k, v in read_base_weights(str(folder)).items() if k.startswith(prefix)}
    enc.load_state_dict(state)
    enc.eval().fuse_batchnorm()
    return enc.to(device, memory_format=torch.channels_last).requires_grad_(False)


def volume_window(volume: np.ndarray) -> tuple[float, float]:
    finite = volume[np.isfinite(volume)]
    if not finite.size:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    return float(lo), float(hi)


def _slice_inputs(slices: np.ndarray, size: int, window) -> tuple[torch.Tensor, tuple[int, int]]:
    from medseg.sam.preprocess import prepare_image

    prepared = [prepare_image(s, size, window) for s in slices]
    return torch.stack([p[0] for p in prepared]), prepared[0][1].resized


def _to_cells(emb: torch.Tensor, resized, shape, stride: int) -> torch.Tensor:
    """(B, C, g, g) embeddings -> (B, C, ceil(H/s), ceil(W/s)) cell means over the slice's voxels."""
    g = emb.shape[-1]
    size = g * 4  # the encoder's input (TinyViT embeddings are 1/4 of it)
    valid = emb[:, :, : -(-resized[0] * g // size), : -(-resized[1] * g // size)].float()
    # the valid cells cover resized / size of the frame, slightly more than the slice (rounding up)
    cover = (valid.shape[2] * size / g / resized[0], valid.shape[3] * size / g / resized[1])
    fine = F.interpolate(valid, size=(round(shape[0] * cover[0]), round(shape[1] * cover[1])), mode="bilinear")
    fine = fine[:, :, : shape[0], : shape[1]]
    cells = (-(-shape[0] // stride), -(-shape[1] // stride))
    pad = (0, cells[1] * stride - shape[1], 0, cells[0] * stride - shape[0])
    total = F.avg_pool2d(F.pad(fine, pad), stride, divisor_override=1)
    count = F.avg_pool2d(F.pad(torch.ones_like(fine[:1, :1]), pad), stride, divisor_override=1)
    return total / count


@register_derived_input("sam_embedding")
def sam_slice_embeddings(
    data: np.ndarray, *, device="cpu", weights: str = "litemedsam", input_size: int = 256, stride: int = 4,
    channel: int = 0, batch: int = 8, amp: bool | None = None,
) -> DenseMap:  # fmt: skip
    """(C, D, H, W) preprocessed array -> the frozen LiteMedSAM embedding of each of its D slices,
    (256, D, ceil(H/stride), ceil(W/stride)) float16 in cells of ``stride`` voxels."""
    from medseg.utils import autocast_context, autocast_dtype, resolve_device

    device = resolve_device(device) if isinstance(device, str) else device
    volume = np.asarray(data[channel], dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"sam_embedding needs a (C, D, H, W) array, got shape {tuple(data.shape)}")
    enc = frozen_encoder(weights, input_size, device)
    window = volume_window(volume)
    dtype = autocast_dtype(device, amp)
    out = []
    with torch.inference_mode(), autocast_context(device, dtype):
        for i in range(0, volume.shape[0], batch):
            x, resized = _slice_inputs(volume[i : i + batch], int(input_size), window)
            emb = enc(x.to(device).contiguous(memory_format=torch.channels_last))
            out.append(_to_cells(emb, resized, volume.shape[1:], int(stride)).to(torch.float16).cpu())
    array = torch.cat(out).permute(1, 0, 2, 3).numpy()  # (C, D, h, w)
    return DenseMap(np.ascontiguousarray(array), (1, int(stride), int(stride)))
