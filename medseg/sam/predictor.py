"""Box-prompted inference with a SAM-family model folder: one embedding per image or slice, many prompts.

    predictor = SamPredictor.from_folder(resolve_sam_model("litemedsam"))
    logits = predictor.segment(image, boxes)          # (P, H, W) float logits at the input size
    masks = logits > 0

The image encoder runs once per image (:meth:`SamPredictor.embed`, cached for the last image); every
further prompt on it costs one mask-decoder pass. Precision follows medseg's rule (bf16 autocast on CPUs
with native bf16, fp32 otherwise or with ``amp=False``); BatchNorm is folded into the convolutions and the
encoder runs channels-last.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medseg.sam.preprocess import Resized, logits_to_input, prepare_image, scale_boxes


@dataclass
class Embedding:
    features: torch.Tensor  # (1, C, h, w)
    placement: Resized
    key: tuple | None = None


class SamPredictor:
    def __init__(self, net, *, device="cpu", amp: bool | None = None, size: int = 256, name: str = ""):
        from medseg.utils import autocast_dtype, resolve_device

        self.device = resolve_device(device) if isinstance(device, str) else device
        self.net = net.to(self.device)
        self.size = size
        self.name = name
        self.dtype = autocast_dtype(self.device, amp)
        self._cache: Embedding | None = None

    @classmethod
    def from_folder(cls, folder: str | Path, *, device="cpu", amp: bool | None = None) -> SamPredictor:
        from medseg.errors import CheckpointError
        from medseg.io.checkpoint import available_folds, load_spec, load_weights

        folder = Path(folder)
        spec = load_spec(folder)
        if spec.task != "prompt_segmentation":
            raise CheckpointError(folder, f"is a {spec.task} model, not a prompt (SAM) model: use medseg predict")
        folds = available_folds(folder)
        if not folds:
            raise CheckpointError(folder, "holds no fold_*/model.safetensors")
        net = spec.build()
        net.load_state_dict(load_weights(folder / f"fold_{folds[0]}"), strict=False)
        if hasattr(net, "for_inference"):
            net.for_inference()
        net.eval()
        # the network's square input (a fine-tuned model's plan patch is the training patch, e.g. 224 x 256)
        size = int(getattr(net, "img_size", spec.plan.configuration(spec.configuration).patch_size[0]))
        return cls(net, device=device, amp=amp, size=size, name=spec.model)

    def _autocast(self):
        from medseg.utils import autocast_context

        return autocast_context(self.device, self.dtype)

    @torch.inference_mode()
    def embed(self, image: np.ndarray, *, window=None, key=None) -> Embedding:
        """The image embedding of an (H, W) or (H, W, 3) image (reused while ``key`` is the same)."""
        if key is not None and self._cache is not None and self._cache.key == key:
            return self._cache
        x, placement = prepare_image(image, self.size, window)
        x = x[None].to(self.device).contiguous(memory_format=torch.channels_last)
        with self._autocast():
            feats = self.net.embed(x)
        self._cache = Embedding(feats, placement, key)
        return self._cache

    @torch.inference_mode()
    def decode(self, emb: Embedding, boxes: np.ndarray, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(P, H, W) float32 logits for (P, 4) boxes x0 y0 x1 y1 (input pixels) on an embedding.

        A fixed-resolution decoder (LiteMedSAM: 256 x 256 logits) is cropped to the resized image and
        resized bilinearly; a resolution-free one (I-MedSAM's implicit decoder, ``resolution_free``)
        renders the input's own pixel grid over the resized image's part of the frame.
        ``output_size``: (H', W') pixels over the same extent instead of the input's grid."""
        b = scale_boxes(boxes, emb.placement).to(self.device)
        p = emb.placement
        size = tuple(output_size) if output_size is not None else p.original
        with self._autocast():
            if getattr(self.net, "resolution_free", False):
                extent = (p.resized[0] / p.size, p.resized[1] / p.size)
                return self.net.decode(emb.features, boxes=b, output_size=size, extent=extent)[:, 0].float()
            logits, _ = self.net.decode(emb.features, boxes=b)
        return logits_to_input(logits, p, size)

    def segment(self, image: np.ndarray, boxes: np.ndarray, *, window=None, key=None) -> torch.Tensor:
        return self.decode(self.embed(image, window=window, key=key), boxes)
