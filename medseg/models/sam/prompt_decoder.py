"""SAM's prompt encoder and two-way-transformer mask decoder (Kirillov et al. 2023), in plain PyTorch.

Prompts (boxes as two corner points, clicks as labelled points) become sparse tokens: a random-Fourier
positional encoding of their coordinates plus a learned embedding per kind. The mask decoder runs two
two-way attention blocks between [IoU token, mask tokens, prompt tokens] and the image embedding, upsamples
the embedding 4x with transposed convolutions and takes dot products with per-mask hypernetwork outputs.
Parameter names follow the published checkpoints. Attention uses ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from medseg.models.sam.common import MLP, LayerNorm2d


class RandomFourierPE(nn.Module):
    """Positional encoding with a fixed random Gaussian frequency matrix (``positional_encoding_gaussian_matrix``)."""

    def __init__(self, num_feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_feats))

    def encode(self, coords01: torch.Tensor) -> torch.Tensor:
        """(..., 2) x/y in [0, 1] -> (..., 2 * num_feats)."""
        proj = 2 * math.pi * ((2 * coords01 - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def grid(self, h: int, w: int) -> torch.Tensor:
        """(C, h, w) encoding of the pixel centres of an h x w grid."""
        dev = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        return self.encode(torch.stack([xx, yy], dim=-1)).permute(2, 0, 1)


class PromptEncoder(nn.Module):
    def __init__(self, embed_dim: int = 256, image_embedding_size=(64, 64), input_image_size=(256, 256),
                 mask_in_chans: int = 16):
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = RandomFourierPE(embed_dim // 2)
        # 0/1: negative/positive click, 2/3: box top-left / bottom-right corner
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, 2, stride=2), LayerNorm2d(mask_in_chans // 4), nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, 2, stride=2), LayerNorm2d(mask_in_chans), nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, 1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def dense_pe(self) -> torch.Tensor:
        return self.pe_layer.grid(*self.image_embedding_size).unsqueeze(0)

    def _encode_coords(self, xy: torch.Tensor) -> torch.Tensor:
        h, w = self.input_image_size
        scale = torch.tensor([1.0 / w, 1.0 / h], device=xy.device)
        return self.pe_layer.encode((xy.float() + 0.5) * scale)  # +0.5: pixel centres

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 4) x0 y0 x1 y1 in input pixels -> (B, 2, C)."""
        emb = self._encode_coords(boxes.reshape(-1, 2, 2))
        corners = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return emb + corners.unsqueeze(0)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """(B, N, 2) x/y and (B, N) labels (1 positive, 0 negative, -1 padding) -> (B, N(+1), C)."""
        if pad:  # SAM appends one "not a point" when there is no box
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        emb = self._encode_coords(points)
        lab = labels.unsqueeze(-1)
        emb = torch.where(lab == -1, self.not_a_point_embed.weight, emb)
        emb = emb + (lab == 0) * self.point_embeddings[0].weight + (lab == 1) * self.point_embeddings[1].weight
        return emb

    def forward(self, boxes: torch.Tensor | None = None, points: tuple | None = None, masks: torch.Tensor | None = None):
        """Sparse (B, N, C) and dense (B, C, h, w) prompt embeddings."""
        sparse = []
        if points is not None:
            sparse.append(self.embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        batch = next((s.shape[0] for s in sparse), masks.shape[0] if masks is not None else 1)
        weight = self.no_mask_embed.weight
        sparse_t = torch.cat(sparse, dim=1) if sparse else weight.new_zeros(batch, 0, self.embed_dim)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = weight.reshape(1, -1, 1, 1).expand(batch, -1, *self.image_embedding_size)
            if not torch.is_grad_enabled():  # a view of a parameter keeps requires_grad without a grad_fn,
                dense = dense.detach()  # which module hooks (FlopCounterMode) refuse
        return sparse_t, dense


class Attention(nn.Module):
    """Multi-head attention with projections to ``dim // downsample`` channels (SAM's decoder attention)."""

    def __init__(self, dim: int, num_heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x):
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q, k, v):
        out = F.scaled_dot_product_attention(self._heads(self.q_proj(q)), self._heads(self.k_proj(k)),
                                             self._heads(self.v_proj(v)))
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayBlock(nn.Module):
    """Token self-attention, token->image attention, token MLP, image->token attention (each + LayerNorm)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_pe: bool):
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.cross_attn_token_to_image = Attention(dim, num_heads, 2)
        self.cross_attn_image_to_token = Attention(dim, num_heads, 2)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.LayerNorm(dim) for _ in range(4))
        self.skip_first_pe = skip_first_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int = 2, dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, num_heads, mlp_dim, skip_first_pe=i == 0) for i in range(depth))
        self.final_attn_token_to_image = Attention(dim, num_heads, 2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image, image_pe, tokens):
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        queries = queries + self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries), keys


class MaskDecoder(nn.Module):
    def __init__(self, dim: int = 256, num_multimask_outputs: int = 3, depth: int = 2, num_heads: int = 8,
                 mlp_dim: int = 2048, iou_head_depth: int = 3, iou_head_hidden: int = 256):
        super().__init__()
        self.num_mask_tokens = num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(depth, dim, num_heads, mlp_dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, stride=2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, 2, stride=2), nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(dim, iou_head_hidden, self.num_mask_tokens, iou_head_depth)

    def upscaled_features(self, src: torch.Tensor) -> torch.Tensor:
        return self.output_upscaling(src)

    def forward(self, image_embeddings, image_pe, sparse, dense, multimask: bool = False, return_features=False):
        """Masks (P, 1 or 3, 4h, 4w) and IoU predictions for P prompts; ``image_embeddings`` is (1 or P, C, h, w)."""
        p = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(p, -1, -1).to(sparse.dtype), sparse], dim=1)
        src = image_embeddings.expand(p, -1, -1, -1) if image_embeddings.shape[0] == 1 else image_embeddings
        src = src + dense
        b, c, h, w = src.shape
        hs, keys = self.transformer(src, image_pe.expand(p, -1, -1, -1), tokens)
        mask_tokens = hs[:, 1 : 1 + self.num_mask_tokens]
        up = self.upscaled_features(keys.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        masks = (hyper @ up.flatten(2)).view(b, -1, *up.shape[2:])
        iou = self.iou_prediction_head(hs[:, 0])
        sl = slice(1, None) if multimask else slice(0, 1)
        if return_features:
            return masks[:, sl], iou[:, sl], {"upscaled": up, "mask_tokens": mask_tokens, "hyper": hyper[:, sl]}
        return masks[:, sl], iou[:, sl]
