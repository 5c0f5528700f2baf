"""Augmentation presets, selected by ``TrainingConfig.augmentation``.

A preset is ``fn(spatial_dims, anisotropic) -> AugmentConfig``; ``anisotropic`` is true for
configurations with a thick-slice axis (3D rotations then stay in-plane, as nnU-Net's "dummy 2D").
"""

from __future__ import annotations

from dataclasses import replace

from medseg.augment.transforms import NO_AUGMENTATION, AugmentConfig
from medseg.registry import Registry

AUGMENTATIONS = Registry("augmentation preset")
register_augmentation = AUGMENTATIONS.register


@register_augmentation("default")
def default(spatial_dims: int, anisotropic: bool) -> AugmentConfig:
    """nnU-Net v2's default set: rotation, scaling, noise, blur, brightness, contrast, low resolution,
    gamma, mirroring."""
    return AugmentConfig(rotate_inplane_only=anisotropic and spatial_dims == 3)


@register_augmentation("none")
def none(spatial_dims: int, anisotropic: bool) -> AugmentConfig:
    """No augmentation: exact centre crops of the sampled regions."""
    return NO_AUGMENTATION


@register_augmentation("no_mirror")
def no_mirror(spatial_dims: int, anisotropic: bool) -> AugmentConfig:
    """The default set without mirroring, for data whose left and right differ in meaning
    (nnU-Net's nnUNetTrainerNoMirroring)."""
    return replace(default(spatial_dims, anisotropic), p_mirror=0.0)


@register_augmentation("light")
def light(spatial_dims: int, anisotropic: bool) -> AugmentConfig:
    """Mirroring, mild scaling and intensity jitter only: for fine-tuning pretrained encoders (SAM,
    ImageNet) whose features expect natural-looking inputs, and for diffusion models."""
    return replace(
        NO_AUGMENTATION,
        p_scale=0.2,
        scale_range=(0.85, 1.25),
        p_brightness=0.15,
        p_contrast=0.15,
        p_mirror=0.5,
        region_margin=1.2,
    )
