"""Text-conditioned U-Net (ConTEXTual Net 3D: Huemann et al. 2025, arXiv 2502.00528), for 2D and 3D.

The nnU-Net U-Net on PET (+ CT) channels, with token-level cross-attention in the decoder: after each
transposed-convolution upsampling of the deeper levels (all but the finest, as the paper), every
voxel of the feature map attends to the sentence's projected token embeddings (one head), and the
attended text, through a tanh, multiplies the visual features: ``x * (1 + tanh(W_o attn))``, the
identity while ``W_o`` is zero at initialisation (the paper multiplies by the tanh output; the
``1 +`` keeps an untrained module from zeroing the features, this implementation's reading).

Attention is ``torch.nn.functional.scaled_dot_product_attention`` with the key-padding mask of the
sentence (padding tokens take no part), computed over chunks of voxels so memory stays bounded
(``chunk`` voxels x L tokens per step), whatever the feature map's size.

**Facts as channels** (``facts=True``): numbers are where text encoders are weakest, so the parsed
facts enter explicitly as two extra input channels built inside the network from the conditions:

* ``slice_point`` (B, 1, dims): the named image's position (its z, and the tile centre in-plane), in
  the tile's voxel coordinates (moved by augmentation and tiling like any point); the channel is a
  Gaussian band exp(-(z - z0)^2 / 2 sigma^2) along z, ``sigma`` in voxels;
* ``suvmax`` (B,): the reported SUVmax; the channel is the PET relative to it,
  ``clip(PET / SUVmax, 0, 2)``: the named lesion peaks at 1, hotter distractors above it.

Inputs: ``model(x, text=None, text_mask=None, slice_point=None, suvmax=None)``; ``text`` (B, L, D)
token embeddings of a frozen sentence encoder, ``text_mask`` (B, L) True for real tokens. Without
``text`` the attention modules are skipped (an image-only forward, used by the generated tests).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medseg.models.registry import register_model
from medseg.models.unet import UNet, permute_spatial, unet_topology


class TextCrossAttention(nn.Module):
    """Voxels attend to token embeddings (one head); tanh-gated multiplicative modulation."""

    def __init__(self, channels: int, text_dim: int, attn_dim: int = 64, chunk: int = 32768):
        super().__init__()
        self.q = nn.Linear(channels, attn_dim)
        self.k = nn.Linear(text_dim, attn_dim)
        self.v = nn.Linear(text_dim, attn_dim)
        self.out = nn.Linear(attn_dim, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.chunk = chunk

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        b, c, *spatial = x.shape
        voxels = x.flatten(2).transpose(1, 2)  # (B, V, C)
        k, v = self.k(text)[:, None], self.v(text)[:, None]  # (B, 1, L, d): one head
        mask = None if text_mask is None else text_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
        parts = []
        for start in range(0, voxels.shape[1], self.chunk):
            q = self.q(voxels[:, start : start + self.chunk])[:, None]
            parts.append(F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)[:, 0])
        gate = torch.tanh(self.out(torch.cat(parts, 1)))  # (B, V, C)
        return x * (1 + gate.transpose(1, 2).reshape(b, c, *spatial))


def fact_channels(x: torch.Tensor, slice_point, suvmax, pet_channel: int, sigma: float) -> torch.Tensor:
    """(B, 2, *spatial): the slice band around ``slice_point``'s z and the PET relative to ``suvmax``;
    zeros where a fact is missing (a sentence without that number)."""
    b, _, *spatial = x.shape
    out = x.new_zeros(b, 2, *spatial)
    if slice_point is not None:
        z0 = slice_point.reshape(b, -1)[:, 0].to(x.dtype)  # (B,)
        z = torch.arange(spatial[0], device=x.device, dtype=x.dtype)
        band = torch.exp(-((z[None] - z0[:, None]) ** 2) / (2 * sigma**2))  # (B, Z)
        out[:, 0] = band.reshape(b, spatial[0], *([1] * (len(spatial) - 1)))
    if suvmax is not None:
        ref = suvmax.reshape(b, *([1] * len(spatial))).to(x.dtype).clamp_min(1e-3)
        out[:, 1] = (x[:, pet_channel] / ref).clamp(0, 2)
    return out


class ContextualUNet(nn.Module):
    def __init__(
        self, in_channels: int, num_classes: int, *, text_dim: int = 384, attn_dim: int = 64,
        facts: bool = True, pet_channel: int = 1, slice_sigma: float = 2.0, deep_supervision: bool = True, **unet,
    ):  # fmt: skip
        super().__init__()
        self.facts, self.pet_channel, self.slice_sigma = facts, pet_channel, slice_sigma
        self.unet = UNet(in_channels + (2 if facts else 0), num_classes, deep_supervision=deep_supervision, **unet)
        widths = list(unet["features"])[:-1][::-1]  # after each upsampling, coarsest first
        self.text_attention = nn.ModuleList(TextCrossAttention(w, text_dim, attn_dim) for w in widths[:-1])

    def forward(self, x, text=None, text_mask=None, slice_point=None, suvmax=None):
        if self.facts:
            x = torch.cat([x, fact_channels(x, slice_point, suvmax, self.pet_channel, self.slice_sigma)], 1)
        order = self.unet.transpose
        if order is not None:  # the facts are built in the caller's axis order, then permuted with x
            x = permute_spatial(x, order)
        out = self._forward(x, text, text_mask)
        if order is not None:
            back = [order.index(i) for i in range(len(order))]
            out = [permute_spatial(o, back) for o in out] if isinstance(out, list) else permute_spatial(out, back)
        return out

    def _forward(self, x, text, text_mask):
        net = self.unet
        skips = []
        for stage in net.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        outputs = []
        for i, (up, dec, head) in enumerate(zip(net.upsample, net.decoder, net.heads)):
            x = up(x)
            if text is not None and i < len(self.text_attention):
                x = self.text_attention[i](x, text, text_mask)
            x = dec(torch.cat([x, skips.pop()], dim=1))
            if net.deep_supervision or head is net.heads[-1]:
                outputs.append(head(x))
        outputs.reverse()
        return outputs if net.deep_supervision else outputs[0]


@register_model(
    "contextual_unet",
    test_config={
        "features": [4, 8, 16],
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "kernel_sizes": [[3, 3, 3]] * 3,
        "spatial_dims": 3,
        "text_dim": 8,
        "attn_dim": 4,
        "pet_channel": 0,
    },
    description="ConTEXTual Net 3D: U-Net with token-level text cross-attention in the decoder, facts as channels",
    task="grounding",
    encoder=("unet.encoder",),
    head=("unet.heads",),
    backbone="unet",
)
def build_contextual_unet(
    in_channels: int, num_classes: int, *, spatial_dims: int = 3, deep_supervision: bool = True, features=None,
    strides=None, kernel_sizes=None, text_dim: int = 384, attn_dim: int = 64, facts: bool = True,
    pet_channel: int = 1, slice_sigma: float = 2.0, **unet,
) -> ContextualUNet:  # fmt: skip
    """The plan's U-Net with text cross-attention after the upsampling of every decoder level but the
    finest; ``text_dim``: the sentence encoder's hidden size (384: all-MiniLM-L6-v2); ``facts``: two
    extra input channels from the parsed slice and SUVmax; ``pet_channel``: which input is the PET."""
    return ContextualUNet(
        in_channels, num_classes, text_dim=text_dim, attn_dim=attn_dim, facts=facts, pet_channel=pet_channel,
        slice_sigma=slice_sigma, deep_supervision=deep_supervision, spatial_dims=spatial_dims,
        **unet_topology(spatial_dims, features, strides, kernel_sizes), **unet,
    )  # fmt: skip
