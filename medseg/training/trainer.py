"""The training loop: one Trainer, configured by TrainingConfig, for every kind of model.

What differs between kinds of model comes from the task (batch contents, loss default,
validation metric; :mod:`medseg.tasks`) and from registries (loss, optimiser, schedule,
augmentation). The loop owns devices, DDP, precision, exact resume, the time budget, EMA,
checkpoints and logging. Randomness is derived from (seed, rank, epoch), so resuming from an
epoch checkpoint replays exactly the batches and augmentations an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medseg.augment.transforms import NO_AUGMENTATION
from medseg.data.cache import cached_case_names, get_split, load_cached_case
from medseg.data.derived import derived_inputs_of, ensure_cached, with_maps
from medseg.data.joint import joint_training_cases
from medseg.data.sampler import PatchSampler
from medseg.io.checkpoint import ModelSpec, save_spec, save_weights
from medseg.planning.ood import training_data_from
from medseg.planning.plan import Plan
from medseg.tasks import Batch, get_task
from medseg.training import distributed
from medseg.training.config import TrainingConfig
from medseg.training.losses import LOSSES
from medseg.training.optim import WeightEMA, build_optimizer, set_learning_rate
from medseg.training.schedules import SCHEDULES, poly_lr  # noqa: F401  (poly_lr: re-exported)
from medseg.utils import autocast_dtype, resolve_device

STATE_FILE = "training_state.pt"


TOPOLOGY_KEYS = ("strides", "kernel_sizes", "spatial_dims")


def planned_kwargs(conf, config: TrainingConfig) -> dict:
    """The plan's model kwargs for the plan's model; for another registry model only the planned
    topology (strides, kernels, dims) is passed, so presets keep their own widths, and of it only the
    keys its builder takes (a model with a fixed topology gets none of them); a model built on the
    plan's model (its registry ``backbone``, e.g. ``maskformer_unet`` on ``unet``) takes them all."""
    if config.model and config.model != conf.model:
        from medseg.models.registry import accepted_kwargs, get_entry

        whole = get_entry(config.model).backbone == conf.model
        keys = accepted_kwargs(config.model, tuple(conf.model_kwargs) if whole else TOPOLOGY_KEYS)
        base = {k: v for k, v in conf.model_kwargs.items() if k in keys}
    else:
        base = dict(conf.model_kwargs)
    return {**base, **config.model_kwargs}


