"""Mask-transformer U-Net (MaxQuery: Yuan et al., CVPR 2023, arXiv 2304.00212), for 2D and 3D.

The nnU-Net U-Net is the backbone and pixel decoder. Its finest decoder stage gives a per-voxel
embedding ``e_v`` at full resolution; ``N`` learnable object queries are refined by transformer
decoder layers that cross-attend in turn to the decoder's stages below full resolution (coarse
to fine), and each layer
predicts, per query, class logits ``c_i`` (K classes) and a mask embedding ``q_i``. Semantic
segmentation is a two-stage cluster analysis:

* cluster assignment ``A_iv = softmax_i(m_iv)`` with affinities ``m_iv = tau * cos(q_i, e_v)``;
* cluster classification: ``S_kv = sum_i A_iv softmax_k(c_i)``.

The network returns the logits ``z_kv = logsumexp_i(m_iv + log softmax_k(c_i))``: ``softmax_k(z) = S``
exactly (so Dice + cross-entropy and the argmax are those of ``S``), and ``max_k z`` keeps the
affinity's magnitude for the max-logit OOD baseline. ``max_affinity = max_i cos(q_i, e_v)`` is the
pixel's best match to any query: MaxQuery's OOD score is ``1 - max_affinity`` (a pixel no inlier
cluster centre explains). Cosine affinities with a learned temperature (bounded, comparable across
pixels) and no positional encoding in the cross-attention are this implementation's reading of the
paper; docs/ood.md lists every such choice.

Outputs (a dict): ``logits``, ``max_affinity``; with ``deep_supervision`` (training) also
``mask_logits`` (B, N, *), ``class_logits`` (B, N, K) of the last layer for the query-distribution
loss and ``aux_logits``, the semantic logits of the earlier decoder layers.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from medseg.models.registry import register_model
from medseg.models.unet import UNet, _ops, permute_spatial, unet_topology


def unit_channels(x: torch.Tensor) -> torch.Tensor:
    """``x / |x|`` over the channel axis of (B, C, *spatial) (as F.normalize(dim=1), eps 1e-12), as
    a sum of squares: the strided vector norm was 11 % of the forward's time on CPU."""
    return x * x.square().sum(1, keepdim=True).clamp_min(1e-24).rsqrt()


