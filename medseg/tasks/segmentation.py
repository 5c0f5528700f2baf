"""Semantic segmentation: image (+ conditions) -> class logits, Dice + CE, pseudo-Dice."""

from __future__ import annotations

import numpy as np
import torch

from medseg.augment.transforms import augment_batch
from medseg.tasks.base import Batch, Task, register_task


@register_task("segmentation")
class SegmentationTask(Task):
    """K-class semantic segmentation (nnU-Net): the target is a label map, the validation metric
    nnU-Net's pseudo-Dice (tp/fp/fn summed over the epoch's validation patches, per class)."""

    name = "segmentation"
    loss_name = "dice_ce"

    def make_batch(self, sample, device, patch_size, augment, g) -> Batch:
        img = torch.from_numpy(sample["image"]).to(device, non_blocking=True)
        seg = torch.from_numpy(sample["seg"].astype(np.int64)).to(device, non_blocking=True)
        cond = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in sample.get("cond", {}).items()}
        if cond:
            img, seg, cond = augment_batch(img, seg, patch_size, augment, g, cond=cond)
        else:
            img, seg = augment_batch(img, seg, patch_size, augment, g)
        return Batch(img, seg, cond)

    def validation_state(self) -> torch.Tensor:
        return torch.zeros(3, self.num_classes - 1, dtype=torch.float64)

    def _labels(self, prediction) -> torch.Tensor:
        out = self.outputs(prediction)["logits"]
        return out.argmax(1) if out.shape[1] > 1 else (out[:, 0] > 0).long()

    def validation_update(self, state, prediction, batch) -> None:
        pred, ref = self._labels(prediction), batch.target[:, 0]
        for c in range(1, self.num_classes):
            p, r = pred == c, ref == c
            state[0, c - 1] += float((p & r).sum())
            state[1, c - 1] += float((p & ~r).sum())
            state[2, c - 1] += float((~p & r).sum())

    def validation_summary(self, state) -> dict:
        if state is None:  # no validation cases
            return {"pseudo_dice": [], "mean_pseudo_dice": None}
        dice = (2 * state[0] / (2 * state[0] + state[1] + state[2]).clamp_min(1)).tolist()
        return {
            "pseudo_dice": [round(d, 4) for d in dice],
            "mean_pseudo_dice": round(float(np.mean(dice)), 4) if dice else None,
        }

    def summary_line(self, summary: dict) -> str:
        """``pseudo-Dice Anterior 0.8123 Posterior 0.7950`` (class names from the ``labels`` option)."""
        dice = summary.get("pseudo_dice") or []
        if not dice:
            return "pseudo-Dice n/a"
        names = {v: k for k, v in self.options.get("labels", {}).items()}
        return "pseudo-Dice " + "  ".join(f"{names.get(c, c)} {d:.4f}" for c, d in enumerate(dice, start=1))
