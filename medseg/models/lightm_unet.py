"""LightM-UNet (Liao et al. 2024, arXiv:2403.05246): a U-Net whose encoder and bottleneck are Mamba layers.

Architecture, as released in MrBlankness/LightM-UNet (``lightm-unet/nnunetv2/nets/LightMUNet.py``, the version
fixed after issue #6, used by ``nnUNetTrainerLightMUNet``), for 2D and 3D:

* stem: a depthwise-separable conv (3x3(x3) depthwise, then 1x1 to ``init_filters``; no bias);
* encoder stage ``i`` (width ``init_filters * 2**i``): for ``i > 0`` a Residual Vision Mamba (RVM) layer
  widening ``c/2 -> c`` then max-pooling; then ``blocks_down[i]`` residual blocks of two RVM layers
  (GroupNorm(8)-ReLU-RVM, twice, + identity). An RVM layer flattens the image into a token sequence
  (C-order, last axis fastest) and computes ``proj(LN(Mamba(LN(x)) + s * x))``, ``s`` a learnt scalar.
  The last stage is the bottleneck (4 blocks by default);
* decoder stage: a 1x1 conv halving the channels, linear (bi/trilinear) upsampling, **added** to the skip,
  then ``blocks_up[i]`` residual blocks GN-ReLU-DWConv(+ ``s`` x input)-GN-ReLU;
* head: GroupNorm-ReLU-depthwise-separable 1x1 conv with bias.

Module names follow the official code (``convInit``, ``down_layers``, ``up_samples``, ``up_layers``,
``conv_final``; MONAI's ``Convolution`` keeps its weights under ``.conv``; the official ``MambaLayer`` is
:class:`RVMLayer` here), so a released ``state_dict`` loads with ``load_state_dict(strict=False)``: every
official tensor matches; what medseg adds is ``ds_heads`` (1x1 deep-supervision heads on the lower
decoder stages: the official trainer trains without deep supervision) — load with
``deep_supervision=False`` and ignore those missing keys, or train them.

Also medseg's: ``strides`` (the official net always pools by 2; planned strides are fitted to the stage
count like STU-Net's trainer does) and upsampling to the skip's size. Official default (1 input channel,
3 classes as in its LiTS ``dataset.json``): 5,015,766 parameters in 3D, far from the paper's "~1M";
see docs/models.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medseg.models.mamba import Mamba, mamba_ssm_available
from medseg.models.registry import register_model
from medseg.models.stunet import official_strides

_TEST_CONFIG = {
    "init_filters": 8,
    "blocks_down": [1, 1, 1],
    "blocks_up": [1, 1],
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
    "d_state": 4,
    "spatial_dims": 3,
}


def _ops(dim: int):
    if dim == 3:
        return nn.Conv3d, nn.MaxPool3d, "trilinear"
    if dim == 2:
        return nn.Conv2d, nn.MaxPool2d, "bilinear"
    raise ValueError(f"spatial_dims must be 2 or 3, got {dim}")


class ConvOnly(nn.Sequential):
    """A bare conv stored under ``.conv``, the key MONAI's ``Convolution(conv_only=True)`` gives it."""

    def __init__(self, dim: int, cin: int, cout: int, kernel: int = 3, *, groups: int = 1, bias: bool = False):
        super().__init__()
        self.add_module("conv", _ops(dim)[0](cin, cout, kernel, padding=kernel // 2, groups=groups, bias=bias))


def dw_conv(dim: int, cin: int, cout: int, kernel: int = 3, bias: bool = False) -> nn.Sequential:
    """Depthwise (``kernel``) then pointwise conv: the official ``get_dwconv_layer``."""
    return nn.Sequential(ConvOnly(dim, cin, cin, kernel, groups=cin, bias=bias), ConvOnly(dim, cin, cout, 1, bias=bias))


class RVMLayer(nn.Module):
    """Residual Vision Mamba layer (the official ``MambaLayer``): tokens = voxels, features = channels."""

    def __init__(self, cin: int, cout: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2):
        super().__init__()
        self.input_dim, self.output_dim = cin, cout
        self.norm = nn.LayerNorm(cin)
        self.mamba = Mamba(cin, d_state=d_state, d_conv=d_conv, expand=expand)
        self.proj = nn.Linear(cin, cout)
        self.skip_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float16:  # as the official layer: the scan and LayerNorm want float32
            x = x.float()
        b, c, *spatial = x.shape
        tokens = x.reshape(b, c, -1).transpose(1, 2)  # (B, L, C)
        y = self.mamba(self.norm(tokens)) + self.skip_scale * tokens
        y = self.proj(self.norm(y))  # the same LayerNorm twice, as released
        return y.transpose(1, 2).reshape(b, self.output_dim, *spatial)


class ResMambaBlock(nn.Module):
    def __init__(self, channels: int, groups: int, **mamba):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.act = nn.ReLU(inplace=True)
        self.conv1 = RVMLayer(channels, channels, **mamba)
        self.conv2 = RVMLayer(channels, channels, **mamba)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.act(self.norm1(x)))
        return self.conv2(self.act(self.norm2(y))) + x


class ResUpBlock(nn.Module):
    def __init__(self, dim: int, channels: int, groups: int, kernel: int = 3):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.act = nn.ReLU(inplace=True)
        self.conv = dw_conv(dim, channels, channels, kernel)
        self.skip_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.act(self.norm1(x))) + self.skip_scale * x
        return self.act(self.norm2(y))


class LightMUNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        init_filters: int = 32,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] | None = None,
        strides=None,
        spatial_dims: int = 3,
        deep_supervision: bool = True,
        norm_groups: int = 8,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
    ):
        """``blocks_down``: residual Mamba blocks per encoder stage (its length is the stage count, >= 2);
        ``blocks_up``: residual DWConv blocks per decoder stage, from the bottleneck up (default 1 each);
        ``strides``: one pooling step per stage, the first all ones (default 2 per axis)."""
        super().__init__()
        dim = spatial_dims
        conv, pool, self.mode = _ops(dim)
        n = len(blocks_down)
        blocks_up = list(blocks_up) if blocks_up is not None else [1] * (n - 1)
        strides = [list(s) for s in (strides or [[1] * dim] + [[2] * dim] * (n - 1))]
        if n < 2 or len(blocks_up) != n - 1 or len(strides) != n:
            raise ValueError("blocks_down and strides need one entry per stage (>= 2), blocks_up one per decoder stage")
        if any(s != 1 for s in strides[0]) or any(len(s) != dim for s in strides):
            raise ValueError(f"strides need {dim} entries per stage and strides[0] all ones; got {strides}")
        widths = [init_filters * 2**i for i in range(n)]
        if any(w % norm_groups for w in widths):
            raise ValueError(f"every width {widths} must be a multiple of norm_groups={norm_groups}")
        mamba = {"d_state": d_state, "d_conv": d_conv, "expand": expand}
        self.spatial_dims, self.strides, self.deep_supervision = dim, strides, deep_supervision
        self.convInit = dw_conv(dim, in_channels, init_filters)
        self.down_layers = nn.ModuleList()
        for i, (w, nb) in enumerate(zip(widths, blocks_down)):
            down = nn.Sequential(RVMLayer(w // 2, w, **mamba), pool(strides[i], strides[i])) if i > 0 else nn.Identity()
            self.down_layers.append(nn.Sequential(down, *[ResMambaBlock(w, norm_groups, **mamba) for _ in range(nb)]))
        self.up_samples = nn.ModuleList()
        self.up_layers = nn.ModuleList()
        self.ds_heads = nn.ModuleList()
        for i, nb in enumerate(blocks_up):  # decoder stage i lands on encoder stage n - 2 - i
            w = widths[n - 2 - i]
            self.up_samples.append(nn.Sequential(ConvOnly(dim, 2 * w, w, 1)))  # upsampled in forward
            self.up_layers.append(nn.Sequential(*[ResUpBlock(dim, w, norm_groups) for _ in range(nb)]))
            if i < n - 2:
                self.ds_heads.append(conv(w, num_classes, 1))
        self.conv_final = nn.Sequential(
            nn.GroupNorm(norm_groups, init_filters),
            nn.ReLU(inplace=True),
            dw_conv(dim, init_filters, num_classes, 1, True),
        )

    def forward(self, x: torch.Tensor):
        x = self.convInit(x)
        skips = []
        for down in self.down_layers:
            x = down(x)
            skips.append(x)
        skips.pop()
        outputs = []
        for i, (up, block) in enumerate(zip(self.up_samples, self.up_layers)):
            skip = skips.pop()
            x = F.interpolate(up(x), size=skip.shape[2:], mode=self.mode, align_corners=False) + skip
            x = block(x)
            if self.deep_supervision and i < len(self.ds_heads):
                outputs.append(self.ds_heads[i](x))
        outputs.append(self.conv_final(x))
        outputs.reverse()  # full resolution first
        return outputs if self.deep_supervision else outputs[0]


def _description() -> str:
    fast = (
        "mamba-ssm installed: CUDA kernel on GPU"
        if mamba_ssm_available()
        else "pip install medseg[mamba] for the CUDA kernel"
    )
    return f"LightM-UNet: Mamba (RVM) encoder + DWConv decoder, 2D/3D; PyTorch selective scan on CPU ({fast})"


@register_model(
    "lightm_unet",
    test_config=dict(_TEST_CONFIG),
    description=_description(),
    task="segmentation",
    encoder=("convInit", "down_layers"),
    head=("conv_final", "ds_heads"),
)
def build_lightm_unet(
    in_channels: int,
    num_classes: int,
    *,
    spatial_dims: int = 3,
    deep_supervision: bool = True,
    init_filters: int = 32,
    blocks_down: Sequence[int] = (1, 2, 2, 4),
    blocks_up: Sequence[int] | None = None,
    strides=None,
    norm_groups: int = 8,
    d_state: int = 16,
    d_conv: int = 4,
    expand: int = 2,
) -> LightMUNet:
    """LightM-UNet with the official defaults (``nnUNetTrainerLightMUNet``: 32 filters, blocks (1, 2, 2, 4) / (1, 1, 1)).

    Planned ``strides`` for another stage count are fitted as STU-Net's trainer does: the first
    ``len(blocks_down) - 1`` pooling steps are kept, missing ones are stride 1.
    """
    n = len(blocks_down)
    if strides is not None and len(strides) != n:
        strides = official_strides(strides, n, spatial_dims)
    return LightMUNet(
        in_channels,
        num_classes,
        init_filters=init_filters,
        blocks_down=list(blocks_down),
        blocks_up=blocks_up,
        strides=strides,
        spatial_dims=spatial_dims,
        deep_supervision=deep_supervision,
        norm_groups=norm_groups,
        d_state=d_state,
        d_conv=d_conv,
        expand=expand,
    )
