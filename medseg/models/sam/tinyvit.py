"""TinyViT image encoder as used by LiteMedSAM (Wu et al. 2022; Ma et al., MedSAM 2024), in plain PyTorch.

A 4-stage hierarchy on a 256 x 256 input: two 1x1 convolutions embed the pixels (stride 1), stage 0 is
MBConv blocks at full resolution, stages 1-3 are windowed self-attention blocks (with learned relative
position biases and a depthwise "local" convolution between attention and MLP), each stage but the last
ending with a patch merge (stride 2, except into the last stage). A neck maps the 64 x 64 grid to the
256-channel image embedding of the SAM mask decoder.

Parameter names follow the published checkpoints (``layers.1.blocks.0.attn.qkv.weight``,
``...conv1.c.weight`` + ``...conv1.bn.*``), so real LiteMedSAM weights load unchanged.
:meth:`TinyViT.fuse_batchnorm` folds every BatchNorm into its convolution for inference.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from medseg.models.sam.common import LayerNorm2d


class ConvBN(nn.Sequential):
    """Convolution without bias followed by BatchNorm (``c``, ``bn``); foldable into one conv."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, bn_init: float = 1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))
        nn.init.constant_(self.bn.weight, bn_init)
        nn.init.zeros_(self.bn.bias)

    @torch.no_grad()
    def fused(self) -> nn.Conv2d:
        conv, bn = self.c, self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        groups=conv.groups, bias=True)
        out.weight.copy_(conv.weight * scale[:, None, None, None])
        out.bias.copy_(bn.bias - bn.running_mean * scale)
        return out


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_chans, dim // 2), nn.GELU(), ConvBN(dim // 2, dim))

    def forward(self, x):
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU."""

    def __init__(self, dim: int, expand: float):
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim, bn_init=0.0)
        self.act = nn.GELU()

    def forward(self, x):
        y = self.act(self.conv2(self.act(self.conv1(x))))
        return self.act(x + self.conv3(y))


def tokens_to_grid(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens (B, H*W, C) -> (B, C, H, W) as a channels-last view (no copy): convolutions take that layout."""
    return x.view(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2)


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> tokens (B, H*W, C); a view when ``x`` is channels-last."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


class PatchMerging(nn.Module):
    """(B, C, H, W) or tokens -> tokens (B, H'W', C') through 1x1, depthwise 3x3 (stride), 1x1."""

    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int, stride: int):
        super().__init__()
        self.resolution = resolution
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x):
        if x.ndim == 3:
            x = tokens_to_grid(x, *self.resolution)
        return grid_to_tokens(self.conv3(self.act(self.conv2(self.act(self.conv1(x))))))


class WindowAttention(nn.Module):
    """Multi-head self-attention within a window, with one learned bias per head and (|dy|, |dx|) offset."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        points = list(itertools.product(range(window), range(window)))
        offsets: dict[tuple[int, int], int] = {}
        idx = [offsets.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offsets)) for a in points for b in points]
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer("attention_bias_idxs", torch.tensor(idx).view(len(points), len(points)), persistent=False)

    def bias(self, dtype) -> torch.Tensor:
        """(heads, N, N) relative position biases; outside training gathered once and kept until the
        parameter changes (its version counter: load_state_dict, EMA updates) or another dtype is asked."""
        if self.training:
            return self.attention_biases[:, self.attention_bias_idxs].to(dtype)
        key = (self.attention_biases._version, self.attention_biases.device, dtype)
        if getattr(self, "_bias_key", None) != key:
            self._bias = self.attention_biases[:, self.attention_bias_idxs].to(dtype).detach()
            self._bias_key = key
        return self._bias

    def forward(self, x):  # (B, N, C)
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        # explicit softmax attention: with a float mask, scaled_dot_product_attention takes its slow
        # generic path on CPU (mask checks, fills) for these 49- and 196-token windows
        attn = torch.baddbmm(self.bias(q.dtype).expand(b, -1, -1, -1).reshape(-1, n, n), (q * self.head_dim**-0.5).reshape(-1, n, self.head_dim),
                             k.reshape(-1, n, self.head_dim).transpose(1, 2))
        out = torch.bmm(attn.softmax(-1), v.reshape(-1, n, self.head_dim)).view(b, self.num_heads, n, self.head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.norm(x))))


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nH * nW, window², C), zero-padded bottom/right to whole windows."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    ph, pw = h + pad_h, w + pad_w
    x = x.view(b, ph // window, window, pw // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c), (ph, pw)


def window_merge(x: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int], batch: int):
    ph, pw = padded
    x = x.view(batch, ph // window, pw // window, window, window, -1).transpose(2, 3).reshape(batch, ph, pw, -1)
    return x[:, : size[0], : size[1]]


class TinyViTBlock(nn.Module):
    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, window: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):  # tokens (B, H*W, C)
        h, w = self.resolution
        b, n, c = x.shape
        if h == self.window and w == self.window:
            y = self.attn(x)
        else:
            windows, padded = window_partition(x.view(b, h, w, c), self.window)
            y = window_merge(self.attn(windows), self.window, padded, (h, w), b).reshape(b, n, c)
        x = x + y
        x = self.local_conv(tokens_to_grid(x, h, w))
        x = grid_to_tokens(x)
        return x + self.mlp(x)


class Stage(nn.Module):
    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """TinyViT-5M as configured by LiteMedSAM; ``forward`` returns the (B, 256, 64, 64) image embedding."""

    def __init__(self, img_size: int = 256, in_chans: int = 3, embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2),
                 num_heads=(2, 4, 5, 10), window_sizes=(7, 7, 14, 7), mlp_ratio: float = 4.0,
                 mbconv_expand_ratio: float = 4.0, out_chans: int = 256):
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        layers = []
        res = img_size
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            last = i == len(depths) - 1
            stride = 1 if i == len(depths) - 2 else 2  # no downsampling into the last stage
            down = None if last else PatchMerging((res, res), dim, embed_dims[i + 1], stride)
            if i == 0:
                blocks = [MBConv(dim, mbconv_expand_ratio) for _ in range(depth)]
            else:
                blocks = [TinyViTBlock(dim, (res, res), num_heads[i], window_sizes[i], mlp_ratio) for _ in range(depth)]
            layers.append(Stage(blocks, down))
            res = res if last else res // stride
        self.layers = nn.ModuleList(layers)
        self.grid = res
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, 1, bias=False), LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans),
        )

    def forward(self, x):
        x = self.layers[0](self.patch_embed(x))
        for layer in self.layers[1:]:
            x = layer(x)
        return self.neck(tokens_to_grid(x, self.grid, self.grid))

    @torch.no_grad()
    def fuse_batchnorm(self) -> TinyViT:
        """Fold every ConvBN into a single biased convolution (inference; the result no longer trains BN)."""
        for module in list(self.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, ConvBN):
                    setattr(module, child_name, child.fused())
        return self
