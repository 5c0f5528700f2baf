"""STU-Net (Huang et al. 2023): a residual nnU-Net scaled to 1.4 B parameters, pre-trained on TotalSegmentator.

Architecture, as released in uni-medical/STU-Net (``nnunet/network_architecture/STUNet.py``):

* six stages; each is ``depth`` residual blocks (3x3x3 conv-IN-LReLU, conv-IN, + skip, LReLU). The first
  block of every stage (encoder and decoder) has a 1x1 projection on its skip and, in the encoder,
  downsamples with its stride;
* weight-free upsampling: nearest-neighbour interpolation then a 1x1 conv that halves the channels, so
  no transposed-conv weights depend on the patch topology and the head is just ``seg_outputs``;
* a 1x1 head on every decoder stage (kept even without deep supervision so checkpoints always load).

Module names follow the official code (``conv_blocks_context``, ``upsample_layers``,
``conv_blocks_localization``, ``seg_outputs``; blocks ``conv1/norm1/conv2/norm2/conv3``), so a released
checkpoint's ``state_dict`` loads with ``load_state_dict`` unchanged. See docs/models.md.

Official sizes (1 input channel, 105 classes, 128^3 patch): S 14.6 M, B 58.26 M, L 440.30 M, H 1457.33 M
parameters. The FLOPs the paper quotes (0.13/0.51/3.81/12.60 T) are multiply-accumulates (MACs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medseg.models.norms import InstanceNorm2d, InstanceNorm3d
from medseg.models.registry import register_model

# The official presets (STUNetTrainer_small/base/large/huge): widths per stage and blocks per stage.
PRESETS: dict[str, dict] = {
    "stunet_s": {"features": (16, 32, 64, 128, 256, 256), "blocks_per_stage": (1,) * 6},
    "stunet_b": {"features": (32, 64, 128, 256, 512, 512), "blocks_per_stage": (1,) * 6},
    "stunet_l": {"features": (64, 128, 256, 512, 1024, 1024), "blocks_per_stage": (2,) * 6},
    "stunet_h": {"features": (96, 192, 384, 768, 1536, 1536), "blocks_per_stage": (3,) * 6},
}
_TEST_CONFIG = {
    "features": [2, 4, 8, 8],
    "blocks_per_stage": [1, 2, 1, 1],
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
    "spatial_dims": 3,
}


def _ops(dim: int):
    if dim == 3:
        return nn.Conv3d, InstanceNorm3d
    if dim == 2:
        return nn.Conv2d, InstanceNorm2d
    raise ValueError(f"spatial_dims must be 2 or 3, got {dim}")


class BasicResBlock(nn.Module):
    """conv-IN-LReLU, conv-IN, add the (optionally 1x1-projected, strided) input, LReLU."""

    def __init__(self, dim: int, cin: int, cout: int, kernel, stride=1, project: bool = False):
        super().__init__()
        conv, norm = _ops(dim)
        pad = [k // 2 for k in kernel]
        self.conv1 = conv(cin, cout, kernel, stride=stride, padding=pad)
        self.norm1 = norm(cout, affine=True)
        self.act1 = nn.LeakyReLU(0.01, inplace=True)
        self.conv2 = conv(cout, cout, kernel, padding=pad)
        self.norm2 = norm(cout, affine=True)
        self.act2 = nn.LeakyReLU(0.01, inplace=True)
        self.conv3 = conv(cin, cout, 1, stride=stride) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(y + (self.conv3(x) if self.conv3 is not None else x))


def _stage(dim: int, cin: int, cout: int, kernel, stride, n_blocks: int) -> nn.Sequential:
    return nn.Sequential(
        BasicResBlock(dim, cin, cout, kernel, stride, project=True),
        *[BasicResBlock(dim, cout, cout, kernel) for _ in range(n_blocks - 1)],
    )


class UpsampleLayer(nn.Module):
    """Nearest-neighbour upsampling to the skip's size, then a 1x1 conv (the official ``mode='nearest'``)."""

    def __init__(self, dim: int, cin: int, cout: int):
        super().__init__()
        self.conv = _ops(dim)[0](cin, cout, kernel_size=1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        # Interpolating to the skip's size equals the official scale_factor=stride on divisible patches.
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class STUNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        features: Sequence[int],
        blocks_per_stage: Sequence[int],
        strides,
        kernel_sizes,
        spatial_dims: int = 3,
        deep_supervision: bool = True,
    ):
        super().__init__()
        n = len(features)
        if not (len(blocks_per_stage) == len(strides) == len(kernel_sizes) == n) or n < 2:
            raise ValueError("features, blocks_per_stage, strides and kernel_sizes need one entry per stage (>= 2)")
        if any(s != 1 for s in strides[0]):
            raise ValueError(f"STU-Net's first stage does not downsample; got strides[0]={list(strides[0])}")
        dim = spatial_dims
        self.deep_supervision = deep_supervision
        self.conv_blocks_context = nn.ModuleList()
        cin = in_channels
        for f, s, k, b in zip(features, strides, kernel_sizes, blocks_per_stage):
            self.conv_blocks_context.append(_stage(dim, cin, f, k, s, b))
            cin = f
        self.upsample_layers = nn.ModuleList()
        self.conv_blocks_localization = nn.ModuleList()
        self.seg_outputs = nn.ModuleList()
        conv = _ops(dim)[0]
        for i in range(n - 2, -1, -1):  # decoder runs from the bottleneck up; stage i mirrors encoder stage i
            self.upsample_layers.append(UpsampleLayer(dim, features[i + 1], features[i]))
            self.conv_blocks_localization.append(
                _stage(dim, 2 * features[i], features[i], kernel_sizes[i], 1, blocks_per_stage[i])
            )
            self.seg_outputs.append(conv(features[i], num_classes, kernel_size=1))
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor):
        skips = []
        for stage in self.conv_blocks_context[:-1]:
            x = stage(x)
            skips.append(x)
        x = self.conv_blocks_context[-1](x)
        outputs = []
        last = len(self.conv_blocks_localization) - 1
        for u, (up, block, head) in enumerate(
            zip(self.upsample_layers, self.conv_blocks_localization, self.seg_outputs)
        ):
            skip = skips.pop()
            x = block(torch.cat([up(x, skip.shape[2:]), skip], dim=1))
            if self.deep_supervision or u == last:
                outputs.append(head(x))
        outputs.reverse()
        return outputs if self.deep_supervision else outputs[0]


