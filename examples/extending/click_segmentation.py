"""A worked example of extending medseg (docs/extending.md): click-guided segmentation.

A new task, a model that takes a conditioning input, and a loss, each one registered function or
class. Importing this module registers them; then the normal Trainer, Predictor and CLI use them:

    medseg train DATASET -w WS --model click_unet --optimizer adamw --lr 3e-4 --schedule warmup_cosine
    medseg predict -m MODEL -i scans/ -o out/ --condition points='[[20, 31, 18]]'

(the CLI finds the model through the ``medseg.models`` entry point of a package that imports this
module; tests/test_extending.py runs it through the Python API.)
"""

from __future__ import annotations

import torch

from medseg.models.registry import register_model
from medseg.models.unet import build_unet
from medseg.tasks import register_task
from medseg.tasks.segmentation import SegmentationTask
from medseg.training.losses import dice_ce, register_loss


@register_task("click_segmentation")
class ClickSegmentation(SegmentationTask):
    """Segmentation guided by one click inside the object: each training sample gets a point drawn
    from its (augmented) foreground; at prediction the user gives it (``points``)."""

    def make_batch(self, sample, device, patch_size, augment, g):
        batch = super().make_batch(sample, device, patch_size, augment, g)
        clicks = []
        for target in batch.target[:, 0]:
            fg = torch.nonzero(target > 0).float()
            if len(fg) == 0:  # no object in this patch: a click far outside it
                clicks.append(torch.full((target.ndim,), -1e3))
            else:
                clicks.append(fg[torch.randint(len(fg), (1,), generator=g).item()])
        batch.cond["points"] = torch.stack(clicks)[:, None, :].to(device)  # (B, 1, dims)
        return batch


class ClickUNet(torch.nn.Module):
    """The nnU-Net U-Net with one more input channel: a Gaussian heat map of the clicks."""

    def __init__(self, in_channels: int, num_classes: int, *, sigma: float = 3.0, **unet):
        super().__init__()
        self.sigma = sigma
        self.unet = build_unet(in_channels + 1, num_classes, **unet)

    def heatmap(self, x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        axes = [torch.arange(s, dtype=torch.float32, device=x.device) for s in x.shape[2:]]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)  # (*spatial, dims)
        d2 = ((grid[None, None] - points.view(*points.shape[:2], *[1] * len(axes), -1)) ** 2).sum(-1)
        return torch.exp(-d2.amin(1, keepdim=True) / (2 * self.sigma**2)).to(x.dtype)

    def forward(self, x: torch.Tensor, points: torch.Tensor):
        return self.unet(torch.cat([x, self.heatmap(x, points)], 1))


@register_model(
    "click_unet",
    task="click_segmentation",
    encoder=("unet.encoder",),
    head=("unet.heads",),
    test_config={"features": [4, 8], "strides": [[1, 1, 1], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 2},
)
def build_click_unet(in_channels, num_classes, **kwargs):
    """U-Net that takes a click (points) as a second input."""
    return ClickUNet(in_channels, num_classes, **kwargs)


@register_loss("dice_ce_heavy_fg")
def dice_ce_heavy_fg(prediction, batch, cfg):
    """Dice + CE with the batch Dice switched off: every sample's object counts alike."""
    from dataclasses import replace

    return dice_ce(prediction, batch, replace(cfg, batch_dice=False))
