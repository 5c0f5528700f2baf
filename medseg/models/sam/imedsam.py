"""I-MedSAM (Wei et al., ECCV 2024, arXiv 2311.17081) on top of medseg's LiteMedSAM.

Parameter-efficient fine-tuning of a frozen LiteMedSAM with an implicit (resolution-free) mask head:

* **LoRA** (rank 4, ``alpha`` / rank scaling, B zero-initialised) on the query and value projections of
  every TinyViT attention block's fused ``qkv`` Linear. The fused output is laid out per head as
  ``[q, k, v]`` chunks of ``head_dim`` features each, so the delta is written into those slices only.
* **Frequency adapter**: the log-amplitude spectrum of the grey image (the mean over channels), passed
  through the *frozen* patch embedding, area-pooled to each stage's token grid; per attention block a
  bottleneck (LayerNorm, down-projection, GELU, up-projection, up zero-initialised) adds it to the block's
  output. The reference code chains one adapter's output into the next; here every block reads the
  pooled spectrum tokens directly (simpler, and no stage-to-stage width changes to bridge).
* **Implicit decoder**: for every output pixel of an ``output_size`` chosen at call time, the
  mask decoder's 4x-upscaled embedding sampled bilinearly at the pixel centre, SAM's random-Fourier
  positional encoding evaluated there (the continuous function behind ``dense_pe``) and a NeRF
  encoding of the coordinates go through a coarse MLP twice with MC dropout. The coarse prediction is
  the mean of the two runs; the variance of their logits ranks the pixels and the most uncertain
  ``refine_ratio`` (12.5 %, ``ceil``) per prompt are re-predicted by a fine MLP from the coarse output
  and the pixel features.

What trains (:meth:`IMedSAM.trainable_parameters`): LoRA, frequency adapters, the prompt encoder, the
mask decoder's output upscaling (it feeds the implicit decoder) and the implicit decoder; the rest of
LiteMedSAM has ``requires_grad=False`` and its image encoder stays in eval mode (frozen BatchNorm
statistics). At the full configuration that is **1,490,238 trainable parameters** (of 11.2 M; the
paper reports 1.6 M on SAM ViT-B): implicit decoder 1,249,282, frequency adapters 131,088, output
upscaling 73,952, LoRA 29,696, prompt encoder 6,220.

**Dropout in eval.** MC dropout stays on in eval (without it the two coarse runs agree and the
uncertainty ranking is arbitrary), but its masks come from a private generator seeded with ``mc_seed``
at every call, so an eval forward is a pure function of its inputs (the same call gives the same
logits; the masks depend on the call's tensor shapes, so a prompt decoded alone or in a batch may
differ slightly). Training draws the masks from the global RNG. The paper's coordinate-frequency
annealing (``epoch_T``) is not implemented.

Deviations from the reference code: the grey image is the mean of all channels (the reference reads
the red channel three times); the spectrum is ``log1p``-compressed before its min-max scaling (the raw
amplitude is a single DC spike after scaling); the MLPs use LayerNorm instead of per-pixel BatchNorm;
dropout sits on the coarse MLP's hidden layers (the reference drops out the head's output, so its
"variance" mostly measures the output's magnitude); the top-k selection is per prompt, not over the
whole flattened batch.

Weights: :meth:`IMedSAM.load_base_state_dict` takes a LiteMedSAM state dict (keys as in
``litemedsam``'s model folder), the ``base_weights`` argument loads one at build time (a LiteMedSAM
model folder, a ``.safetensors`` file or the name ``litemedsam``), and then a state dict with only the
trainable tensors (:meth:`IMedSAM.trainable_state_dict`) loads strictly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from medseg.models.registry import register_model
from medseg.models.sam.litemedsam import LiteMedSAM
from medseg.models.sam.tinyvit import TinyViTBlock

TRAINABLE = ("adapters", "implicit_decoder", "base.prompt_encoder", "base.mask_decoder.output_upscaling")


# ----------------------------------------------------------------------------------------- encoder side
class QVLoRA(nn.Module):
    """Low-rank deltas for the q and v slices of a fused per-head ``[q, k, v]`` Linear (k untouched)."""

    def __init__(self, dim: int, num_heads: int, rank: int = 4, alpha: float = 4.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scaling = alpha / rank
        self.q_a, self.q_b = nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim, bias=False)
        self.v_a, self.v_b = nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim, bias=False)
        for a, b in ((self.q_a, self.q_b), (self.v_a, self.v_b)):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., 3 * dim) in the fused layout (heads, [q, k, v], head_dim), zero on k."""
        shape = (*x.shape[:-1], self.num_heads, 1, self.head_dim)
        dq = self.q_b(self.q_a(x)).reshape(shape)
        dv = self.v_b(self.v_a(x)).reshape(shape)
        return (torch.cat([dq, torch.zeros_like(dq), dv], dim=-2) * self.scaling).flatten(-3)

    def hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the ``qkv`` Linear (a bound method, so ``deepcopy`` of the model rebinds it)."""
        return output + self.delta(inputs[0]).to(output.dtype)


class FrequencyAdapter(nn.Module):
    """Bottleneck from the spectrum tokens (patch-embedding width) to a block's width; up zero-initialised."""

    def __init__(self, in_dim: int, dim: int, hidden: int, context: dict):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.down, self.up = nn.Linear(in_dim, hidden), nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.context = context  # shared with EncoderAdapters: the current call's spectrum tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(self.norm(tokens))))

    def hook(self, block: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on a TinyViT block: output (B, H*W, C) + adapter(spectrum tokens at H x W)."""
        tokens = self.context.get("tokens")
        if tokens is None:  # the encoder run outside IMedSAM.embed: no spectrum, plain block
            return output
        return output + self(tokens(block.resolution)).to(output.dtype)


class EncoderAdapters(nn.Module):
    """LoRA and frequency adapters for every attention block of a TinyViT, attached by forward hooks so
    the base keeps its parameter names (LiteMedSAM weights load into ``base`` unchanged)."""

    def __init__(self, encoder: nn.Module, rank: int = 4, alpha: float = 4.0, adapter_ratio: float = 0.25):
        super().__init__()
        self.context: dict = {}
        blocks = [m for m in encoder.modules() if isinstance(m, TinyViTBlock)]
        in_dim = encoder.patch_embed.seq[-1].c.out_channels
        self.lora = nn.ModuleList(QVLoRA(b.attn.qkv.in_features, b.attn.num_heads, rank, alpha) for b in blocks)
        self.freq = nn.ModuleList(
            FrequencyAdapter(in_dim, d, max(1, int(d * adapter_ratio)), self.context)
            for d in (b.attn.qkv.in_features for b in blocks)
        )
        for block, lora, freq in zip(blocks, self.lora, self.freq):
            block.attn.qkv.register_forward_hook(lora.hook)
            block.register_forward_hook(freq.hook)


def amplitude_spectrum(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images in [0, 1] -> (B, 1, H, W) centred log-amplitude spectrum of the grey image
    (mean over channels, on the 0..255 scale), min-max scaled to [0, 1] per image."""
    grey = images.float().mean(1) * 255.0
    amp = torch.log1p(torch.fft.fftshift(torch.fft.fft2(grey), dim=(-2, -1)).abs())
    lo = amp.amin(dim=(-2, -1), keepdim=True)
    hi = amp.amax(dim=(-2, -1), keepdim=True)
    return ((amp - lo) / (hi - lo).clamp_min(1e-6)).unsqueeze(1)


# ----------------------------------------------------------------------------------------- decoder side
def pixel_coords(size: tuple[int, int], extent: tuple[float, float] = (1.0, 1.0), device=None) -> torch.Tensor:
    """(H*W, 2) x/y pixel centres of an H x W output grid covering the top-left ``extent`` (rows, cols)
    fraction of the model's input frame, in [0, 1] frame units."""
    h, w = size
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * extent[0]
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * extent[1]
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy], dim=-1).reshape(-1, 2)