class Trainer:
    def __init__(
        self,
        plan: Plan,
        configuration: str,
        cache_dir: Path,
        preprocessed_dir: Path,
        output_dir: Path,
        fold: int | str,
        config: TrainingConfig,
        *,
        log=print,
    ):
        self.plan, self.cfg = plan, dataclasses.replace(config)  # a copy: a time budget sets its epochs
        self.conf = plan.configuration(configuration)
        self.cache_dir, self.output_dir = Path(cache_dir), Path(output_dir)
        self.fold = fold
        self.fold_dir = self.output_dir / f"fold_{fold}"
        self.device = resolve_device(config.device)
        self.dist = distributed.setup(self.device.type)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.log = log if self.dist.is_main else (lambda *a, **k: None)
        threads = config.num_threads or max(1, (os.cpu_count() or 1) // self.dist.world_size)
        torch.set_num_threads(threads)
        self.amp_dtype = autocast_dtype(self.device, config.amp)  # None: fp32
        names = cached_case_names(self.cache_dir)
        # rank 0 creates splits_final.json; the others read it once it exists
        if self.dist.is_main:
            get_split(Path(preprocessed_dir), names, fold)
        distributed.barrier(self.dist)
        self.train_names, self.val_names = get_split(Path(preprocessed_dir), names, fold, write=False)
        if not self.train_names:
            from medseg.errors import DatasetError

            raise DatasetError(
                preprocessed_dir, f"fold {fold} has no training case ({len(names)} case(s) in all); use -f all"
            )
        model_name, model_kwargs = config.model or self.conf.model, planned_kwargs(self.conf, config)
        pretrained = None
        if config.pretrained:
            from medseg.training.transfer import resolve_pretrained

            pretrained = resolve_pretrained(config.pretrained)
            model_name, model_kwargs = self._adopt_pretrained(pretrained, model_name, model_kwargs)
        self._fit_patch_to(model_kwargs, configuration)
        self.task = get_task(
            self._task_name(model_name), self.plan.num_classes, labels=dict(self.plan.labels), **config.task_options
        )
        self.cfg = config = self.cfg.with_task_defaults(self.task)  # optimizer / lr / weight decay left None
        self.loss_fn = LOSSES.get(config.loss or self.task.loss_name)
        self.schedule = SCHEDULES.get(config.schedule)
        self.spec = self._model_spec(model_name, model_kwargs, configuration, pretrained)
        self.spec.training_data = training_data_from(Path(preprocessed_dir) / "fingerprint.json")
        torch.manual_seed(config.seed)  # same seed -> same initial weights on every rank
        self.model = self.spec.build(deep_supervision=config.deep_supervision).to(self.device)
        if pretrained:
            self._load_pretrained(pretrained)
        self._setup_optimisation()
        self.batch_size = max(1, (config.batch_size or self.conf.batch_size) // self.dist.world_size)
        self.execution = self._choose_execution()
        self.ddp_model = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.start_epoch = 0
        self.history: list[dict] = []
        aniso = self.conf.anisotropic_axis is not None
        self.augment = config.augment_config(self.conf.spatial_dims, aniso)

    def _choose_execution(self):
        """Precision and layout of the training step (:mod:`medseg.execution`: fp32 master weights,
        autocast as before; on CPUs the layout, and the precision unless set, timed on this network at
        this batch once per machine). The model is converted to the chosen layout in place."""
        from medseg.execution import choose_execution
        from medseg.models.registry import get_entry

        example = (self.batch_size, self.spec.in_channels, *self.conf.patch_size)
        fast = get_entry(self.spec.model).cpu_fast_path
        ex = choose_execution(self.model, example, self.device, amp=self.cfg.amp, layout=self.cfg.layout,
                              training=True, fast_path=fast)  # fmt: skip
        self.amp_dtype = None if ex.precision == "float32" else ex.dtype
        ex.prepare(self.model)
        return ex

    def _model_spec(self, model_name: str, model_kwargs: dict, configuration: str, pretrained) -> ModelSpec:
        """What model.json records: the network, the plan, the task and the recipe's registry names."""
        plan, cfg = self.plan, self.cfg
        return ModelSpec(
            model=model_name,
            model_kwargs=model_kwargs,
            in_channels=len(plan.channel_names),
            num_classes=plan.num_classes,
            labels=dict(plan.labels),
            plan=plan,
            configuration=configuration,
            pretrained=pretrained.record() if pretrained else None,
            task=self.task.name,
            training={**cfg.recipe(), "task": self.task.name, "loss": cfg.loss or self.task.loss_name},
        )

    def _setup_optimisation(self) -> None:
        """Encoder freezing, optimiser with its parameter groups, EMA and the loss scaler."""
        from medseg.errors import MedsegError

        cfg = self.cfg
        self._encoder = None
        if cfg.freeze_encoder_epochs > 0:
            from medseg.training.transfer import encoder_parameters

            try:
                self._encoder = encoder_parameters(self.model, self.spec.model)
            except ValueError as exc:
                raise MedsegError(None, f"--freeze-encoder-epochs: {exc}") from None
        self._drop_encoder_grads = False
        try:
            self.optimizer = build_optimizer(self.model, cfg)
        except ValueError as exc:  # a parameter group that matches nothing, an unknown optimiser
            raise MedsegError(None, str(exc)) from None
        self.ema = WeightEMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.lr = cfg.initial_lr
        # loss scaling is for float16 only: bfloat16 has float32's exponent range
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and self.device.type == "cuda"
        )

    def _task_name(self, model_name: str) -> str:
        """TrainingConfig.task, else the task the model's registry entry declares."""
        if self.cfg.task:
            return self.cfg.task
        from medseg.models.registry import get_entry

        return get_entry(model_name).task

    # ---------------------------------------------------------------- transfer learning
    def _adopt_pretrained(self, pretrained, model_name: str, model_kwargs: dict) -> tuple[str, dict]:
        from medseg.training.transfer import adopt_pretrained

        return adopt_pretrained(pretrained, model_name, model_kwargs, self.plan, self.conf, self.cfg, self.log)

    def _fit_patch_to(self, model_kwargs: dict, configuration: str) -> None:
        """Round the patch up to a multiple of the network's total stride per axis (logged)."""
        from dataclasses import replace

        from medseg.training.transfer import fit_patch, patch_divisor

        divisor = patch_divisor(model_kwargs, self.conf.spatial_dims)
        patch = tuple(self.conf.patch_size)
        if divisor is None or not any(p % d for p, d in zip(patch, divisor)):
            return
        fitted = fit_patch(patch, divisor)
        self.log(
            f"patch {list(patch)} is not a multiple of the network's total stride {list(divisor)} per axis; "
            f"using patch {list(fitted)}"
        )
        self.conf = replace(self.conf, patch_size=fitted)
        self.plan = replace(self.plan, configurations={**self.plan.configurations, configuration: self.conf})

    def _load_pretrained(self, pretrained) -> None:
        from medseg.training.transfer import load_pretrained_logged

        load_pretrained_logged(self.model, pretrained, self.log, self.cfg.pretrained_classes)

    def _set_encoder_frozen(self, frozen: bool) -> None:
        """--freeze-encoder-epochs: without DDP the encoder stops requiring gradients (no backward
        through it); under DDP, whose gradient hooks are fixed at construction, its gradients are dropped
        before the optimizer step. Either way SGD skips the parameters (no update, no weight decay)."""
        if self._encoder is None:
            return
        if self.dist.enabled:
            self._drop_encoder_grads = frozen
        else:
            for p in self._encoder:
                p.requires_grad_(not frozen)

    # ---------------------------------------------------------------- state
    def _load_cases(self, names, cache_dir: Path | None = None):
        """The cached cases, with the dense maps the model derives from them (computed on first use)."""
        cache_dir = cache_dir or self.cache_dir
        specs = derived_inputs_of(self.model)
        if specs and self.dist.is_main:
            ensure_cached(cache_dir, names, specs, device=self.device, log=self.log)
        distributed.barrier(self.dist)
        return [with_maps(load_cached_case(cache_dir, n), cache_dir, specs) for n in names]

    def save_state(self, epoch: int) -> None:
        """Everything needed to resume at ``epoch`` (exclusive), written atomically by rank 0.

        The exported weights (``model.safetensors``) are the EMA weights when EMA is on."""
        if not self.dist.is_main:
            return
        self.fold_dir.mkdir(parents=True, exist_ok=True)
        save_spec(self.output_dir, self.spec)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "history": json.dumps(self.history),
            "config": json.dumps(self.cfg.to_json()),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        tmp = self.fold_dir / f".{STATE_FILE}.part"
        torch.save(state, tmp)
        os.replace(tmp, self.fold_dir / STATE_FILE)
        info = {"epoch": epoch, "fold": str(self.fold), "execution": self.execution.name}
        if self.spec.pretrained:
            info["pretrained"] = self.spec.pretrained
        if self.ema is not None:
            info["ema_decay"] = self.ema.decay
        save_weights(self.fold_dir, self.inference_model().state_dict(), info=info)

    def inference_model(self) -> torch.nn.Module:
        """The weights used for validation and export: the EMA average when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def try_resume(self) -> bool:
        path = self.fold_dir / STATE_FILE
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if "ema" not in state:
                from medseg.errors import CheckpointError

                raise CheckpointError(path, "checkpoint has no EMA weights; resume without --ema-decay")
            self.ema.load_state_dict(state["ema"])
        self.start_epoch = int(state["epoch"])
        self.history = json.loads(state["history"])
        self.log(f"resumed from {path} after epoch {self.start_epoch}")
        return True

    def _rewrite_log(self) -> None:
        """training_log.jsonl = the history being continued (drops epochs after the last checkpoint)."""
        if not self.dist.is_main:
            return
        from medseg.io.jsonio import write_text_atomic

        path = self.fold_dir / "training_log.jsonl"
        if self.history or path.exists():
            write_text_atomic(path, "".join(json.dumps(rec) + "\n" for rec in self.history))

    # ---------------------------------------------------------------- loop
    def _rng_seed(self, *parts) -> int:
        return int(np.random.SeedSequence([self.cfg.seed, self.dist.rank, *parts]).generate_state(1)[0])

    def _batch(self, sampler: PatchSampler, g: torch.Generator, augment) -> Batch:
        return self.task.make_batch(sampler.sample(), self.device, self.conf.patch_size, augment, g)

    def _forward_loss(self, batch: Batch, model=None):
        batch = dataclasses.replace(batch, image=self.execution.input(batch.image))
        with self.execution.context(self.device):
            out = self.task.forward(model or self.ddp_model, batch)
        # the loss (softmax, Dice sums, cross-entropy) in float32 whatever the network ran in
        out = _to_float(out)
        return out, self.loss_fn(out, batch, self.cfg)

    def _step(self, batch: Batch) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        _, loss = self._forward_loss(batch)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self._drop_encoder_grads:
            for p in self._encoder:
                p.grad = None
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        return float(loss.detach())

    def train_epoch(self, epoch: int, sampler: PatchSampler) -> float:
        self.model.train()
        sampler.rng = np.random.default_rng(self._rng_seed(epoch, 1))
        g = torch.Generator().manual_seed(self._rng_seed(epoch, 2))
        total_steps = self.cfg.epochs * self.cfg.iterations_per_epoch
        frozen = epoch < self.cfg.freeze_encoder_epochs
        self._set_encoder_frozen(frozen)
        if self._encoder is not None and epoch == self.start_epoch and frozen:
            self.log(f"encoder frozen for epochs 1-{self.cfg.freeze_encoder_epochs}")
        elif self._encoder is not None and epoch == self.cfg.freeze_encoder_epochs:
            self.log(f"epoch {epoch + 1}: encoder unfrozen")
        losses = []
        from medseg.utils import track

        iters = range(self.cfg.iterations_per_epoch)
        for it in track(iters, description=f"epoch {epoch + 1}/{self.cfg.epochs}", enabled=self.dist.is_main):
            self.lr = self.schedule(
                self.cfg.initial_lr, epoch * self.cfg.iterations_per_epoch + it, total_steps, self.cfg
            )
            set_learning_rate(self.optimizer, self.lr)
            losses.append(self._step(self._batch(sampler, g, self.augment)))
        mean = torch.tensor([sum(losses), len(losses)], dtype=torch.float64)
        distributed.all_reduce_sum(mean, self.dist)
        return float(mean[0] / mean[1])

    @torch.no_grad()
    def validate(self, epoch: int, sampler: PatchSampler | None) -> tuple[float, dict]:
        """Mean loss and the task's metric (segmentation: nnU-Net's pseudo-Dice) over validation
        patches, summed over DDP ranks; the EMA weights when EMA is on."""
        if sampler is None or self.cfg.val_iterations <= 0:
            return math.nan, self.task.validation_summary(None)
        model = self.inference_model()
        model.eval()
        sampler.rng = np.random.default_rng(self._rng_seed(epoch, 3))
        g = torch.Generator().manual_seed(self._rng_seed(epoch, 4))
        state = self.task.validation_state()
        losses = []
        for _ in range(self.cfg.val_iterations):
            batch = self._batch(sampler, g, NO_AUGMENTATION)
            out, loss = self._forward_loss(batch, model if self.ema is not None else None)
            losses.append(float(loss))
            self.task.validation_update(state, out, batch)
        distributed.all_reduce_sum(state, self.dist)
        return float(np.mean(losses)), self.task.validation_summary(state)

    def _samplers(self) -> tuple[PatchSampler, PatchSampler | None]:
        # this fold's training cases, plus those of ``extra_data`` with their sampling weights
        cases, weights = joint_training_cases(self._load_cases, self.train_names, self.cfg.extra_data, log=self.log)
        sampler = PatchSampler(
            cases,
            self.conf.patch_size,
            self.batch_size,
            margin=self.augment.region_margin,
            oversample_foreground=self.cfg.oversample_foreground,
            weights=weights,
        )
        val_sampler = None
        if self.val_names:
            val_sampler = PatchSampler(
                self._load_cases(self.val_names),
                self.conf.patch_size,
                self.batch_size,
                oversample_foreground=self.cfg.oversample_foreground,
            )
        return sampler, val_sampler

    def fit(self, resume: bool = False, overwrite: bool = True) -> list[dict]:
        """Train to ``cfg.epochs`` (resuming if asked); returns the epoch records. The final
        validation in native space is a separate step (:func:`medseg.training.validation.validate_fold`).

        A fold that already has a checkpoint is trained again from scratch only with ``overwrite``
        (the CLI's ``--overwrite``; the API's default, as before); otherwise it is refused before any work."""
        self.ran_epochs = False
        if resume:
            self.try_resume()
        elif (self.fold_dir / STATE_FILE).exists():
            if not overwrite:
                from medseg.errors import OutputError

                raise OutputError(
                    self.fold_dir,
                    "holds a trained fold; pass --resume to continue it, --overwrite to train it again from scratch, "
                    "or -o another model folder",
                )
            self.log(f"note: {self.fold_dir} already has a checkpoint; starting over (use --resume to continue)")
        self._rewrite_log()
        self._fit_epochs_to_budget()
        if self.start_epoch >= self.cfg.epochs:
            self.log(
                f"fold {self.fold}: already trained for {self.start_epoch} epochs; pass a larger --epochs to extend"
            )
            distributed.teardown(self.dist)
            return self.history
        sampler, val_sampler = self._samplers()
        precision = self.execution.name + (
            f", chosen by {self.execution.chosen_by}" if self.device.type == "cpu" else ""
        )
        self.log(
            f"training {self.spec.model} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params, "
            f"task {self.task.name}) config {self.conf.name} fold {self.fold}: patch {list(self.conf.patch_size)}, "
            f"batch {self.batch_size}x{self.dist.world_size}, {len(self.train_names)} train / {len(self.val_names)} "
            f"val cases, device {self.device} ({precision})"
        )
        epoch = self.start_epoch
        while epoch < self.cfg.epochs:
            self._run_epoch(epoch, sampler, val_sampler)
            self.ran_epochs = True
            self._fit_epochs_to_budget()
            if (epoch + 1) % self.cfg.checkpoint_every == 0 or epoch + 1 == self.cfg.epochs:
                self.save_state(epoch + 1)
            epoch += 1
        distributed.barrier(self.dist)
        distributed.teardown(self.dist)
        return self.history

    def _run_epoch(self, epoch: int, sampler, val_sampler) -> None:
        t0 = time.time()
        train_loss = self.train_epoch(epoch, sampler)
        val_loss, metrics = self.validate(epoch, val_sampler)
        rec = {
            "epoch": epoch + 1,  # counted from 1, as on the console and in the checkpoint ("after epoch N")
            "train_loss": round(train_loss, 5),
            "val_loss": None if math.isnan(val_loss) else round(val_loss, 5),
            **metrics,
            "lr": self.lr,
            "seconds": round(time.time() - t0, 2),
        }
        self.history.append(rec)
        self.log(
            f"epoch {epoch + 1}/{self.cfg.epochs}  loss {train_loss:.4f}  val loss {rec['val_loss']}  "
            f"{self.task.summary_line(metrics)}  lr {rec['lr']:.5f}  {rec['seconds']:.1f}s"
        )
        if self.dist.is_main:
            self.fold_dir.mkdir(parents=True, exist_ok=True)
            with open(self.fold_dir / "training_log.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    def _fit_epochs_to_budget(self) -> None:
        """With a time budget, set ``epochs`` from the first epoch's duration (recomputed alike on resume)."""
        budget = self.cfg.time_budget_minutes
        if not budget or not self.history:
            return
        if len(self.history) == 1 and self.start_epoch == 0 and self.dist.enabled:
            # every rank must choose the same number of epochs: use the mean of their first-epoch times
            t = torch.tensor([self.history[0]["seconds"]], dtype=torch.float64)
            distributed.all_reduce_sum(t, self.dist)
            self.history[0]["seconds"] = round(float(t[0]) / self.dist.world_size, 2)
        first = max(float(self.history[0]["seconds"]), 1e-3)
        epochs = max(1, int(budget * 60 // first))
        if epochs != self.cfg.epochs:
            self.cfg.epochs = epochs
            self.log(f"time budget {budget:g} min: {first:.1f} s per epoch -> {epochs} epochs")


def _to_float(out):
    if isinstance(out, dict):
        return {k: _to_float(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [o.float() for o in out]
    return out.float()


def log_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
