"""Prompt segmentation (Segment-Anything models): an image and a box -> one binary mask per box.

A prompt model is not tiled over a volume: the whole image (a slice of a volume) is resized to the
network's input and every box on it is decoded from one image embedding, so inference goes through
:mod:`medseg.sam` (``medseg sam``), not the sliding-window predictor, which refuses these models by
their task's ``sliding_window = False``. Loss: Dice + BCE on the mask logits of the box's object.
"""

from __future__ import annotations

from medseg.tasks.base import Task, register_task


@register_task("prompt_segmentation")
class PromptSegmentationTask(Task):
    name = "prompt_segmentation"
    loss_name = "dice_bce"
    sliding_window = False
    prompt_command = "medseg sam"