class QueryDecoderLayer(nn.Module):
    """Cross-attention to pixel features, self-attention among queries, FFN (post-norm, Mask2Former)."""

    def __init__(self, dim: int, heads: int, ffn_ratio: int = 4):
        super().__init__()
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_ratio * dim), nn.GELU(), nn.Linear(ffn_ratio * dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))

    def forward(self, q: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = self.norms[0](q + self.cross(q + pos, memory, memory, need_weights=False)[0])
        k = q + pos
        q = self.norms[1](q + self.self_attn(k, k, q, need_weights=False)[0])
        return self.norms[2](q + self.ffn(q))


class MaskTransformerUNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        num_queries: int = 8,
        embed_dim: int = 32,
        num_layers: int = 3,
        num_heads: int = 4,
        deep_supervision: bool = True,
        **unet,
    ):
        super().__init__()
        self.backbone = UNet(in_channels, 1, deep_supervision=False, **unet)
        self.backbone.heads = nn.ModuleList()  # the pixel decoder's features are the output
        dim, features = unet.get("spatial_dims", 3), unet["features"]
        conv = _ops(dim)[0]
        # cross-attention memory: the decoder stages coarser than the pixel embedding (Mask2Former:
        # attention on low resolutions, masks at the highest), at most one per layer
        levels = list(features[1:-1])[::-1] or [features[0]]  # their widths, coarsest first
        self.num_levels = min(num_layers, len(levels))
        self.deep_supervision = deep_supervision
        self.memory_proj = nn.ModuleList(conv(c, embed_dim, 1) for c in levels[-self.num_levels :])
        self.level_embed = nn.Parameter(torch.zeros(self.num_levels, embed_dim))
        self.pixel_embed = conv(features[0], embed_dim, 1)
        # unit-variance queries (nn.Embedding's init, as Mask2Former): near-identical queries get
        # identical gradients and collapse into one cluster centre
        self.query_feat = nn.Parameter(torch.randn(num_queries, embed_dim))
        self.query_pos = nn.Parameter(torch.randn(num_queries, embed_dim))
        self.layers = nn.ModuleList(QueryDecoderLayer(embed_dim, num_heads) for _ in range(num_layers))
        self.query_norm = nn.LayerNorm(embed_dim)
        self.mask_mlp = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.class_head = nn.Linear(embed_dim, num_classes)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, x: torch.Tensor) -> dict:
        order = self.backbone.transpose
        if order is not None:
            x = permute_spatial(x, order)
        out = self._forward(x)
        if order is not None:
            back = [order.index(i) for i in range(len(order))]
            spatial = lambda t: permute_spatial(t, back) if t.ndim == x.ndim else t  # noqa: E731
            out = {k: [spatial(t) for t in v] if isinstance(v, list) else spatial(v) for k, v in out.items()}
        return out

    def _forward(self, x: torch.Tensor) -> dict:
        features = self.backbone.decoder_features(x)
        pixels = unit_channels(self.pixel_embed(features[-1]).float())  # (B, D, *): affinities in fp32
        memory = [
            proj(f).flatten(2).transpose(1, 2) + self.level_embed[i]
            for i, (proj, f) in enumerate(zip(self.memory_proj, self._memory_features(features)))
        ]
        # the query decoder's small ops in fp32, outside autocast: no per-call casts of its weights
        fp32 = torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") else nullcontext()
        with fp32:  # (the meta device of `medseg models` has no autocast)
            layers = self._decode([m.float() for m in memory], pixels, x.shape[0])
        semantic, affinity, masks, classes = layers[-1]
        out = {"logits": semantic, "max_affinity": affinity}
        if self.deep_supervision:
            out.update(mask_logits=masks, class_logits=classes, aux_logits=[p[0] for p in layers[:-1]])
        return out

    def _decode(self, memory: list[torch.Tensor], pixels: torch.Tensor, b: int) -> list[tuple]:
        q = self.query_feat.repeat(b, 1, 1)  # copies, not views: FlopCounterMode rejects no-grad views
        pos = self.query_pos.repeat(b, 1, 1)  # of parameters passed into submodules
        layers = []
        for i, layer in enumerate(self.layers):
            q = layer(q, memory[i % self.num_levels], pos)
            if self.deep_supervision or i == len(self.layers) - 1:
                layers.append(self._predict(q, pixels))
        return layers

    def _memory_features(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        coarse = features[:-1] or features  # all but the full-resolution stage
        return coarse[-self.num_levels :]

    def _predict(self, q: torch.Tensor, pixels: torch.Tensor):
        """(semantic logits, max cosine affinity, mask logits, class logits) from one layer's queries."""
        q = self.query_norm(q).float()
        emb = F.normalize(self.mask_mlp(q), dim=-1)  # (B, N, D)
        cos = torch.matmul(emb, pixels.flatten(2)).reshape(*emb.shape[:2], *pixels.shape[2:])  # (B, N, *)
        masks = self.log_temperature.float().clamp(max=math.log(100.0)).exp() * cos
        classes = self.class_head(q)  # (B, N, K)
        log_p = torch.log_softmax(classes, -1).transpose(1, 2)  # (B, K, N)
        log_p = log_p.reshape(*log_p.shape, *([1] * (masks.ndim - 2)))
        semantic = torch.logsumexp(masks.unsqueeze(1) + log_p, dim=2)  # (B, K, *)
        return semantic, cos.amax(1, keepdim=True), masks, classes


@register_model(
    "maskformer_unet",
    test_config={
        "features": [4, 8, 16],
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "kernel_sizes": [[3, 3, 3]] * 3,
        "spatial_dims": 3,
        "num_queries": 4,
        "embed_dim": 8,
        "num_layers": 2,
        "num_heads": 2,
    },
    description="Mask-transformer U-Net (MaxQuery): queries as inlier cluster centres, OOD maps (2D/3D)",
    task="mask_segmentation",
    encoder=("backbone.encoder",),
    head=("class_head",),
    backbone="unet",
)
def build_maskformer_unet(
    in_channels: int,
    num_classes: int,
    *,
    spatial_dims: int = 3,
    deep_supervision: bool = True,
    features=None,
    strides=None,
    kernel_sizes=None,
    num_queries: int = 8,
    embed_dim: int = 32,
    num_layers: int = 3,
    num_heads: int = 4,
    **unet,
) -> MaskTransformerUNet:
    """The plan's U-Net topology (``features``/``strides``/``kernel_sizes`` as for ``unet``) with a
    query decoder: ``num_queries`` cluster centres of ``embed_dim`` channels, ``num_layers`` decoder
    layers of ``num_heads`` heads cross-attending in turn to the decoder stages below full resolution."""
    return MaskTransformerUNet(
        in_channels, num_classes, num_queries=num_queries, embed_dim=embed_dim, num_layers=num_layers,
        num_heads=num_heads, deep_supervision=deep_supervision, spatial_dims=spatial_dims,
        **unet_topology(spatial_dims, features, strides, kernel_sizes), **unet,
    )  # fmt: skip
