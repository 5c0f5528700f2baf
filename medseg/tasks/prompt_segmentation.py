"""Prompt segmentation (Segment-Anything models): an image and a box -> one binary mask per box.

A prompt model is not tiled over a volume: the whole image (a slice of a volume) is resized to the
network's input and every box on it is decoded from one image embedding, so inference goes through
:mod:`medseg.sam` (``medseg sam``), not the sliding-window predictor, which refuses these models by
their task's ``sliding_window = False``.

Training goes through the one Trainer like every other task (2D configurations). Per sample of a
batch, after the segmentation task's augmentation, :func:`prompt_targets` picks one object (a random
foreground label, then a random 8-connected component of it) and gives its binary mask as the
target and its bounding box, enlarged as MedSAM does (0..``bbox_shift`` px per side, default 5,
clipped to the patch), as ``cond["boxes"]`` (B, 4) x0 y0 x1 y1 in patch pixels (inclusive indices,
as ``medseg sam`` takes boxes). A sample without foreground gets a random box and an empty target.
:meth:`PromptSegmentationTask.forward` fits the patch into the network's square input the way
``medseg sam`` does (longest side to ``img_size``, zero padding bottom/right, boxes scaled) and
returns logits at the patch size; a resolution-free model (I-MedSAM: ``output_size``) decodes at the
patch size directly and also returns its coarse logits, which the ``prompt_dice_bce`` loss
supervises alongside the refined ones. In training it renders only ``train_points`` (task option,
default 4096) uniformly random points of the patch, supervised by the label of the pixel each falls
in (``point_target``): the per-pixel MLPs cost ~14x less than on a 224x256 grid. Validation renders
the whole patch: the mean Dice of the prompted objects.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.nn.functional as F

from medseg.augment.transforms import augment_batch
from medseg.tasks.base import Batch, Task, register_task

BBOX_SHIFT = 5  # MedSAM's random box enlargement, pixels per side
# a resolution-free decoder trains on this many random points per patch (0: the whole patch grid)
TRAIN_POINTS = 4096


def pick_object(labels: np.ndarray, rng: torch.Generator) -> np.ndarray:
    """A boolean mask of one object of a 2D label map: a random foreground value (> 0), then a random
    8-connected component of it; all False when there is no foreground."""
    from scipy import ndimage

    values = np.unique(labels[labels > 0])
    if values.size == 0:
        return np.zeros(labels.shape, dtype=bool)
    value = values[int(torch.randint(values.size, (1,), generator=rng))]
    components, n = ndimage.label(labels == value, structure=np.ones((3, 3), dtype=bool))
    return components == 1 + int(torch.randint(n, (1,), generator=rng))


def object_box(mask: np.ndarray, rng: torch.Generator, bbox_shift: int = BBOX_SHIFT) -> np.ndarray:
    """x0 y0 x1 y1 (inclusive pixel indices) of ``mask``'s bounding box, each side moved out by a random
    0..``bbox_shift`` px and clipped to the image; a random box of at least 2 x 2 px for an empty mask."""
    h, w = mask.shape
    if not mask.any():
        x0 = int(torch.randint(w - 1, (1,), generator=rng))
        y0 = int(torch.randint(h - 1, (1,), generator=rng))
        x1 = int(torch.randint(x0 + 1, w, (1,), generator=rng))
        y1 = int(torch.randint(y0 + 1, h, (1,), generator=rng))
        return np.array([x0, y0, x1, y1], dtype=np.float32)
    ys, xs = np.nonzero(mask)
    shift = torch.randint(bbox_shift + 1, (4,), generator=rng).tolist()
    return np.array(
        [max(xs.min() - shift[0], 0), max(ys.min() - shift[1], 0),
         min(xs.max() + shift[2], w - 1), min(ys.max() + shift[3], h - 1)],
        dtype=np.float32,
    )  # fmt: skip


def prompt_targets(seg: torch.Tensor, rng: torch.Generator, bbox_shift: int = BBOX_SHIFT):
    """(B, 1, H, W) label maps -> (B, 1, H, W) binary targets of one object each and their (B, 4) boxes."""
    labels = seg[:, 0].cpu().numpy()
    masks = [pick_object(lab, rng) for lab in labels]
    boxes = np.stack([object_box(m, rng, bbox_shift) for m in masks])
    target = torch.from_numpy(np.stack(masks)[:, None].astype(np.int64)).to(seg.device)
    return target, torch.from_numpy(boxes).to(seg.device)


def fit_to_input(image: torch.Tensor, boxes: torch.Tensor, size: int):
    """(B, C, H, W) patch and its (B, 4) boxes -> the network's (B, C, size, size) input (longest side to
    ``size``, zero padding bottom/right, as ``medseg sam`` prepares images), the boxes in its pixels
    and the resized (h, w) the patch covers."""
    from medseg.sam.preprocess import resized_shape

    hw = tuple(image.shape[-2:])
    if hw == (size, size):
        return image, boxes, hw
    h, w = resized_shape(hw, size)
    small = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=False, antialias=max(hw) > size)
    return F.pad(small, (0, size - w, 0, size - h)), boxes * (size / max(hw)), (h, w)


@register_task("prompt_segmentation")
class PromptSegmentationTask(Task):
    name = "prompt_segmentation"
    loss_name = "prompt_dice_bce"
    sliding_window = False
    prompt_command = "medseg sam"
    option_names = ("bbox_shift", "train_points")

    def make_batch(self, sample, device, patch_size, augment, g) -> Batch:
        if len(patch_size) != 2:
            raise ValueError(f"prompt_segmentation trains 2D configurations (-c 2d); got patch {list(patch_size)}")
        img = torch.from_numpy(sample["image"]).to(device, non_blocking=True)
        seg = torch.from_numpy(sample["seg"].astype(np.int64)).to(device, non_blocking=True)
        img, seg = augment_batch(img, seg, patch_size, augment, g)
        target, boxes = prompt_targets(seg, g, int(self.options.get("bbox_shift", BBOX_SHIFT)))
        return Batch(img, target, {"boxes": boxes})

    def forward(self, model, batch: Batch):
        """``{"logits": (B, 1, H, W)}`` at the patch size (+ ``coarse_logits`` from I-MedSAM)."""
        net = getattr(model, "module", model)  # DDP wraps the network; calls still go through ``model``
        size = int(getattr(net, "img_size", batch.image.shape[-1]))
        image, boxes, (h, w) = fit_to_input(batch.image, batch.cond["boxes"], size)
        patch = tuple(batch.image.shape[-2:])
        if "output_size" in inspect.signature(net.forward).parameters:  # resolution-free decoder
            extent = (h / size, w / size)
            n = int(self.options.get("train_points", TRAIN_POINTS))
            if net.training and 0 < n < patch[0] * patch[1]:
                return self._point_forward(model, image, boxes, batch.target, patch, extent, n)
            out = model(image, boxes=boxes, output_size=patch, extent=extent, return_all=True)
            return {"logits": out.logits, "coarse_logits": out.coarse}
        logits = model(image, boxes=boxes)
        if logits.shape[-2:] != patch:
            logits = F.interpolate(logits[..., :h, :w], size=patch, mode="bilinear", align_corners=False)
        return {"logits": logits}

    @staticmethod
    def _point_forward(model, image, boxes, target, patch, extent, n: int) -> dict:
        """Training on ``n`` uniformly random points of the patch (an implicit decoder is a function of
        the coordinate, so it is supervised where it is evaluated): (B, 1, n, 1) logits, coarse
        logits and ``point_target``, the label of the patch pixel each point falls in."""
        u = torch.rand(n, 2, device=image.device)  # x, y in patch fractions (the run's seeded stream)
        points = u * torch.tensor([extent[1], extent[0]], device=image.device)  # -> frame fractions
        out = model(image, boxes=boxes, output_size=patch, extent=extent, return_all=True, points=points)
        rows = (u[:, 1] * patch[0]).long().clamp_max(patch[0] - 1)
        cols = (u[:, 0] * patch[1]).long().clamp_max(patch[1] - 1)
        return {"logits": out.logits, "coarse_logits": out.coarse, "point_target": target[:, :, rows, cols, None]}

    # ------------------------------------------------------------------ validation
    def validation_state(self) -> torch.Tensor:
        return torch.zeros(2, dtype=torch.float64)  # sum of per-object Dice, number of objects

    def validation_update(self, state, prediction, batch) -> None:
        pred = self.outputs(prediction)["logits"][:, 0] > 0
        ref = batch.target[:, 0] > 0
        has = ref.flatten(1).any(1)  # samples without foreground (random box) have no object to score
        inter = (pred & ref).flatten(1).sum(1).double()
        size = pred.flatten(1).sum(1).double() + ref.flatten(1).sum(1).double()
        state[0] += float((2 * inter / size.clamp_min(1))[has].sum())
        state[1] += float(has.sum())

    def validation_summary(self, state) -> dict:
        if state is None or float(state[1]) == 0:
            return {"prompt_dice": None, "prompt_objects": 0}
        return {"prompt_dice": round(float(state[0] / state[1]), 4), "prompt_objects": int(state[1])}

    def summary_line(self, summary: dict) -> str:
        """``prompt Dice 0.8123 (40 objects)``."""
        if summary.get("prompt_dice") is None:
            return "prompt Dice n/a"
        return f"prompt Dice {summary['prompt_dice']:.4f} ({summary['prompt_objects']} objects)"