def fourier_encode(coords01: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """NeRF encoding of (..., 2) coordinates in [0, 1] (mapped to [-1, 1]): input, sin, cos at 2^k pi."""
    x = 2 * coords01 - 1
    freqs = math.pi * 2.0 ** torch.arange(num_freqs, device=x.device, dtype=x.dtype)
    proj = (x[..., None] * freqs).flatten(-2)
    return torch.cat([x, torch.sin(proj), torch.cos(proj)], dim=-1)


def select_uncertain(variance: torch.Tensor, ratio: float) -> torch.Tensor:
    """(P, N) per-pixel variances -> (P, k) indices of the k = ceil(ratio * N) most uncertain pixels."""
    n = variance.shape[-1]
    k = min(n, max(1, math.ceil(ratio * n - 1e-9)))
    return variance.topk(k, dim=-1).indices


def mc_dropout(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Dropout that is always on; masks from ``generator`` when given (eval), else the global RNG."""
    if p <= 0:
        return x
    if generator is None:
        return F.dropout(x, p, training=True)
    keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32) >= p
    return x * keep.to(x.dtype) / (1 - p)


def _mlp_layer(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, cout), nn.LayerNorm(cout), nn.ReLU())


@dataclass
class ImplicitOutput:
    """``logits`` (P, 1, H, W) after refinement; ``coarse`` (P, 1, H, W) the MC mean before it (the paper
    supervises both); ``uncertainty`` (P, 1, H, W) the variance of the two coarse logits; ``selected``
    (P, k) flat indices (row-major over H x W) of the refined pixels."""

    logits: torch.Tensor
    coarse: torch.Tensor
    uncertainty: torch.Tensor
    selected: torch.Tensor


class ImplicitDecoder(nn.Module):
    """Coarse-to-fine per-pixel MLPs over (sampled features, positional encoding, Fourier coordinates)."""

    def __init__(
        self,
        feat_dim: int = 32,
        pe_dim: int = 256,
        hidden: int = 256,
        num_freqs: int = 10,
        dropout: float = 0.5,
        refine_ratio: float = 0.125,
        mc_seed: int = 0,
    ):
        super().__init__()
        self.num_freqs, self.dropout, self.refine_ratio, self.mc_seed = num_freqs, dropout, refine_ratio, mc_seed
        self.in_dim = feat_dim + pe_dim + 2 + 4 * num_freqs
        self.coarse = nn.ModuleList([_mlp_layer(self.in_dim, 4 * hidden), _mlp_layer(4 * hidden, 2 * hidden)])
        self.coarse_out = nn.Linear(2 * hidden, 1 + hidden)  # logit + a feature for the fine MLP
        self.fine = nn.Sequential(
            _mlp_layer(self.in_dim + 1 + hidden, hidden),
            _mlp_layer(hidden, hidden),
            _mlp_layer(hidden, hidden // 2),
            nn.Linear(hidden // 2, 1),
        )

    def pixel_features(self, upscaled: torch.Tensor, pe_layer: nn.Module, coords: torch.Tensor) -> torch.Tensor:
        """(P, N, in_dim) features at N (x, y) points ``coords`` (N, 2) in [0, 1] frame units."""
        p = upscaled.shape[0]
        grid = (2 * coords - 1).to(upscaled.dtype).view(1, 1, -1, 2).expand(p, -1, -1, -1)
        feats = F.grid_sample(upscaled, grid, mode="bilinear", padding_mode="border", align_corners=False)
        feats = feats.squeeze(2).transpose(1, 2)  # (P, N, feat_dim)
        pos = torch.cat([pe_layer.encode(coords), fourier_encode(coords, self.num_freqs)], dim=-1)
        return torch.cat([feats, pos.to(feats.dtype).expand(p, -1, -1)], dim=-1)

    def coarse_runs(self, feats: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two MC-dropout runs of the coarse MLP on (P, n, in_dim) -> their mean (P, n, 1 + hidden) and the
        variance of their logits (P, n). The first layer precedes any dropout, so it runs once for both."""
        x = self.coarse[0](feats).unsqueeze(0).expand(2, -1, -1, -1)
        x = mc_dropout(x, self.dropout, generator)
        for layer in self.coarse[1:]:
            x = mc_dropout(layer(x), self.dropout, generator)
        runs = self.coarse_out(x)  # (2, P, n, 1 + hidden)
        return runs.mean(0), runs[..., 0].float().var(0, unbiased=False)

    def forward(
        self,
        upscaled: torch.Tensor,
        pe_layer: nn.Module,
        size: tuple[int, int],
        extent: tuple[float, float] = (1.0, 1.0),
        chunk: int | None = None,
        points: torch.Tensor | None = None,
    ) -> ImplicitOutput:
        """``chunk``: run the coarse MLP over at most this many pixels at a time (large outputs at inference;
        the selection still ranks all pixels of a prompt together). ``points``: (N, 2) x/y frame
        coordinates in [0, 1] to render instead of the ``size`` grid (training on sampled points);
        the outputs are then (P, 1, N, 1)."""
        h, w = size if points is None else (points.shape[0], 1)
        coords = pixel_coords(size, extent, upscaled.device) if points is None else points.to(upscaled.device)
        feats = self.pixel_features(upscaled, pe_layer, coords.float())
        gen = None
        if not self.training:
            gen = torch.Generator(device=feats.device).manual_seed(self.mc_seed)
        n = feats.shape[1]
        step = n if chunk is None else max(1, int(chunk))
        parts = [self.coarse_runs(feats[:, i : i + step], gen) for i in range(0, n, step)]
        coarse = torch.cat([c for c, _ in parts], dim=1) if len(parts) > 1 else parts[0][0]
        variance = torch.cat([v for _, v in parts], dim=1) if len(parts) > 1 else parts[0][1]
        idx = select_uncertain(variance, self.refine_ratio)  # (P, k)
        picked = torch.cat([feats, coarse], dim=-1).gather(
            1, idx.unsqueeze(-1).expand(-1, -1, self.in_dim + coarse.shape[-1])
        )
        fine = self.fine(picked).squeeze(-1)  # (P, k)
        coarse_logit = coarse[..., 0]
        logits = coarse_logit.scatter(1, idx, fine.to(coarse_logit.dtype))
        p = logits.shape[0]
        return ImplicitOutput(logits.view(p, 1, h, w), coarse_logit.view(p, 1, h, w), variance.view(p, 1, h, w), idx)


# ----------------------------------------------------------------------------------------- the model
class IMedSAM(nn.Module):
    """LiteMedSAM (``base``, frozen) + ``adapters`` (LoRA, frequency) + ``implicit_decoder``."""

    pretrained_prefix = "base."  # --pretrained litemedsam: LiteMedSAM's tensors load into the base
    resolution_free = True  # decode renders any output size (medseg sam: the input's own grid)

    def __init__(
        self,
        in_channels: int = 3,
        *,
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        adapter_ratio: float = 0.25,
        decoder_hidden: int = 256,
        num_freqs: int = 10,
        dropout: float = 0.5,
        refine_ratio: float = 0.125,
        mc_seed: int = 0,
        base_weights: str | None = None,
        base_sha256: str | None = None,
        **arch,
    ):
        super().__init__()
        self.base = LiteMedSAM(in_channels, **arch)
        self.img_size = self.base.img_size
        self.adapters = EncoderAdapters(self.base.image_encoder, lora_rank, lora_alpha, adapter_ratio)
        dim = self.base.prompt_encoder.embed_dim
        self.implicit_decoder = ImplicitDecoder(
            dim // 8, dim, decoder_hidden, num_freqs, dropout, refine_ratio, mc_seed
        )
        self.base.requires_grad_(False)
        for name, p in self.named_parameters():
            if _is_trainable(name):
                p.requires_grad_(True)
        self.base_weights = base_weights
        if base_weights is not None:
            from medseg.sam.weights import read_base_weights

            self.load_base_state_dict(read_base_weights(base_weights, base_sha256))
        self.train()

    # ---- parameters and weights
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters I-MedSAM fine-tunes (by name, whatever ``requires_grad`` says at the moment)."""
        return [(n, p) for n, p in self.named_parameters() if _is_trainable(n)]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the fine-tuned tensors (1.5 M at the full config), for a folder that names its base."""
        names = {n for n, _ in self.trainable_parameters()}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def load_base_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load LiteMedSAM weights (``litemedsam``'s keys, or the same under ``base.``) into the base."""
        if state and all(k.startswith("base.") for k in state):
            state = {k[len("base.") :]: v for k, v in state.items()}
        self.base.load_state_dict(state)
        _drop_cached_biases(self)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's; when the base came from ``base_weights``, frozen base tensors may be absent."""
        if not (strict and self.base_weights is not None):
            out = super().load_state_dict(state_dict, strict=strict, assign=assign)
            _drop_cached_biases(self)
            return out
        out = super().load_state_dict(state_dict, strict=False, assign=assign)
        _drop_cached_biases(self)
        trainable = {n for n, _ in self.trainable_parameters()}
        frozen_base = {k for k in self.state_dict() if k.startswith("base.") and k not in trainable}
        missing = [k for k in out.missing_keys if k not in frozen_base]
        if missing or out.unexpected_keys:
            raise RuntimeError(f"IMedSAM.load_state_dict: missing keys {missing}, unexpected {out.unexpected_keys}")
        return out

    def train(self, mode: bool = True) -> IMedSAM:
        """The frozen image encoder stays in eval mode (its BatchNorm statistics do not drift)."""
        super().train(mode)
        self.base.image_encoder.eval()
        return self

    # ---- network
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) images in [0, 1] -> (B, 256, S/4, S/4) embeddings with LoRA and frequency adapters."""
        encoder = self.base.image_encoder
        images = self.base.encoder_input(images)  # grey -> 3 channels when built with in_channels=1
        spectrum = amplitude_spectrum(images).to(images.dtype).expand(-1, images.shape[1], -1, -1)
        freq = encoder.patch_embed(spectrum)  # (B, c0, S, S), frozen
        pooled: dict[tuple[int, int], torch.Tensor] = {}

        def tokens(res: tuple[int, int]) -> torch.Tensor:
            if res not in pooled:
                pooled[res] = F.adaptive_avg_pool2d(freq, res).flatten(2).transpose(1, 2)
            return pooled[res]

        self.adapters.context["tokens"] = tokens
        try:
            return encoder(images)
        finally:
            self.adapters.context.clear()

    def decode(
        self,
        embedding: torch.Tensor,
        boxes: torch.Tensor | None = None,
        output_size: tuple[int, int] | None = None,
        extent: tuple[float, float] = (1.0, 1.0),
        return_all: bool = False,
        chunk: int | None = None,
        points: torch.Tensor | None = None,
    ):
        """Logits (P, 1, H, W) for P box prompts on one embedding (1, C, h, w), or on P embeddings.

        ``boxes``: (P, 4) x0 y0 x1 y1 in input pixels (as LiteMedSAM). ``output_size`` (H, W) defaults to
        the input frame (S, S); the grid covers the top-left ``extent`` (rows, cols) fraction of the
        frame, e.g. the unpadded part of a resized image. ``return_all``: an :class:`ImplicitOutput`.
        ``chunk``: pixels per coarse-MLP pass (bounds the memory of large outputs at inference).
        ``points``: (N, 2) x/y frame coordinates in [0, 1] rendered instead of a grid: (P, 1, N, 1)."""
        prompt = self.base.prompt_encoder
        sparse, dense = prompt(boxes=boxes)
        if sparse.shape[0] == 1 and embedding.shape[0] > 1:  # no prompt: one empty prompt per embedding
            sparse = sparse.expand(embedding.shape[0], -1, -1)
            dense = dense.expand(embedding.shape[0], -1, -1, -1)
        dtype = embedding.dtype
        pe = prompt.dense_pe().to(dtype)
        _, _, feats = self.base.mask_decoder(embedding, pe, sparse.to(dtype), dense.to(dtype), return_features=True)
        size = tuple(output_size) if output_size is not None else (self.img_size, self.img_size)
        out = self.implicit_decoder(feats["upscaled"], prompt.pe_layer, size, extent, chunk, points)
        return out if return_all else out.logits

    def forward(
        self,
        image: torch.Tensor,
        boxes: torch.Tensor | None = None,
        output_size: tuple[int, int] | None = None,
        return_all: bool = False,
        extent: tuple[float, float] = (1.0, 1.0),
        points: torch.Tensor | None = None,
    ):
        """Training form: one box per image, (B, 1, H, W) logits (``output_size`` default: the image's);
        ``extent`` as in :meth:`decode` (the part of the square input an image resized into it covers);
        ``points`` (N, 2): render only these frame points, (B, 1, N, 1)."""
        size = tuple(output_size) if output_size is not None else tuple(image.shape[-2:])
        boxes = boxes.reshape(-1, 4) if boxes is not None else None
        return self.decode(self.embed(image), boxes, size, extent, return_all, points=points)

    @torch.no_grad()
    def for_inference(self) -> IMedSAM:
        """Eval mode with the base's BatchNorms folded (the adapters' hooks stay attached)."""
        self.eval()
        self.base.for_inference()
        return self


def _is_trainable(name: str) -> bool:
    return any(name == q or name.startswith(q + ".") for q in TRAINABLE)


def _drop_cached_biases(model: nn.Module) -> None:
    """WindowAttention keeps its gathered position biases while not training (refreshed when the
    parameter's version changes); dropping the key forces a refresh in any case."""
    for m in model.modules():
        if getattr(m, "_bias_key", None) is not None:
            m._bias_key = None


@register_model(
    "imedsam",
    task="prompt_segmentation",
    description="I-MedSAM: frozen LiteMedSAM + LoRA, frequency adapters and an implicit (resolution-free) decoder",
    test_config={
        "img_size": 64,
        "embed_dims": [8, 16, 16, 32],
        "depths": [1, 1, 1, 1],
        "num_heads": [1, 1, 1, 2],
        "window_sizes": [7, 7, 7, 7],
        "decoder_hidden": 16,
        "num_freqs": 4,
        "input_size": [64, 64],
        "spatial_dims": 2,
    },
    encoder=("adapters",),
    head=("implicit_decoder",),
    input_shape=(3, 256, 256),
)
def build_imedsam(
    in_channels: int = 3, num_classes: int = 1, *, spatial_dims: int = 2, deep_supervision=False, **arch
) -> IMedSAM:
    """One binary mask per box prompt, whatever ``num_classes`` says; ``deep_supervision`` does not apply.
    The registry's ``encoder`` is the adapters (LoRA + frequency), not the TinyViT: freezing and then
    unfreezing "the encoder" (--freeze-encoder-epochs) must not un-freeze the base."""
    if spatial_dims != 2:
        raise ValueError("imedsam is a 2D model (3D volumes are segmented slice by slice)")
    return IMedSAM(in_channels, **arch)
