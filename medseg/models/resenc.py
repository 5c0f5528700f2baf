"""nnU-Net v2's residual-encoder U-Net (ResEnc; Isensee et al. 2024, "nnU-Net Revisited").

Encoder: a stem conv, then per stage ``blocks_per_stage`` ResNet-D basic blocks (conv-IN-LReLU, conv-IN,
add the skip, LReLU; a strided or widening block's skip is avg-pool -> 1x1 conv -> IN). Decoder: a
transposed conv, concatenation with the skip, ``n_conv_per_stage_decoder`` conv-IN-LReLU, and a 1x1 head
per stage (always built, so deep-supervision and inference models share one state dict).

Presets (nnUNetPlannerResEncM / ResEncL) share this architecture: features 32 doubling to 320 (3D) /
512 (2D), encoder blocks (1, 3, 4, 6, 6, 6, ...), one decoder conv per stage. They differ only in the GPU
memory the planner fills with patch and batch (8 GB vs 24 GB); ``PRESETS`` keeps those targets and
nnU-Net's reference values for a planner to size them with :func:`medseg.models.flops.feature_map_elements`.

Parameter names match dynamic-network-architectures' ``ResidualEncoderUNet``
(``encoder.stem.convs.0.conv.weight``, ``encoder.stages.2.blocks.0.skip.1.norm.weight``,
``decoder.transpconvs.0.weight``, ``decoder.seg_layers.4.bias``, ...). nnU-Net checkpoints also hold two
aliases of the same tensors — ``*.all_modules.{0,1}.*`` (the conv/norm again) and ``decoder.encoder.*``
(the encoder again). medseg does not register those aliases (safetensors refuses shared tensors); a
load-state-dict pre-hook drops them, so ``model.load_state_dict(checkpoint["network_weights"])`` works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from medseg.models.norms import InstanceNorm2d, InstanceNorm3d
from medseg.models.registry import PlannerHook, register_model
from medseg.models.unet import check_transpose, permute_spatial, unpermute_spatial

ENCODER_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)  # nnU-Net's UNet_blocks_per_stage_encoder
BASE_FEATURES, MAX_FEATURES_3D, MAX_FEATURES_2D = 32, 320, 512

# nnU-Net's planner presets: GPU memory target (GB) and the feature-map-element budget that fills it
# (reference value x target / reference GB), batch 2 in 3D, 12 in 2D.
PRESETS: dict[str, dict] = {
    "resenc_m": {
        "vram_target_gb": 8,
        "reference_gb": 8,
        "reference_val_3d": 680_000_000,
        "reference_val_2d": 135_000_000,
    },
    "resenc_l": {
        "vram_target_gb": 24,
        "reference_gb": 24,
        "reference_val_3d": 2_100_000_000,
        "reference_val_2d": 380_000_000,
    },
}
_TEST_CONFIG = {
    "features": [2, 4, 8, 8],
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "blocks_per_stage": [1, 2, 1, 1],
    "spatial_dims": 3,
}


def _ops(dim: int):
    if dim == 3:
        return nn.Conv3d, nn.ConvTranspose3d, InstanceNorm3d, nn.AvgPool3d
    if dim == 2:
        return nn.Conv2d, nn.ConvTranspose2d, InstanceNorm2d, nn.AvgPool2d
    raise ValueError(f"spatial_dims must be 2 or 3, got {dim}")


class ConvNormAct(nn.Module):
    """nnU-Net's ConvDropoutNormReLU (no dropout): names ``conv``, ``norm``, ``nonlin``."""

    def __init__(self, dim: int, cin: int, cout: int, kernel, stride=1, *, bias=True, act=True, eps=1e-5, slope=0.01):
        super().__init__()
        conv, _, norm, _ = _ops(dim)
        kernel = [kernel] * dim if isinstance(kernel, int) else list(kernel)
        self.conv = conv(cin, cout, kernel, stride, padding=[(k - 1) // 2 for k in kernel], bias=bias)
        self.norm = norm(cout, eps=eps, affine=True)
        self.nonlin = nn.LeakyReLU(slope, inplace=True) if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return self.nonlin(x) if self.nonlin is not None else x


class StackedConvBlocks(nn.Module):
    def __init__(self, dim: int, n: int, cin: int, cout: int, kernel, stride=1, **opts):
        super().__init__()
        self.convs = nn.Sequential(
            ConvNormAct(dim, cin, cout, kernel, stride, **opts),
            *[ConvNormAct(dim, cout, cout, kernel, **opts) for _ in range(n - 1)],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class BasicBlockD(nn.Module):
    """ResNet-D basic block: the skip avg-pools before its 1x1 conv instead of striding it."""

    def __init__(self, dim: int, cin: int, cout: int, kernel, stride, *, bias=True, eps=1e-5, slope=0.01):
        super().__init__()
        stride = [stride] * dim if isinstance(stride, int) else list(stride)
        self.conv1 = ConvNormAct(dim, cin, cout, kernel, stride, bias=bias, eps=eps, slope=slope)
        self.conv2 = ConvNormAct(dim, cout, cout, kernel, bias=bias, act=False, eps=eps)
        self.nonlin2 = nn.LeakyReLU(slope, inplace=True)
        skip = []
        if any(s != 1 for s in stride):
            skip.append(_ops(dim)[3](stride, stride))
        if cin != cout:
            skip.append(ConvNormAct(dim, cin, cout, 1, bias=False, act=False, eps=eps))
        self.skip = nn.Sequential(*skip) if skip else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlin2(self.conv2(self.conv1(x)) + self.skip(x))


class StackedResidualBlocks(nn.Module):
    def __init__(self, dim: int, n: int, cin: int, cout: int, kernel, stride, **opts):
        super().__init__()
        self.blocks = nn.Sequential(
            BasicBlockD(dim, cin, cout, kernel, stride, **opts),
            *[BasicBlockD(dim, cout, cout, kernel, 1, **opts) for _ in range(n - 1)],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResidualEncoder(nn.Module):
    def __init__(self, dim: int, in_channels: int, features, strides, kernel_sizes, blocks_per_stage, **opts):
        super().__init__()
        self.stem = StackedConvBlocks(dim, 1, in_channels, features[0], kernel_sizes[0], **opts)
        cin, stages = features[0], []
        for f, s, k, b in zip(features, strides, kernel_sizes, blocks_per_stage):
            stages.append(StackedResidualBlocks(dim, b, cin, f, k, s, **opts))
            cin = f
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class UNetDecoder(nn.Module):
    def __init__(self, dim: int, num_classes: int, features, strides, kernel_sizes, n_conv, deep_supervision, **opts):
        super().__init__()
        conv, convT, _, _ = _ops(dim)
        self.deep_supervision = deep_supervision
        self.stages, self.transpconvs, self.seg_layers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in range(len(features) - 1, 0, -1):  # from the bottleneck up
            s = strides[i]
            self.transpconvs.append(convT(features[i], features[i - 1], s, s, bias=opts.get("bias", True)))
            self.stages.append(
                StackedConvBlocks(
                    dim,
                    n_conv[len(features) - 1 - i],
                    2 * features[i - 1],
                    features[i - 1],
                    kernel_sizes[i - 1],
                    **opts,
                )
            )
            self.seg_layers.append(conv(features[i - 1], num_classes, 1, 1, 0, bias=True))

    def forward(self, skips: list[torch.Tensor]):
        x = skips[-1]
        outputs = []
        last = len(self.stages) - 1
        for s, (up, stage, head) in enumerate(zip(self.transpconvs, self.stages, self.seg_layers)):
            x = stage(torch.cat([up(x), skips[-(s + 2)]], dim=1))
            if self.deep_supervision or s == last:
                outputs.append(head(x))
        outputs.reverse()
        return outputs if self.deep_supervision else outputs[0]


class ResEncUNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        features,
        strides,
        kernel_sizes,
        blocks_per_stage,
        n_conv_per_stage_decoder,
        spatial_dims: int = 3,
        deep_supervision: bool = True,
        conv_bias: bool = True,
        norm_eps: float = 1e-5,
        negative_slope: float = 0.01,
        transpose=None,
    ):
        super().__init__()
        n = len(features)
        opts = {"bias": conv_bias, "eps": norm_eps, "slope": negative_slope}
        self.transpose = check_transpose(transpose, spatial_dims)
        if not (len(strides) == len(kernel_sizes) == len(blocks_per_stage) == n) or n < 2:
            raise ValueError("features, strides, kernel_sizes and blocks_per_stage need one entry per stage (>= 2)")
        if len(n_conv_per_stage_decoder) != n - 1:
            raise ValueError(f"n_conv_per_stage_decoder needs {n - 1} entries (one per decoder stage)")
        self.encoder = ResidualEncoder(
            spatial_dims, in_channels, features, strides, kernel_sizes, blocks_per_stage, **opts
        )
        self.decoder = UNetDecoder(
            spatial_dims, num_classes, features, strides, kernel_sizes, n_conv_per_stage_decoder, deep_supervision,
            **opts,
        )  # fmt: skip
        self.apply(_init_weights)
        if hasattr(self, "register_load_state_dict_pre_hook"):  # public from torch 2.5
            self.register_load_state_dict_pre_hook(_drop_nnunet_aliases)
        else:
            self._register_load_state_dict_pre_hook(_drop_nnunet_aliases, with_module=True)

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        self.decoder.deep_supervision = value

    def forward(self, x: torch.Tensor):
        if self.transpose is not None:
            x = permute_spatial(x, self.transpose)
            return unpermute_spatial(self.decoder(self.encoder(x)), self.transpose)
        return self.decoder(self.encoder(x))


def _init_weights(m: nn.Module) -> None:
    """nnU-Net's InitWeights_He(1e-2), then the residual branch's last norm at zero (identity blocks at start)."""
    if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(m.weight, a=0.01)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, BasicBlockD):
        nn.init.zeros_(m.conv2.norm.weight)
        nn.init.zeros_(m.conv2.norm.bias)


def _drop_nnunet_aliases(module, state_dict, prefix, *_):
    """nnU-Net state dicts repeat every conv/norm under ``all_modules.N`` and the encoder under
    ``decoder.encoder``; both are views of tensors that also appear under their canonical names."""
    for key in list(state_dict):
        rest = key[len(prefix) :] if key.startswith(prefix) else None
        if rest is not None and (rest.startswith("decoder.encoder.") or ".all_modules." in rest):
            del state_dict[key]


def nnunet_features(n_stages: int, spatial_dims: int = 3) -> list[int]:
    """nnU-Net's widths: 32 doubling per stage, capped at 320 (3D) or 512 (2D)."""
    cap = MAX_FEATURES_3D if spatial_dims == 3 else MAX_FEATURES_2D
    return [min(BASE_FEATURES * 2**i, cap) for i in range(n_stages)]


ENCODER, HEAD = ("encoder",), ("decoder.seg_layers",)  # dynamic-network-architectures' module names


@register_model(
    "resenc",
    test_config=dict(_TEST_CONFIG),
    description="nnU-Net v2 residual-encoder U-Net (ResEnc), topology from the plan",
    task="segmentation",
    encoder=ENCODER,
    head=HEAD,
    cpu_fast_path=True,
)
def build_resenc(
    in_channels: int,
    num_classes: int,
    *,
    spatial_dims: int = 3,
    deep_supervision: bool = True,
    features: Sequence[int] | None = None,
    strides=None,
    kernel_sizes=None,
    blocks_per_stage: Sequence[int] | None = None,
    n_conv_per_stage_decoder=1,
    n_conv_per_stage: int | None = None,
    conv_bias: bool = True,
    norm_eps: float = 1e-5,
    negative_slope: float = 0.01,
    transpose=None,
) -> ResEncUNet:
    """nnU-Net v2 residual-encoder U-Net; takes the plan's U-Net kwargs.

    ``n_conv_per_stage`` (a plain-U-Net plan key) is accepted and ignored: ResEnc's encoder depth is
    ``blocks_per_stage`` (default nnU-Net's 1, 3, 4, 6, 6, ...), its decoder ``n_conv_per_stage_decoder``.
    ``conv_bias``, ``norm_eps``, ``negative_slope`` and ``transpose`` (spatial axis order inside the network,
    nnU-Net's ``transpose_forward``) reproduce imported nnU-Net plans exactly; the defaults are nnU-Net's.
    Without ``features``: nnU-Net's widths for the stages of ``strides`` (default 6 stages).
    """
    del n_conv_per_stage
    features = features or nnunet_features(len(strides) if strides else 6, spatial_dims)
    n = len(features)
    strides = strides or [[1] * spatial_dims] + [[2] * spatial_dims] * (n - 1)
    kernel_sizes = kernel_sizes or [[3] * spatial_dims] * n
    blocks = list(blocks_per_stage or ENCODER_BLOCKS[:n])
    if len(blocks) < n and blocks_per_stage is None:
        blocks += [ENCODER_BLOCKS[-1]] * (n - len(blocks))
    dec = (
        [n_conv_per_stage_decoder] * (n - 1)
        if isinstance(n_conv_per_stage_decoder, int)
        else list(n_conv_per_stage_decoder)
    )
    return ResEncUNet(
        in_channels,
        num_classes,
        features=list(features),
        strides=[list(s) for s in strides],
        kernel_sizes=[list(k) for k in kernel_sizes],
        blocks_per_stage=blocks,
        n_conv_per_stage_decoder=dec,
        spatial_dims=spatial_dims,
        deep_supervision=deep_supervision,
        conv_bias=conv_bias,
        norm_eps=norm_eps,
        negative_slope=negative_slope,
        transpose=transpose,
    )


def planned_kwargs(strides, kernel_sizes, spatial_dims: int) -> dict:
    """The ResEnc architecture nnU-Net's ResEnc planners give a topology: nnU-Net's widths and encoder depths."""
    n = len(strides)
    blocks = list(ENCODER_BLOCKS[:n]) + [ENCODER_BLOCKS[-1]] * max(0, n - len(ENCODER_BLOCKS))
    feats = nnunet_features(n, spatial_dims)
    return {"features": feats, "strides": strides, "kernel_sizes": kernel_sizes, "blocks_per_stage": blocks}


def preset_memory_estimate(name: str):
    """nnU-Net's VRAM model for preset ``name``: the network's conv feature-map elements at batch 1
    (measured on the meta device), scaled so the preset's reference value at the reference batch
    (2 in 3d, 12 in 2d) is its reference GB."""
    p = PRESETS[name]

    def memory_estimate(patch_size, model_kwargs: dict, *, in_channels: int, num_classes: int) -> float:
        from medseg.models.flops import build_meta, feature_map_elements

        dim = int(model_kwargs.get("spatial_dims", 3))
        net = build_meta(name, in_channels, num_classes, **model_kwargs)
        elements = feature_map_elements(net, patch_size, in_channels)
        return p["reference_gb"] * elements / ((2 if dim == 3 else 12) * p[f"reference_val_{dim}d"])

    return memory_estimate


def _register_preset(name: str, label: str):
    gb = PRESETS[name]["vram_target_gb"]

    @register_model(
        name,
        test_config=dict(_TEST_CONFIG),
        description=f"nnU-Net ResEnc {label} preset (planned for {gb} GB VRAM)",
        task="segmentation",
        encoder=ENCODER,
        head=HEAD,
        cpu_fast_path=True,
        memory_estimate=preset_memory_estimate(name),
        planner=PlannerHook(memory_gb=gb, model_kwargs=planned_kwargs),
    )
    def build(
        in_channels: int,
        num_classes: int,
        *,
        spatial_dims: int = 3,
        deep_supervision: bool = True,
        strides=None,
        kernel_sizes=None,
        features: Sequence[int] | None = None,
        blocks_per_stage: Sequence[int] | None = None,
    ) -> ResEncUNet:
        """nnU-Net's ResEnc widths for the given topology (default: 6 stages, stride 2)."""
        n = len(strides) if strides else len(features) if features else 6
        return build_resenc(
            in_channels,
            num_classes,
            spatial_dims=spatial_dims,
            deep_supervision=deep_supervision,
            features=list(features or nnunet_features(n, spatial_dims)),
            strides=strides,
            kernel_sizes=kernel_sizes,
            blocks_per_stage=blocks_per_stage,
        )

    build.__name__ = build.__qualname__ = f"build_{name}"
    return build


build_resenc_m = _register_preset("resenc_m", "M")
build_resenc_l = _register_preset("resenc_l", "L")
