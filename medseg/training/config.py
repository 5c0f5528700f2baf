"""TrainingConfig: every training hyper-parameter in one dataclass (no trainer subclasses).

What differs between kinds of model is chosen by name from registries: the task
(:mod:`medseg.tasks`), the loss (:mod:`medseg.training.losses`), the optimiser and its parameter
groups (:mod:`medseg.training.optim`), the LR schedule (:mod:`medseg.training.schedules`) and the
augmentation preset (:mod:`medseg.augment.presets`). The names are recorded in ``model.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from medseg.augment.transforms import AugmentConfig


@dataclass
class TrainingConfig:
    epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations: int = 20  # patch batches for the per-epoch validation metric
    batch_size: int | None = None  # None: the plan's batch size
    task: str | None = None  # task registry name; None: the model's declared task (segmentation)
    loss: str | None = None  # loss registry name; None: the task's default (segmentation: dice_ce)
    # None: the task's recipe (Task.optimizer / initial_lr / weight_decay; segmentation: nnU-Net's
    # SGD-Nesterov 1e-2, 3e-5; mask transformers: AdamW 3e-4, 1e-4)
    optimizer: str | None = None  # sgd_nesterov | adamw | adam | ...
    schedule: str = "poly"  # poly | warmup_cosine | constant | ...
    initial_lr: float | None = None
    weight_decay: float | None = None
    momentum: float = 0.99  # SGD
    betas: tuple[float, float] = (0.9, 0.999)  # Adam/AdamW
    # per-group learning rates: [{"prefix": "encoder.", "lr_scale": 0.1}, {"match": "adapter", "lr_scale": 10}]
    param_groups: list = field(default_factory=list)
    task_options: dict = field(default_factory=dict)  # the task's own options (Task.option_names), e.g. train_points
    ema_decay: float | None = None  # EMA of the weights (e.g. 0.999); the averaged weights are exported
    poly_exponent: float = 0.9
    warmup_epochs: int = 0  # linear LR warm-up (useful when fine-tuning)
    freeze_encoder_epochs: int = 0  # fine-tuning: encoder frozen for the first N epochs
    grad_clip: float = 12.0
    oversample_foreground: float = 0.33
    augmentation: str = "default"  # augmentation preset: default | none | no_mirror | light | ...
    deep_supervision: bool = True
    batch_dice: bool = True
    checkpoint_every: int = 10  # epochs between resumable checkpoints
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool | None = None  # None: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32 (utils.autocast_dtype)
    num_threads: int | None = None  # torch CPU threads; None: all cores
    layout: str = "auto"  # CPU memory layout: auto (timed, medseg.execution) | contiguous | channels_last
    final_validation: bool = True  # after training, predict the fold's validation cases in native space
    model: str | None = None  # registry name; None: the plan's model
    model_kwargs: dict = field(default_factory=dict)  # overrides of the plan's model kwargs
    pretrained: str | None = None  # model folder or safetensors to initialise from
    # {target class: [pretrained classes]}: heads of another class count start from those classes' rows
    pretrained_classes: dict | None = None
    # joint training: further preprocessed datasets sampled beside this one (medseg.data.joint)
    extra_data: list = field(default_factory=list)
    # wall-clock budget: after the first epoch, ``epochs`` is set to what fits in it, so the
    # schedule ends when the time does (the final validation comes on top)
    time_budget_minutes: float | None = None

    def augment_config(self, spatial_dims: int, anisotropic: bool) -> AugmentConfig:
        from medseg.augment.presets import AUGMENTATIONS

        return AUGMENTATIONS.get(self.augmentation)(spatial_dims, anisotropic)

    def check(self) -> None:
        """Raise ValueError naming the first unknown registry name or out-of-range number (before any
        work starts)."""
        for name, value, low in (("--epochs", self.epochs, 1), ("--iterations", self.iterations_per_epoch, 1),
                                 ("--val-iterations", self.val_iterations, 0), ("--batch-size", self.batch_size, 1),
                                 ("--checkpoint-every", self.checkpoint_every, 1)):  # fmt: skip
            if value is not None and value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}")
        if self.layout not in ("auto", "contiguous", "channels_last"):  # medseg.execution.LAYOUTS
            raise ValueError(f"--layout must be auto, contiguous or channels_last, got {self.layout!r}")
        if self.time_budget_minutes is not None and not self.time_budget_minutes > 0:
            raise ValueError(f"--time-budget must be a positive number of minutes, got {self.time_budget_minutes}")
        if self.initial_lr is not None and not self.initial_lr > 0:
            raise ValueError(f"--lr must be positive, got {self.initial_lr}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be between 0 and 1, got {self.ema_decay}")
        if self.extra_data:
            from medseg.data.joint import check_extra_data

            check_extra_data(self.extra_data)
        if self.task_options:
            from medseg.tasks import TASKS
            from medseg.tasks.base import check_task_options

            task = self.task or self._model_task()
            if task is None:
                raise ValueError("--task-options needs --task or --arch (the task whose options they are)")
            if task in TASKS:  # an unknown task is reported below
                check_task_options(task, self.task_options)
        from medseg.augment.presets import AUGMENTATIONS
        from medseg.tasks import TASKS
        from medseg.training.losses import LOSSES
        from medseg.training.optim import OPTIMIZERS
        from medseg.training.schedules import SCHEDULES

        for registry, name in ((OPTIMIZERS, self.optimizer), (SCHEDULES, self.schedule),
                               (AUGMENTATIONS, self.augmentation), (LOSSES, self.loss), (TASKS, self.task)):  # fmt: skip
            if name is not None:
                registry.entry(name)

    def _model_task(self) -> str | None:
        """The task the registry entry of ``model`` declares (None: no model named, or an unknown one)."""
        from medseg.models.registry import get_entry

        try:
            return get_entry(self.model).task if self.model else None
        except (KeyError, ValueError):
            return None

    def with_task_defaults(self, task) -> TrainingConfig:
        """A copy with the fields left None filled from the task's recipe."""
        from dataclasses import replace

        return replace(
            self,
            optimizer=self.optimizer or task.optimizer,
            initial_lr=task.initial_lr if self.initial_lr is None else self.initial_lr,
            weight_decay=task.weight_decay if self.weight_decay is None else self.weight_decay,
        )

    def recipe(self) -> dict:
        """The named choices a model was trained with (recorded in model.json)."""
        keys = ("task", "loss", "optimizer", "schedule", "initial_lr", "ema_decay", "augmentation", "param_groups")
        extra = {"task_options": self.task_options} if self.task_options else {}
        if self.extra_data:
            extra["extra_data"] = self.extra_data
        if self.pretrained_classes:
            extra["pretrained_classes"] = self.pretrained_classes
        return {**{k: getattr(self, k) for k in keys}, **extra}

    def to_json(self) -> dict:
        return asdict(self)
