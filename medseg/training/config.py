"""TrainingConfig: every training hyper-parameter in one dataclass (no trainer subclasses)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from medseg.augment.transforms import NO_AUGMENTATION, AugmentConfig


@dataclass
class TrainingConfig:
    epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations: int = 20  # patch batches for the per-epoch pseudo-Dice
    batch_size: int | None = None  # None: the plan's batch size
    initial_lr: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    poly_exponent: float = 0.9
    warmup_epochs: int = 0  # linear LR warm-up (useful when fine-tuning)
    freeze_encoder_epochs: int = 0  # fine-tuning: encoder frozen for the first N epochs
    grad_clip: float = 12.0
    oversample_foreground: float = 0.33
    augmentation: str = "default"  # "default" (nnU-Net set) or "none"
    deep_supervision: bool = True
    batch_dice: bool = True
    checkpoint_every: int = 10  # epochs between resumable checkpoints
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool | None = None  # None: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32 (utils.autocast_dtype)
    num_threads: int | None = None  # torch CPU threads; None: all cores
    final_validation: bool = True  # predict the fold's validation cases in native space
    model: str | None = None  # registry name; None: the plan's model
    model_kwargs: dict = field(default_factory=dict)  # overrides of the plan's model kwargs
    pretrained: str | None = None  # model folder or safetensors to initialise from
    # wall-clock budget: after the first epoch, ``epochs`` is set to what fits in it, so the poly
    # schedule ends when the time does (the final validation comes on top)
    time_budget_minutes: float | None = None

    def augment_config(self, spatial_dims: int, anisotropic: bool) -> AugmentConfig:
        if self.augmentation == "none":
            return NO_AUGMENTATION
        if self.augmentation != "default":
            raise ValueError(f"unknown augmentation preset {self.augmentation!r} (default | none)")
        return AugmentConfig(rotate_inplane_only=anisotropic and spatial_dims == 3)

    def to_json(self) -> dict:
        return asdict(self)
