"""Text-guided lesion grounding (ConTEXTual Net 3D): segment the lesion a report sentence names."""

from __future__ import annotations

from medseg.tasks.base import register_task
from medseg.tasks.segmentation import SegmentationTask


@register_task("grounding")
class GroundingTask(SegmentationTask):
    """Segmentation conditioned on one sentence per sample. Conditions (per training case = per
    sentence, from the cache's ``CASE_cond.npz``; per case at prediction): ``text`` (L, D) token
    embeddings of the frozen sentence encoder, ``text_mask`` (L,) real tokens, and the parsed facts
    ``slice_point`` (1, dims: the named image's z, a spatial condition moved by augmentation and
    tiling) and ``suvmax`` (a scalar). Batches, loss and pseudo-Dice are segmentation's."""

    loss_name = "dice_ce"
