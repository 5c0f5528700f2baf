"""Batched torch augmentation that runs on the training device."""

from medseg.augment.transforms import AugmentConfig, augment_batch

__all__ = ["AugmentConfig", "augment_batch"]
