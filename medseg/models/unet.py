"""nnU-Net's plain convolutional U-Net, for 2D and 3D.

Each stage: ``n_conv`` x (conv -> InstanceNorm -> LeakyReLU); the first conv of stages > 0
downsamples with its stride. The decoder upsamples with a transposed conv, concatenates the
skip, and applies ``n_conv`` convs. With deep supervision a 1x1 head sits on every decoder
stage and ``forward`` returns logits full resolution first.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from medseg.models.norms import InstanceNorm2d, InstanceNorm3d
from medseg.models.registry import register_model


def _ops(dim: int):
    if dim == 3:
        return nn.Conv3d, nn.ConvTranspose3d, InstanceNorm3d
    if dim == 2:
        return nn.Conv2d, nn.ConvTranspose2d, InstanceNorm2d
    raise ValueError(f"spatial_dims must be 2 or 3, got {dim}")


class ConvNormAct(nn.Sequential):
    def __init__(self, dim, cin, cout, kernel, stride=1, *, bias=True, eps=1e-5, slope=0.01):
        conv, _, norm = _ops(dim)
        pad = [k // 2 for k in kernel]
        super().__init__(
            conv(cin, cout, kernel, stride, pad, bias=bias),
            norm(cout, eps=eps, affine=True),
            nn.LeakyReLU(slope, inplace=True),
        )


class Stage(nn.Sequential):
    def __init__(self, dim, cin, cout, kernel, stride, n_conv, **opts):
        layers = [ConvNormAct(dim, cin, cout, kernel, stride, **opts)]
        layers += [ConvNormAct(dim, cout, cout, kernel, **opts) for _ in range(n_conv - 1)]
        super().__init__(*layers)


def check_transpose(transpose, spatial_dims: int) -> list[int] | None:
    """A permutation of the spatial axes, or None (identity)."""
    if transpose is None:
        return None
    order = [int(a) for a in transpose]
    if sorted(order) != list(range(spatial_dims)):
        raise ValueError(f"transpose must be a permutation of 0..{spatial_dims - 1}, got {list(transpose)}")
    return None if order == sorted(order) else order


def permute_spatial(x: torch.Tensor, order) -> torch.Tensor:
    """(B, C, *spatial) with the spatial axes in ``order``."""
    return x.permute(0, 1, *(2 + a for a in order))


def unpermute_spatial(y, order):
    """Undo :func:`permute_spatial` on a tensor or a list of tensors (deep supervision)."""
    back = [order.index(i) for i in range(len(order))]
    if isinstance(y, (list, tuple)):
        return [permute_spatial(t, back) for t in y]
    return permute_spatial(y, back)


class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        features,
        strides,
        kernel_sizes,
        n_conv_per_stage=2,
        n_conv_per_stage_decoder=None,
        spatial_dims: int = 3,
        deep_supervision: bool = True,
        conv_bias: bool = True,
        norm_eps: float = 1e-5,
        negative_slope: float = 0.01,
        transpose=None,
    ):
        """``n_conv_per_stage``: an int or one entry per stage; ``n_conv_per_stage_decoder``: an int or one
        entry per decoder stage, from the bottleneck up (default: the encoder's). ``transpose``: the spatial
        axis order the network works in (nnU-Net's ``transpose_forward``); inputs are permuted to it and
        outputs back, so callers keep their own axis order."""
        super().__init__()
        n = len(features)
        if not (len(strides) == len(kernel_sizes) == n):
            raise ValueError("features, strides and kernel_sizes need one entry per stage")
        dim = spatial_dims
        _, convT, _ = _ops(dim)
        conv = _ops(dim)[0]
        n_enc = [n_conv_per_stage] * n if isinstance(n_conv_per_stage, int) else list(n_conv_per_stage)
        n_dec = n_conv_per_stage_decoder or (n_enc[0] if isinstance(n_conv_per_stage, int) else n_enc[-2::-1])
        n_dec = [n_dec] * (n - 1) if isinstance(n_dec, int) else list(n_dec)
        if len(n_enc) != n or len(n_dec) != n - 1:
            raise ValueError(
                "n_conv_per_stage needs one entry per stage, n_conv_per_stage_decoder one per decoder stage"
            )
        opts = {"bias": conv_bias, "eps": norm_eps, "slope": negative_slope}
        self.transpose = check_transpose(transpose, dim)
        self.deep_supervision = deep_supervision
        self.encoder = nn.ModuleList()
        cin = in_channels
        for f, s, k, nc in zip(features, strides, kernel_sizes, n_enc):
            self.encoder.append(Stage(dim, cin, f, k, s, nc, **opts))
            cin = f
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for i in range(n - 1, 0, -1):
            s = strides[i]
            self.upsample.append(convT(features[i], features[i - 1], s, s, bias=conv_bias))
            self.decoder.append(
                Stage(dim, 2 * features[i - 1], features[i - 1], kernel_sizes[i - 1], 1, n_dec[n - 1 - i], **opts)
            )
            self.heads.append(conv(features[i - 1], num_classes, 1, 1, 0, bias=True))
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor):
        if self.transpose is not None:
            return unpermute_spatial(self._forward(permute_spatial(x, self.transpose)), self.transpose)
        return self._forward(x)

    def decoder_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every decoder stage, coarsest first (in the network's own axis order): what
        the heads read, and the multi-scale pixel features of decoders built on this U-Net."""
        skips = []
        for i, stage in enumerate(self.encoder):
            x = self.encoder_output(i, stage(x))
            skips.append(x)
        x = skips.pop()
        features = []
        for up, dec in zip(self.upsample, self.decoder):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
            features.append(x)
        return features

    def encoder_output(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """The output of encoder stage ``stage`` as the skip and the next stage see it (a subclass
        fuses other features in here, e.g. SAMDA's SAM embedding)."""
        return x

    def _forward(self, x: torch.Tensor):
        features = self.decoder_features(x)
        if not self.deep_supervision:
            return self.heads[-1](features[-1])
        return [head(f) for head, f in zip(self.heads, features)][::-1]


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(m.weight, a=0.01)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def unet_topology(spatial_dims: int, features=None, strides=None, kernel_sizes=None) -> dict:
    """``features``/``strides``/``kernel_sizes`` with nnU-Net's defaults filled in: widths 32 doubling,
    capped at 320 in 3D / 512 in 2D, one per stage of ``strides`` (4 stages when neither is given)."""
    if features is None:
        cap = 320 if spatial_dims == 3 else 512
        features = [min(32 * 2**i, cap) for i in range(len(strides) if strides else 4)]
    n = len(features)
    strides = strides or [[1] * spatial_dims] + [[2] * spatial_dims] * (n - 1)
    kernel_sizes = kernel_sizes or [[3] * spatial_dims] * n
    return {
        "features": list(features),
        "strides": [list(s) for s in strides],
        "kernel_sizes": [list(k) for k in kernel_sizes],
    }


@register_model(
    "unet",
    test_config={
        "features": [4, 8, 16],
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "kernel_sizes": [[3, 3, 3]] * 3,
        "spatial_dims": 3,
    },
    description="nnU-Net plain conv U-Net (2D/3D), planned by medseg",
    task="segmentation",
    encoder=("encoder",),
    head=("heads",),
    cpu_fast_path=True,
)
def build_unet(
    in_channels: int,
    num_classes: int,
    *,
    spatial_dims: int = 3,
    deep_supervision: bool = True,
    features=None,
    strides=None,
    kernel_sizes=None,
    n_conv_per_stage=2,
    n_conv_per_stage_decoder=None,
    conv_bias: bool = True,
    norm_eps: float = 1e-5,
    negative_slope: float = 0.01,
    transpose=None,
) -> UNet:
    """nnU-Net plain conv U-Net (2D/3D), planned by medseg.

    ``conv_bias``, ``norm_eps``, ``negative_slope`` and ``transpose`` (spatial axis order inside the
    network) reproduce imported nnU-Net plans exactly; the defaults are nnU-Net's. Without ``features``:
    nnU-Net's widths (32 doubling, capped at 320 in 3D / 512 in 2D), one per stage of ``strides``
    (4 stages when neither is given).
    """
    return UNet(
        in_channels,
        num_classes,
        **unet_topology(spatial_dims, features, strides, kernel_sizes),
        n_conv_per_stage=n_conv_per_stage,
        n_conv_per_stage_decoder=n_conv_per_stage_decoder,
        spatial_dims=spatial_dims,
        deep_supervision=deep_supervision,
        conv_bias=conv_bias,
        norm_eps=norm_eps,
        negative_slope=negative_slope,
        transpose=transpose,
    )