def _init_weights(m: nn.Module) -> None:
    """He-normal for LeakyReLU(0.01), zero bias: nnU-Net's InitWeights_He(1e-2), as in the official code."""
    if isinstance(m, (nn.Conv2d, nn.Conv3d)):
        nn.init.kaiming_normal_(m.weight, a=0.01)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def official_strides(strides, n_stages: int, spatial_dims: int = 3) -> list[list[int]]:
    """Fit planned strides to ``n_stages`` the way STUNetTrainer does: keep the first ``n_stages - 1``
    pooling steps and pad with stride 1, so every preset keeps its stage count (and its checkpoint shapes)."""
    pools = [list(s) for s in (strides or [])[1:]][: n_stages - 1]
    pools += [[1] * spatial_dims] * (n_stages - 1 - len(pools))
    return [[1] * spatial_dims] + pools


def _build(
    preset: str,
    in_channels: int,
    num_classes: int,
    *,
    spatial_dims: int,
    deep_supervision: bool,
    features,
    blocks_per_stage,
    strides,
    kernel_sizes,
) -> STUNet:
    p = PRESETS[preset]
    features = list(features or p["features"])
    n = len(features)
    blocks = list(blocks_per_stage or p["blocks_per_stage"][:1] * n)
    if strides is None:
        strides = [[1] * spatial_dims] + [[2] * spatial_dims] * (n - 1)
    elif len(strides) != n:
        strides = official_strides(strides, n, spatial_dims)
    if kernel_sizes is None or len(kernel_sizes) != n:
        kernel_sizes = [[3] * spatial_dims] * n  # what the official trainer always uses
    return STUNet(
        in_channels,
        num_classes,
        features=features,
        blocks_per_stage=blocks,
        strides=[list(s) for s in strides],
        kernel_sizes=[list(k) for k in kernel_sizes],
        spatial_dims=spatial_dims,
        deep_supervision=deep_supervision,
    )


def _register(preset: str, label: str):
    description = f"STU-Net-{label} residual U-Net (official widths; loads released STU-Net checkpoints)"

    @register_model(
        preset,
        test_config=dict(_TEST_CONFIG),
        description=description,
        task="segmentation",
        encoder=("conv_blocks_context",),
        head=("seg_outputs",),
        cpu_fast_path=True,
    )
    def build(
        in_channels: int,
        num_classes: int,
        *,
        spatial_dims: int = 3,
        deep_supervision: bool = True,
        features: Sequence[int] | None = None,
        blocks_per_stage: Sequence[int] | None = None,
        strides=None,
        kernel_sizes=None,
    ) -> STUNet:
        """Official widths/depths unless overridden; strides (and kernels) planned for another stage count are
        fitted like STUNetTrainer does: pools cut or padded with stride 1, kernels 3x3x3."""
        return _build(
            preset,
            in_channels,
            num_classes,
            spatial_dims=spatial_dims,
            deep_supervision=deep_supervision,
            features=features,
            blocks_per_stage=blocks_per_stage,
            strides=strides,
            kernel_sizes=kernel_sizes,
        )

    build.__name__ = build.__qualname__ = f"build_{preset}"
    return build


build_stunet_s = _register("stunet_s", "S")
build_stunet_b = _register("stunet_b", "B")
build_stunet_l = _register("stunet_l", "L")
build_stunet_h = _register("stunet_h", "H")
