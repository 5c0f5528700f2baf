"""LiteMedSAM (Ma et al., MedSAM on laptops, 2024): TinyViT encoder + SAM prompt encoder and mask decoder.

The network is split the way box-prompted use needs it: :meth:`LiteMedSAM.embed` runs the image encoder
once per image (the 85 % of the cost), :meth:`LiteMedSAM.decode` turns any number of prompts on that
embedding into 256 x 256 mask logits. ``forward(image, boxes=...)`` does both (training, reference tests).
Registered as ``litemedsam`` for the ``prompt_segmentation`` task; real weights come from
``medseg import-medsam`` (:mod:`medseg.sam.weights`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from medseg.models.registry import register_model
from medseg.models.sam.prompt_decoder import MaskDecoder, PromptEncoder
from medseg.models.sam.tinyvit import TinyViT

LITEMEDSAM_ARCH = {
    "img_size": 256, "embed_dims": [64, 128, 160, 320], "depths": [2, 2, 6, 2], "num_heads": [2, 4, 5, 10],
    "window_sizes": [7, 7, 14, 7],
}


class LiteMedSAM(nn.Module):
    """``in_channels=1`` keeps the published 3-channel encoder and repeats a grey input to three
    identical channels (MedSAM's own handling of grey images), so the LiteMedSAM weights load."""

    def __init__(self, in_channels: int = 3, img_size: int = 256, embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2),
                 num_heads=(2, 4, 5, 10), window_sizes=(7, 7, 14, 7), embed_dim: int = 256, **_ignored):
        super().__init__()
        self.in_channels = in_channels
        self.image_encoder = TinyViT(img_size, 3 if in_channels == 1 else in_channels, embed_dims, depths, num_heads,
                                     window_sizes, out_chans=embed_dim)
        grid = self.image_encoder.grid
        self.img_size = img_size
        self.prompt_encoder = PromptEncoder(embed_dim, (grid, grid), (img_size, img_size), 16)
        self.mask_decoder = MaskDecoder(embed_dim)

    def encoder_input(self, images: torch.Tensor) -> torch.Tensor:
        """A grey (B, 1, S, S) batch as three identical channels; any other batch unchanged."""
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 and self.in_channels == 1 else images

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images in [0, 1] (or (B, 1, S, S) when built with ``in_channels=1``) ->
        (B, 256, S/4, S/4) embeddings."""
        return self.image_encoder(self.encoder_input(images))

    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor | None = None, points=None, masks=None,
               multimask: bool = False):
        """Logits (P, 1, S, S) and predicted IoU (P, 1) for P prompts on one embedding (1, C, h, w), or on P
        embeddings. ``boxes``: (P, 4) x0 y0 x1 y1 in input pixels; ``points``: ((P, N, 2), (P, N))."""
        sparse, dense = self.prompt_encoder(boxes=boxes, points=points, masks=masks)
        dtype = embedding.dtype
        pe = self.prompt_encoder.dense_pe().to(dtype)
        return self.mask_decoder(embedding, pe, sparse.to(dtype), dense.to(dtype), multimask=multimask)

    def forward(self, image: torch.Tensor, boxes: torch.Tensor | None = None, points=None):
        """Training / reference form: one prompt per image, (B, 1, S, S) logits."""
        logits, _ = self.decode(self.embed(image), boxes=boxes.reshape(-1, 4) if boxes is not None else None,
                                points=points)
        return logits

    @torch.no_grad()
    def for_inference(self) -> LiteMedSAM:
        """Eval mode, BatchNorm folded into the encoder's convolutions, convolution weights channels-last
        (the encoder keeps its activations channels-last from the first layer to the neck)."""
        self.eval()
        self.image_encoder.fuse_batchnorm()
        return self.to(memory_format=torch.channels_last)


@register_model(
    "litemedsam",
    task="prompt_segmentation",
    description="LiteMedSAM: TinyViT-5M encoder + SAM prompt encoder/mask decoder (box prompts, 2D)",
    test_config={"img_size": 64, "embed_dims": [8, 16, 16, 32], "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 2],
                 "window_sizes": [7, 7, 7, 7], "input_size": [64, 64], "spatial_dims": 2},
    encoder=("image_encoder",),
    head=("mask_decoder",),
    input_shape=(3, 256, 256),
)
def build_litemedsam(in_channels: int = 3, num_classes: int = 1, *, spatial_dims: int = 2, deep_supervision=False,
                     **arch) -> LiteMedSAM:
    """One binary mask per prompt, whatever ``num_classes`` says; ``deep_supervision`` does not apply."""
    if spatial_dims != 2:
        raise ValueError("litemedsam is a 2D model (3D volumes are segmented slice by slice)")
    return LiteMedSAM(in_channels, **arch)
