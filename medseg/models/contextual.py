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

* ``points`` (B, 1, dims): the named image's position (its z, and the volume's centre in-plane), in
  the tile's voxel coordinates (a spatial condition: moved by augmentation and tiling like any
  point); the channel is a Gaussian band exp(-(z - z0)^2 / 2 sigma^2) along the first axis;
* ``suvmax`` (B,): the reported SUVmax; the channel is the PET relative to it,
  ``clip(PET / SUVmax, 0, 2)``: the named lesion peaks at 1, hotter distractors above it.

A fact that is NaN (a sentence without that number) gives a zero channel.

Inputs: ``model(x, text=None, text_mask=None, text_nonum=None, text_nonum_mask=None, points=None,
suvmax=None)``: ``text`` (B, L, D) token embeddings of the sentence from a frozen encoder,
``text_mask`` (B, L) True for real tokens, ``text_nonum``/``text_nonum_mask`` the same for the
sentence with its numbers removed (the paper's input). ``text_input`` (a model kwarg) says which the
network reads: ``"text"``, ``"text_nonum"`` or None (no attention modules: an image-only network,
with facts or not). Without the chosen text at call time the attention is skipped (the generated
model tests call ``model(x)``).
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


def fact_channels(x: torch.Tensor, points, suvmax, pet_channel: int, sigma: float) -> torch.Tensor:
    """(B, 2, *spatial): the slice band around ``points``' first coordinate and the PET relative to
    ``suvmax``; zeros where a fact is missing (None, or NaN: a sentence without that number)."""
    b, _, *spatial = x.shape
    out = x.new_zeros(b, 2, *spatial)
    ones = [1] * (len(spatial) - 1)
    if points is not None:
        z0 = points.reshape(b, -1)[:, 0].to(x.dtype)  # (B,)
        z = torch.arange(spatial[0], device=x.device, dtype=x.dtype)
        band = torch.exp(-((z[None] - z0[:, None]) ** 2) / (2 * sigma**2))  # (B, Z)
        out[:, 0] = torch.nan_to_num(band, nan=0.0).reshape(b, spatial[0], *ones)
    if suvmax is not None:
        ref = suvmax.reshape(b, *([1] * len(spatial))).to(x.dtype)
        rel = (x[:, pet_channel] / ref.clamp_min(1e-3)).clamp(0, 2)
        out[:, 1] = torch.where(torch.isnan(ref), torch.zeros_like(rel), rel)
    return out


class ContextualUNet(nn.Module):
    def __init__(
        self, in_channels: int, num_classes: int, *, text_dim: int = 384, attn_dim: int = 64,
        text_input: str | None = "text", facts: bool = True, pet_channel: int = 1, slice_sigma: float = 2.0,
        deep_supervision: bool = True, **unet,
    ):  # fmt: skip
        super().__init__()
        if text_input not in ("text", "text_nonum", None):
            raise ValueError(f"text_input must be 'text', 'text_nonum' or None, got {text_input!r}")
        self.text_input, self.facts, self.pet_channel, self.slice_sigma = text_input, facts, pet_channel, slice_sigma
        self.unet = UNet(in_channels + (2 if facts else 0), num_classes, deep_supervision=deep_supervision, **unet)
        widths = list(unet["features"])[:-1][::-1] if text_input else []  # after each upsampling, coarsest first
        self.text_attention = nn.ModuleList(TextCrossAttention(w, text_dim, attn_dim) for w in widths[:-1])

    def forward(self, x, text=None, text_mask=None, text_nonum=None, text_nonum_mask=None, points=None, suvmax=None):
        if self.text_input == "text_nonum":
            text, text_mask = text_nonum, text_nonum_mask
        if self.facts:
            x = torch.cat([x, fact_channels(x, points, suvmax, self.pet_channel, self.slice_sigma)], 1)
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
    strides=None, kernel_sizes=None, text_dim: int = 384, attn_dim: int = 64, text_input: str | None = "text",
    facts: bool = True, pet_channel: int = 1, slice_sigma: float = 2.0, text_encoder: str = "minilm", **unet,
) -> ContextualUNet:  # fmt: skip
    """The plan's U-Net with text cross-attention after the upsampling of every decoder level but the
    finest; ``text_dim``: the sentence encoder's hidden size (384: all-MiniLM-L6-v2); ``text_input``:
    ``text`` | ``text_nonum`` (numbers removed) | None; ``facts``: two extra input channels from the
    parsed slice and SUVmax; ``pet_channel``: which input is the PET; ``text_encoder``: the encoder the
    conditions were made with (recorded for inference, not used by the network)."""
    return ContextualUNet(
        in_channels, num_classes, text_dim=text_dim, attn_dim=attn_dim, text_input=text_input, facts=facts,
        pet_channel=pet_channel, slice_sigma=slice_sigma, deep_supervision=deep_supervision, spatial_dims=spatial_dims,
        **unet_topology(spatial_dims, features, strides, kernel_sizes), **unet,
    )  # fmt: skip
