"""nnU-Net's plain convolutional U-Net, for 2D and 3D.

Each stage: ``n_conv`` x (conv -> InstanceNorm -> LeakyReLU); the first conv of stages > 0
downsamples with its stride. The decoder upsamples with a transposed conv, concatenates the
skip, and applies ``n_conv`` convs. With deep supervision a 1x1 head sits on every decoder
stage and ``forward`` returns logits full resolution first.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from medseg.models.registry import register_model


def _ops(dim: int):
    if dim == 3:
        return nn.Conv3d, nn.ConvTranspose3d, nn.InstanceNorm3d
    if dim == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.InstanceNorm2d
    raise ValueError(f"spatial_dims must be 2 or 3, got {dim}")


class ConvNormAct(nn.Sequential):
    def __init__(self, dim, cin, cout, kernel, stride=1):
        conv, _, norm = _ops(dim)
        pad = [k // 2 for k in kernel]
        super().__init__(
            conv(cin, cout, kernel, stride, pad, bias=True),
            norm(cout, eps=1e-5, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class Stage(nn.Sequential):
    def __init__(self, dim, cin, cout, kernel, stride, n_conv):
        layers = [ConvNormAct(dim, cin, cout, kernel, stride)]
        layers += [ConvNormAct(dim, cout, cout, kernel) for _ in range(n_conv - 1)]
        super().__init__(*layers)


class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        features,
        strides,
        kernel_sizes,
        n_conv_per_stage: int = 2,
        n_conv_per_stage_decoder: int | None = None,
        spatial_dims: int = 3,
        deep_supervision: bool = True,
    ):
        super().__init__()
        n = len(features)
        if not (len(strides) == len(kernel_sizes) == n):
            raise ValueError("features, strides and kernel_sizes need one entry per stage")
        dim = spatial_dims
        _, convT, _ = _ops(dim)
        conv = _ops(dim)[0]
        n_dec = n_conv_per_stage_decoder or n_conv_per_stage
        self.deep_supervision = deep_supervision
        self.encoder = nn.ModuleList()
        cin = in_channels
        for f, s, k in zip(features, strides, kernel_sizes):
            self.encoder.append(Stage(dim, cin, f, k, s, n_conv_per_stage))
            cin = f
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for i in range(n - 1, 0, -1):
            s = strides[i]
            self.upsample.append(convT(features[i], features[i - 1], s, s, bias=True))
            self.decoder.append(Stage(dim, 2 * features[i - 1], features[i - 1], kernel_sizes[i - 1], 1, n_dec))
            self.heads.append(conv(features[i - 1], num_classes, 1, 1, 0, bias=True))
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor):
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        outputs = []
        for up, dec, head in zip(self.upsample, self.decoder, self.heads):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
            if self.deep_supervision or head is self.heads[-1]:
                outputs.append(head(x))
        outputs.reverse()
        return outputs if self.deep_supervision else outputs[0]


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(m.weight, a=0.01)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


@register_model(
    "unet",
    test_config={
        "features": [4, 8, 16],
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "kernel_sizes": [[3, 3, 3]] * 3,
        "spatial_dims": 3,
    },
    description="nnU-Net plain conv U-Net (2D/3D), planned by medseg",
)
def build_unet(
    in_channels: int,
    num_classes: int,
    *,
    spatial_dims: int = 3,
    deep_supervision: bool = True,
    features=(32, 64, 128, 256),
    strides=None,
    kernel_sizes=None,
    n_conv_per_stage: int = 2,
    n_conv_per_stage_decoder: int | None = None,
) -> UNet:
    """nnU-Net plain conv U-Net (2D/3D), planned by medseg."""
    n = len(features)
    strides = strides or [[1] * spatial_dims] + [[2] * spatial_dims] * (n - 1)
    kernel_sizes = kernel_sizes or [[3] * spatial_dims] * n
    return UNet(
        in_channels,
        num_classes,
        features=list(features),
        strides=[list(s) for s in strides],
        kernel_sizes=[list(k) for k in kernel_sizes],
        n_conv_per_stage=n_conv_per_stage,
        n_conv_per_stage_decoder=n_conv_per_stage_decoder,
        spatial_dims=spatial_dims,
        deep_supervision=deep_supervision,
    )
