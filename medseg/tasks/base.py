"""The task contract: everything the one training loop and the one predictor ask of a kind of model.

The :class:`~medseg.training.trainer.Trainer` owns devices, DDP, precision, exact resume, the time
budget, EMA, checkpoints and logging; the :class:`~medseg.inference.predictor.Predictor` owns
tiling, mirror TTA, ensembling and export. A task says what is particular to its kind of model:

* ``make_batch``: sampled numpy arrays -> an augmented :class:`Batch` on the device: ``image``,
  ``target``, ``cond`` (named model inputs: text tokens, boxes, points, histograms, scalars;
  ``points``/``boxes`` follow the spatial augmentation) and ``extras`` (loss-only arrays, e.g. a
  loss mask);
* ``forward``: how the model is called (default ``model(image, **cond)``);
* ``loss_name``: the default entry of the loss registry (``TrainingConfig.loss`` overrides it);
* ``validation_*``: the per-epoch validation metric, accumulated over batches and summed over
  DDP ranks;
* ``outputs``: a model's inference output -> named maps ``{"logits": ..., "max_affinity": ...}``,
  each blended by the sliding window, un-flipped under TTA and exported. ``label_output`` names
  the map (class logits) that becomes the label map ``CASE.<ext>``; the other maps are written as
  ``CASE_<name>.<ext>``, resampled back to the input's geometry like probabilities, except the
  ``auxiliary_maps``: inputs of derived maps (MaxQuery's OOD score reads ``max_affinity``).

A new task is one class and one decorator::

    @register_task("my_task")
    class MyTask(SegmentationTask):
        loss_name = "dice_bce"
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from medseg.registry import Registry

_BUILTIN_TASKS = ("segmentation", "prompt_segmentation", "mask_segmentation", "grounding", "lesion_diffusion")
TASKS = Registry("task", loader=lambda: [__import__(f"medseg.tasks.{m}") for m in _BUILTIN_TASKS])
register_task = TASKS.register


@dataclass
class Batch:
    image: torch.Tensor  # (B, C, *patch)
    target: torch.Tensor | None = None  # task-specific: (B, 1, *patch) labels, noise, ...
    cond: dict[str, torch.Tensor] = field(default_factory=dict)  # keyword inputs of the model
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # for the loss only

    def to(self, device) -> Batch:
        move = lambda d: {k: v.to(device, non_blocking=True) for k, v in d.items()}  # noqa: E731
        target = None if self.target is None else self.target.to(device, non_blocking=True)
        return Batch(self.image.to(device, non_blocking=True), target, move(self.cond), move(self.extras))


SPATIAL_CONDITIONS = ("points", "boxes")  # in voxel coordinates: moved by augmentation and tiling


class Task:
    """Base class: a task for models that take an image (+ conditions) and return named maps."""

    name = "base"
    loss_name = "dice_ce"
    label_output: str | None = "logits"  # the named map that becomes the label map (None: none)
    auxiliary_maps: tuple[str, ...] = ()  # blended, but only written through a derived map (OOD scores)
    # the default recipe where TrainingConfig leaves it None (nnU-Net's SGD for convolutional networks)
    optimizer = "sgd_nesterov"
    initial_lr = 1e-2
    weight_decay = 3e-5
    sliding_window = True  # False: not tiled by the Predictor (prompt models: ``prompt_command``)
    option_names: tuple[str, ...] = ()  # what ``--task-options`` may set for this task
    prompt_command = ""

    def __init__(self, num_classes: int, **options):
        self.num_classes = num_classes
        self.options = options

    # ------------------------------------------------------------------ training
    def make_batch(self, sample: dict[str, np.ndarray], device, patch_size, augment, g: torch.Generator) -> Batch:
        raise NotImplementedError

    def forward(self, model, batch: Batch):
        return model(batch.image, **batch.cond)

    def validation_state(self) -> torch.Tensor:
        """A float64 tensor of sums, accumulated by :meth:`validation_update`, summed over ranks."""
        return torch.zeros(0, dtype=torch.float64)

    def validation_update(self, state: torch.Tensor, prediction, batch: Batch) -> None:
        pass

    def validation_summary(self, state: torch.Tensor | None) -> dict:
        """Fields of the epoch's log record (JSON numbers or lists); ``state`` None: no validation ran."""
        return {}

    def summary_line(self, summary: dict) -> str:
        return "  ".join(f"{k} {v}" for k, v in summary.items())

    def after_training(self, trainer) -> None:
        """Called once on rank 0 after ``fit()``: what a task adds to the model folder besides the
        weights (LeFusion: the texture clusters of the training lesions)."""

    # ------------------------------------------------------------------ inference
    def outputs(self, raw) -> dict[str, torch.Tensor]:
        """Named maps (B, K, *tile) from an inference forward; deep-supervision lists keep scale 0."""
        if isinstance(raw, dict):
            return dict(raw)
        if isinstance(raw, (list, tuple)):
            raw = raw[0]
        return {"logits": raw}


def check_task_options(name: str, options: dict) -> None:
    """ValueError naming the options that task ``name`` does not declare in ``option_names``."""
    known = TASKS.get(name).option_names
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"--task-options: unknown option(s) {', '.join(unknown)} for task {name} (known: {', '.join(known) or 'none'})"
        )


def get_task(name: str, num_classes: int, **options) -> Task:
    """An instance of the registered task ``name`` (its ``name`` is the registry's, also for a
    subclass of another task). ``options`` other than ``labels`` must be in the task's
    ``option_names`` (ValueError otherwise: a misspelt option is never silently ignored)."""
    cls = TASKS.get(name)
    check_task_options(name, {k: v for k, v in options.items() if k != "labels"})
    task = cls(num_classes, **options)
    task.name = name
    return task
