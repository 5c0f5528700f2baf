"""LeFusion's denoiser (Zhang et al., ICLR 2025): a 3D U-Net on (B, C, D, H, W) lesion ROIs that works
slice-wise in-plane and attends along depth, conditioned on the diffusion time and a lesion-intensity
histogram.

As the official code builds it (read, not copied; ``docs/synthesis.md`` says what is ours):

* every convolution is per slice (kernel 1 x k x k); downsampling halves H and W only, never depth;
* each level: two residual blocks (conv -> GroupNorm -> scale-shift by the time+condition embedding ->
  SiLU, then conv -> GroupNorm -> SiLU), in-plane linear attention over each slice and full attention
  along depth at each in-plane position (with a learned relative-position bias);
* the middle: residual block, full in-plane attention, depth attention, residual block;
* time: sinusoidal embedding -> MLP (width 4 x base); the histogram (``cond_dim`` bins, one per lesion
  class concatenated) is concatenated to it, as LeFusion does, and every residual block reads the
  result through its own linear scale-shift;
* output: the predicted noise, one channel per input channel (multi-channel decomposition: one channel
  per lesion class).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from medseg.models.registry import register_model


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) diffusion steps -> (B, dim) sinusoidal embedding (Transformer / DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


def _conv(cin: int, cout: int, k: int) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, (1, k, k), padding=(0, k // 2, k // 2))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int | None, groups: int):
        super().__init__()
        self.conv1, self.norm1 = _conv(cin, cout, 3), nn.GroupNorm(groups, cout)
        self.conv2, self.norm2 = _conv(cout, cout, 3), nn.GroupNorm(groups, cout)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout)) if emb_dim else None
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.norm1(self.conv1(x))
        if self.emb is not None and emb is not None:
            scale, shift = self.emb(emb)[:, :, None, None, None].chunk(2, dim=1)
            h = h * (scale + 1) + shift
        h = F.silu(h)
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class ChannelNorm(nn.Module):
    """LayerNorm over channels of (B, C, ...) with a gain (the pre-norm of the attention blocks).
    ``last``: the same on a tensor whose channels are its last axis (the attention blocks' own
    layout: one fused layer-norm kernel instead of a strided reduction over dim 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, dim, 1, 1, 1))

    def forward(self, x):
        return self.last(x.movedim(1, -1)).movedim(-1, 1)

    def last(self, y: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(y, y.shape[-1:], self.gain.flatten().to(y.dtype), None, 1e-5)


class SliceAttention(nn.Module):
    """Attention among the pixels of each slice: linear (softmax over keys' features, cost ~ H*W) or full."""

    def __init__(self, dim: int, heads: int, head_dim: int, linear: bool = True):
        super().__init__()
        self.heads, self.linear = heads, linear
        self.norm = ChannelNorm(dim)
        self.qkv = nn.Conv2d(dim, 3 * heads * head_dim, 1, bias=False)
        self.out = nn.Conv2d(heads * head_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        y = self.norm.last(x.permute(0, 2, 3, 4, 1).reshape(b * d, h * w, c))  # (N, hw, C), one copy
        qkv = F.linear(y, self.qkv.weight.flatten(1).to(y.dtype))  # the 1x1 convolution on (hw, C) rows
        q, k, v = qkv.reshape(b * d, h * w, 3, self.heads, -1).unbind(2)  # (N, hw, heads, e)
        if self.linear:  # softmax of q over its features (the last axis here), of k over the pixels
            q = q.softmax(dim=-1) * q.shape[-1] ** -0.5
            k = k.permute(0, 2, 3, 1).softmax(dim=-1)  # (N, heads, e, hw)
            ctx = torch.einsum("nhdp,nphe->nhde", k, v)
            o = torch.einsum("nhde,nphd->nphe", ctx, q)
        else:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        o = F.linear(o.reshape(b * d, h * w, -1), self.out.weight.flatten(1).to(o.dtype), self.out.bias.to(o.dtype))
        return x + o.reshape(b, d, h, w, c).permute(0, 4, 1, 2, 3)


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(e) + bias) v for (N, heads, d, e) and a (heads, d, d) bias, on short rows (depth).

    torch's SDPA with a float mask takes a slow math path here (bf16, 2-core AMX Xeon: 247 vs 22 ms at
    N 4096, d 32). Up to 16 rows the softmax written out is fastest (9.5 ms against 13.6 for torch's
    softmax kernel at N 4096, d 12); longer rows go through baddbmm + softmax in chunks of about 2^20
    scores, which keeps them in cache (the written-out form took 580 ms at d 32, unchunked)."""
    n, heads, d, e = q.shape
    if d <= 16:
        scores = (q @ k.transpose(-1, -2)) * e**-0.5 + bias
        ex = (scores - scores.amax(dim=-1, keepdim=True)).exp_()
        return (ex / ex.sum(dim=-1, keepdim=True)) @ v
    step = max(1, 2**20 // (heads * d * d))
    out = []
    for i in range(0, n, step):
        qi, ki, vi = (t[i : i + step].reshape(-1, d, e) for t in (q, k, v))
        b = bias.expand(qi.shape[0] // heads, heads, d, d).reshape(-1, d, d)
        scores = torch.baddbmm(b, qi, ki.transpose(-1, -2), alpha=e**-0.5)
        out.append((scores.softmax(dim=-1) @ vi).reshape(-1, heads, d, e))
    return torch.cat(out)


class DepthAttention(nn.Module):
    """Full attention along depth at every in-plane position, with a learned bias per head and
    relative offset (offsets beyond ``max_offset`` share the last bias)."""

    def __init__(self, dim: int, heads: int, head_dim: int, max_offset: int = 32):
        super().__init__()
        self.heads, self.max_offset = heads, max_offset
        self.norm = ChannelNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, dim)
        self.bias = nn.Parameter(torch.zeros(heads, 2 * max_offset + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        y = self.norm.last(x.permute(0, 3, 4, 2, 1).reshape(b * h * w, d, c))
        q, k, v = self.qkv(y).reshape(b * h * w, d, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        pos = torch.arange(d, device=x.device)
        rel = (pos[None] - pos[:, None]).clamp(-self.max_offset, self.max_offset) + self.max_offset
        o = biased_attention(q, k, v, self.bias[:, rel].to(q.dtype))
        o = self.out(o.transpose(1, 2).reshape(b * h * w, d, -1))
        return x + o.reshape(b, h, w, d, c).permute(0, 4, 3, 1, 2)


class Level(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, heads: int, head_dim: int):
        super().__init__()
        self.res1 = ResBlock(cin, cout, emb_dim, groups)
        self.res2 = ResBlock(cout, cout, emb_dim, groups)
        self.slice_attn = SliceAttention(cout, heads, head_dim)
        self.depth_attn = DepthAttention(cout, heads, head_dim)

    def forward(self, x, emb):
        return self.depth_attn(self.slice_attn(self.res2(self.res1(x, emb), emb)))


class LesionDiffusionUNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, *, base: int = 64, mults=(1, 2, 4, 8), cond_dim: int = 16,
                 groups: int = 8, heads: int = 8, head_dim: int = 32, extra_channels: int = 0,
                 hist_scale: float = 1.0):  # fmt: skip
        """``extra_channels``: inputs beside the noisy image that are not denoised (DiffMask's sphere).
        ``hist_scale``: the histogram's factor where it joins the embedding (1: LeFusion's raw histogram,
        bins summing to 1; the number of bins makes a flat histogram all ones, as large as the time
        embedding's entries)."""
        super().__init__()
        self.cond_dim, self.base, self.extra_channels = cond_dim, base, extra_channels
        self.hist_scale = float(hist_scale)
        self.input_channels = in_channels  # what forward's x has (one per lesion class), whatever the image has
        widths = [base * m for m in mults]
        emb_dim = 4 * base + cond_dim
        self.time_mlp = nn.Sequential(nn.Linear(base, 4 * base), nn.GELU(), nn.Linear(4 * base, 4 * base))
        self.stem = _conv(in_channels + extra_channels, base, 7)
        self.stem_attn = DepthAttention(base, heads, head_dim)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        cin = base
        for i, w in enumerate(widths):
            self.down.append(Level(cin, w, emb_dim, groups, heads, head_dim))
            last = i == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv3d(w, w, (1, 4, 4), (1, 2, 2), (0, 1, 1)))
            cin = w
        self.mid1 = ResBlock(cin, cin, emb_dim, groups)
        self.mid_attn = SliceAttention(cin, heads, head_dim, linear=False)
        self.mid_depth = DepthAttention(cin, heads, head_dim)
        self.mid2 = ResBlock(cin, cin, emb_dim, groups)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            below = widths[i - 1] if i > 0 else base
            self.up.append(Level(2 * w, below, emb_dim, groups, heads, head_dim))
            self.upsample.append(
                nn.ConvTranspose3d(below, below, (1, 4, 4), (1, 2, 2), (0, 1, 1)) if i > 0 else nn.Identity()
            )
        self.final = ResBlock(2 * base, base, None, groups)
        self.head = nn.Conv3d(base, out_channels, 1)
        self.in_plane_stride = 2 ** (len(widths) - 1)

    def embedding(self, timesteps: torch.Tensor, histogram: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        t = timesteps if timesteps is not None else torch.zeros(batch, device=device)
        t = t.reshape(-1).expand(batch) if t.numel() in (1, batch) else t
        emb = self.time_mlp(timestep_embedding(t.to(device), self.base))
        if self.cond_dim:
            h = histogram if histogram is not None else torch.zeros(batch, self.cond_dim, device=device)
            emb = torch.cat([emb, h.reshape(batch, -1).to(emb.dtype) * self.hist_scale], dim=1)
        return emb

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | None = None, histogram: torch.Tensor | None = None,
                extra: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """(B, C, D, H, W) noisy image (H, W multiples of ``in_plane_stride``) -> predicted noise.
        ``timesteps``: (B,) or a scalar (None: 0); ``histogram``: (B, cond_dim); ``extra``: the extra
        input channels."""
        emb = self.embedding(timesteps, histogram, x.shape[0], x.device)
        if self.extra_channels:
            extra = extra if extra is not None else x.new_zeros(x.shape[0], self.extra_channels, *x.shape[2:])
            x = torch.cat([x, extra.to(x.dtype)], dim=1)
        h = self.stem_attn(self.stem(x))
        stem, skips = h, []
        for level, down in zip(self.down, self.downsample):
            h = level(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid2(self.mid_depth(self.mid_attn(self.mid1(h, emb))), emb)
        for level, up in zip(self.up, self.upsample):
            h = up(level(torch.cat([h, skips.pop()], dim=1), emb))
        return self.head(self.final(torch.cat([h, stem], dim=1), None))


@register_model(
    "lefusion_unet",
    test_config={
        "base": 8,
        "mults": [1, 2],
        "cond_dim": 16,
        "groups": 4,
        "heads": 2,
        "head_dim": 8,
        "lesion_channels": 1,
        "input_size": [4, 16, 16],
    },  # fmt: skip
    description="LeFusion denoiser: per-slice 3D U-Net with depth attention, time + histogram conditioning",
    task="lesion_diffusion",
    spatial_dims=(3,),
    encoder=("down", "downsample", "stem", "stem_attn"),
    head=("head",),
)
def build_lefusion_unet(in_channels: int = 1, num_classes: int = 2, *, spatial_dims: int = 3, deep_supervision=False,
                        base: int = 16, mults=(1, 2, 4), cond_dim: int = 16, groups: int = 8, heads: int = 4,
                        head_dim: int = 16, extra_channels: int = 0, lesion_channels: int | None = None,
                        hist_scale: float = 1.0) -> LesionDiffusionUNet:  # fmt: skip
    """The CPU-sized default (base 16, mults 1-2-4; LeFusion's own: base 64, mults 1-2-4-8, heads 8 x 32).
    Multi-channel decomposition: one noisy image and one noise channel per lesion class
    (``lesion_channels``, default ``num_classes - 1``) of a single-channel image; the histogram
    condition has ``cond_dim`` bins per class, multiplied by ``hist_scale`` (medseg's recipe: 16, see
    docs/synthesis.md; 1 keeps LeFusion's raw histogram)."""
    if spatial_dims != 3:
        raise ValueError("lefusion_unet is a 3D model (depth first: D, H, W)")
    if in_channels != 1:
        raise ValueError(f"lefusion_unet synthesises single-channel images, got {in_channels} channels")
    k = lesion_channels or max(num_classes - 1, 1)
    return LesionDiffusionUNet(k, k, base=base, mults=tuple(mults), cond_dim=cond_dim * k, groups=groups,
                               heads=heads, head_dim=head_dim, extra_channels=extra_channels,
                               hist_scale=hist_scale)  # fmt: skip


@register_model(
    "diffmask_unet",
    test_config={"base": 8, "mults": [1, 2], "groups": 4, "heads": 2, "head_dim": 8, "input_size": [4, 16, 16]},
    description="DiffMask: the LeFusion denoiser on lesion masks, conditioned on an enclosing sphere",
    task="mask_diffusion",
    spatial_dims=(3,),
    encoder=("down", "downsample", "stem", "stem_attn"),
    head=("head",),
)
def build_diffmask_unet(in_channels: int = 1, num_classes: int = 2, *, spatial_dims: int = 3, deep_supervision=False,
                        base: int = 16, mults=(1, 2, 4), groups: int = 8, heads: int = 4,
                        head_dim: int = 16) -> LesionDiffusionUNet:  # fmt: skip
    """One mask channel (all lesion classes), the sphere as an extra input, no histogram."""
    if spatial_dims != 3:
        raise ValueError("diffmask_unet is a 3D model (depth first: D, H, W)")
    return LesionDiffusionUNet(1, 1, base=base, mults=tuple(mults), cond_dim=0, groups=groups, heads=heads,
                               head_dim=head_dim, extra_channels=1)  # fmt: skip
