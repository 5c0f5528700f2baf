"""The training loop: one Trainer, configured by TrainingConfig.

Randomness is derived from (seed, rank, epoch), so resuming from an epoch checkpoint replays
exactly the batches and augmentations an uninterrupted run would have seen.
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

from medseg.augment.transforms import NO_AUGMENTATION, augment_batch
from medseg.data.cache import cached_case_names, get_split, load_cached_case
from medseg.data.sampler import PatchSampler
from medseg.io.checkpoint import ModelSpec, load_spec, load_weights, save_spec, save_weights
from medseg.planning.plan import Plan
from medseg.training import distributed
from medseg.training.config import TrainingConfig
from medseg.training.losses import deep_supervision_loss
from medseg.utils import autocast_context, autocast_dtype, resolve_device

STATE_FILE = "training_state.pt"


def poly_lr(initial: float, step: int, total: int, exponent: float, warmup: int = 0) -> float:
    if warmup and step < warmup:
        return initial * (step + 1) / warmup
    return initial * (1 - min(step, total - 1) / total) ** exponent


TOPOLOGY_KEYS = ("strides", "kernel_sizes", "spatial_dims")


def planned_kwargs(conf, config: TrainingConfig) -> dict:
    """The plan's model kwargs for the plan's model; for another registry model only the planned
    topology (strides, kernels, dims) is passed, so presets keep their own widths, and of it only the
    keys its builder takes (a model with a fixed topology gets none of them)."""
    if config.model and config.model != conf.model:
        from medseg.models.registry import accepted_kwargs

        keys = accepted_kwargs(config.model, TOPOLOGY_KEYS)
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
        raw_folder: Path | None = None,
        log=print,
    ):
        self.plan, self.cfg = plan, dataclasses.replace(config)  # a copy: a time budget sets its epochs
        self.conf = plan.configuration(configuration)
        self.cache_dir, self.output_dir = Path(cache_dir), Path(output_dir)
        self.fold = fold
        self.fold_dir = self.output_dir / f"fold_{fold}"
        self.raw_folder = raw_folder
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
        model_name, model_kwargs = config.model or self.conf.model, planned_kwargs(self.conf, config)
        pretrained = None
        if config.pretrained:
            from medseg.training.transfer import resolve_pretrained

            pretrained = resolve_pretrained(config.pretrained)
            model_name, model_kwargs = self._adopt_pretrained(pretrained, model_name, model_kwargs)
        self._fit_patch_to(model_kwargs, configuration)
        plan = self.plan
        self.spec = ModelSpec(
            model=model_name,
            model_kwargs=model_kwargs,
            in_channels=len(plan.channel_names),
            num_classes=plan.num_classes,
            labels=dict(plan.labels),
            plan=plan,
            configuration=configuration,
            pretrained=pretrained.record() if pretrained else None,
        )
        torch.manual_seed(config.seed)  # same seed -> same initial weights on every rank
        self.model = self.spec.build(deep_supervision=config.deep_supervision).to(self.device)
        if pretrained:
            self._load_pretrained(pretrained)
        self._encoder = None
        if config.freeze_encoder_epochs > 0:
            from medseg.errors import MedsegError
            from medseg.training.transfer import encoder_parameters

            try:
                self._encoder = encoder_parameters(self.model)
            except ValueError as exc:
                raise MedsegError(None, f"--freeze-encoder-epochs: {exc}") from None
        self._drop_encoder_grads = False
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=config.initial_lr,
            momentum=config.momentum,
            nesterov=True,
            weight_decay=config.weight_decay,
        )
        # loss scaling is for float16 only: bfloat16 has float32's exponent range
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and self.device.type == "cuda"
        )
        self.ddp_model = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.start_epoch = 0
        self.history: list[dict] = []
        aniso = self.conf.anisotropic_axis is not None
        self.augment = config.augment_config(self.conf.spatial_dims, aniso)
        self.batch_size = max(1, (config.batch_size or self.conf.batch_size) // self.dist.world_size)

    # ---------------------------------------------------------------- transfer learning
    def _adopt_pretrained(self, pretrained, model_name: str, model_kwargs: dict) -> tuple[str, dict]:
        """STU-Net-style fine-tuning: the network is the pretrained one (registry name and kwargs,
        with --model-kwargs on top); only the class count comes from this dataset. With --model naming
        another architecture, or a bare .safetensors file, the planned network is kept."""
        from medseg.errors import CheckpointError
        from medseg.training.transfer import adopted_kwargs

        spec = pretrained.spec
        if spec is None:
            self.log(f"pretrained: {pretrained.source} has no model.json; keeping the planned {model_name} network")
            return model_name, model_kwargs
        n_in = len(self.plan.channel_names)
        if spec.in_channels != n_in:
            raise CheckpointError(
                pretrained.spec_path,
                f"the pretrained model takes {spec.in_channels} input channel(s); "
                f"dataset '{self.plan.dataset_name}' has {n_in}",
            )
        adopted = adopted_kwargs(spec, self.cfg.model, self.cfg.model_kwargs)
        if adopted is None:
            self.log(
                f"pretrained: --model {self.cfg.model} differs from the pretrained '{spec.model}'; "
                "building the planned network and copying the tensors that match"
            )
            return model_name, model_kwargs
        name, kwargs = adopted
        dims = int(kwargs.get("spatial_dims", 3))
        if dims != self.conf.spatial_dims:
            raise CheckpointError(
                pretrained.spec_path,
                f"the pretrained model is {dims}D; configuration '{self.conf.name}' is {self.conf.spatial_dims}D",
            )
        shown = {k: kwargs[k] for k in ("features", "blocks_per_stage", "n_conv_per_stage") if k in kwargs}
        self.log(
            f"pretrained: adopting the '{name}' architecture of {pretrained.spec_path} {shown}"
            f"{' with --model-kwargs ' + str(self.cfg.model_kwargs) if self.cfg.model_kwargs else ''}; "
            f"{self.plan.num_classes} classes from this dataset (pretrained: {spec.num_classes})"
        )
        return name, kwargs

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
        from medseg.errors import CheckpointError
        from medseg.training.transfer import load_pretrained, read_pretrained_weights

        report = load_pretrained(self.model, read_pretrained_weights(pretrained.weights))
        if report["loaded"] == 0:
            raise CheckpointError(pretrained.weights, "no tensor matches the network's names and shapes")
        skipped = report["skipped"]
        prefixes = sorted({n.rsplit(".", 2)[0] for n in skipped})
        detail = f" ({', '.join(prefixes[:6])}{', ...' if len(prefixes) > 6 else ''})" if skipped else ""
        self.log(
            f"pretrained {pretrained.source} (sha256 {pretrained.sha256[:12]}): loaded {report['loaded']} of "
            f"{report['loaded'] + len(skipped)} tensors, re-initialised {len(skipped)}{detail}"
        )

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
    def _load_cases(self, names):
        return [load_cached_case(self.cache_dir, n) for n in names]

    def save_state(self, epoch: int) -> None:
        """Everything needed to resume at ``epoch`` (exclusive), written atomically by rank 0."""
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
        tmp = self.fold_dir / f".{STATE_FILE}.part"
        torch.save(state, tmp)
        os.replace(tmp, self.fold_dir / STATE_FILE)
        info = {"epoch": epoch, "fold": str(self.fold)}
        if self.spec.pretrained:
            info["pretrained"] = self.spec.pretrained
        save_weights(self.fold_dir, self.model.state_dict(), info=info)

    def try_resume(self) -> bool:
        path = self.fold_dir / STATE_FILE
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
        self.history = json.loads(state["history"])
        self.log(f"resumed from {path} at epoch {self.start_epoch}")
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

    def _batch(self, sampler: PatchSampler, g: torch.Generator, augment) -> tuple[torch.Tensor, torch.Tensor]:
        img, seg = sampler.sample()
        img = torch.from_numpy(img).to(self.device, non_blocking=True)
        seg = torch.from_numpy(seg.astype(np.int64)).to(self.device, non_blocking=True)
        return augment_batch(img, seg, self.conf.patch_size, augment, g)

    def _forward_loss(self, img, seg):
        with autocast_context(self.device, self.amp_dtype):
            out = self.ddp_model(img)
        # the loss (softmax, Dice sums, cross-entropy) in float32 whatever the network ran in
        out = [o.float() for o in out] if isinstance(out, (list, tuple)) else out.float()
        loss = deep_supervision_loss(out, seg, batch_dice=self.cfg.batch_dice)
        return out, loss

    def train_epoch(self, epoch: int, sampler: PatchSampler) -> float:
        self.model.train()
        sampler.rng = np.random.default_rng(self._rng_seed(epoch, 1))
        g = torch.Generator().manual_seed(self._rng_seed(epoch, 2))
        total_steps = self.cfg.epochs * self.cfg.iterations_per_epoch
        warm = self.cfg.warmup_epochs * self.cfg.iterations_per_epoch
        frozen = epoch < self.cfg.freeze_encoder_epochs
        self._set_encoder_frozen(frozen)
        if self._encoder is not None and epoch == self.start_epoch and frozen:
            self.log(f"encoder frozen until epoch {self.cfg.freeze_encoder_epochs}")
        elif self._encoder is not None and epoch == self.cfg.freeze_encoder_epochs:
            self.log(f"epoch {epoch + 1}: encoder unfrozen")
        losses = []
        from medseg.utils import track

        iters = range(self.cfg.iterations_per_epoch)
        for it in track(iters, description=f"epoch {epoch}", enabled=self.dist.is_main):
            step = epoch * self.cfg.iterations_per_epoch + it
            for group in self.optimizer.param_groups:
                group["lr"] = poly_lr(self.cfg.initial_lr, step, total_steps, self.cfg.poly_exponent, warm)
            img, seg = self._batch(sampler, g, self.augment)
            self.optimizer.zero_grad(set_to_none=True)
            _, loss = self._forward_loss(img, seg)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            if self._drop_encoder_grads:
                for p in self._encoder:
                    p.grad = None
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            losses.append(float(loss.detach()))
        mean = torch.tensor([sum(losses), len(losses)], dtype=torch.float64)
        distributed.all_reduce_sum(mean, self.dist)
        return float(mean[0] / mean[1])

    @torch.no_grad()
    def pseudo_dice(self, epoch: int, sampler: PatchSampler | None) -> tuple[float, list[float]]:
        """nnU-Net's pseudo-Dice: tp/fp/fn summed over validation patches, per foreground class."""
        if sampler is None or self.cfg.val_iterations <= 0:
            return math.nan, []
        self.model.eval()
        sampler.rng = np.random.default_rng(self._rng_seed(epoch, 3))
        g = torch.Generator().manual_seed(self._rng_seed(epoch, 4))
        k = self.plan.num_classes
        stats = torch.zeros(3, k - 1, dtype=torch.float64)
        losses = []
        for _ in range(self.cfg.val_iterations):
            img, seg = self._batch(sampler, g, NO_AUGMENTATION)
            out, loss = self._forward_loss(img, seg)
            out = out[0] if isinstance(out, (list, tuple)) else out
            pred = out.argmax(1)
            ref = seg[:, 0]
            losses.append(float(loss))
            for c in range(1, k):
                p, r = pred == c, ref == c
                stats[0, c - 1] += float((p & r).sum())
                stats[1, c - 1] += float((p & ~r).sum())
                stats[2, c - 1] += float((~p & r).sum())
        distributed.all_reduce_sum(stats, self.dist)
        dice = (2 * stats[0] / (2 * stats[0] + stats[1] + stats[2]).clamp_min(1)).tolist()
        return float(np.mean(losses)), dice

    def fit(self, resume: bool = False) -> dict:
        if resume:
            self.try_resume()
        elif (self.fold_dir / STATE_FILE).exists():
            self.log(f"note: {self.fold_dir} already has a checkpoint; starting over (use --resume to continue)")
        self._rewrite_log()
        self._fit_epochs_to_budget()
        if self.start_epoch >= self.cfg.epochs:
            self.log(
                f"fold {self.fold}: already trained for {self.start_epoch} epochs; pass a larger --epochs to extend"
            )
            distributed.teardown(self.dist)
            previous = self.fold_dir / "validation" / "summary.json"
            return json.loads(previous.read_text()) if previous.is_file() and self.dist.is_main else {}
        train_cases = self._load_cases(self.train_names)
        margin = self.augment.region_margin
        sampler = PatchSampler(
            train_cases,
            self.conf.patch_size,
            self.batch_size,
            margin=margin,
            oversample_foreground=self.cfg.oversample_foreground,
        )
        val_sampler = None
        if self.val_names:
            val_sampler = PatchSampler(
                self._load_cases(self.val_names),
                self.conf.patch_size,
                self.batch_size,
                oversample_foreground=self.cfg.oversample_foreground,
            )
        precision = f"{str(self.amp_dtype).removeprefix('torch.')} autocast" if self.amp_dtype else "fp32"
        self.log(
            f"training {self.spec.model} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params) "
            f"config {self.conf.name} fold {self.fold}: patch {list(self.conf.patch_size)}, batch "
            f"{self.batch_size}x{self.dist.world_size}, {len(self.train_names)} train / {len(self.val_names)} val "
            f"cases, device {self.device} ({precision})"
        )
        epoch = self.start_epoch
        while epoch < self.cfg.epochs:
            t0 = time.time()
            train_loss = self.train_epoch(epoch, sampler)
            val_loss, dice = self.pseudo_dice(epoch, val_sampler)
            rec = {
                "epoch": epoch,
                "train_loss": round(train_loss, 5),
                "val_loss": None if math.isnan(val_loss) else round(val_loss, 5),
                "pseudo_dice": [round(d, 4) for d in dice],
                "mean_pseudo_dice": round(float(np.mean(dice)), 4) if dice else None,
                "lr": self.optimizer.param_groups[0]["lr"],
                "seconds": round(time.time() - t0, 2),
            }
            self.history.append(rec)
            self.log(
                f"epoch {epoch + 1}/{self.cfg.epochs}  loss {train_loss:.4f}  val {rec['val_loss']}  "
                f"pseudo-Dice {rec['pseudo_dice']}  lr {rec['lr']:.5f}  {rec['seconds']:.1f}s"
            )
            if self.dist.is_main:
                self.fold_dir.mkdir(parents=True, exist_ok=True)
                with open(self.fold_dir / "training_log.jsonl", "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
            self._fit_epochs_to_budget()
            if (epoch + 1) % self.cfg.checkpoint_every == 0 or epoch + 1 == self.cfg.epochs:
                self.save_state(epoch + 1)
            epoch += 1
        distributed.barrier(self.dist)
        summary = {}
        if self.dist.is_main and self.cfg.final_validation and self.val_names and self.raw_folder:
            summary = self.final_validation()
        distributed.teardown(self.dist)
        return summary

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

    def final_validation(self) -> dict:
        """Predict each validation case from its raw image, export in native space, evaluate."""
        from medseg.evaluation.metrics import evaluate_folder
        from medseg.inference.predictor import Predictor
        from medseg.io.dataset import list_cases

        cases = {c.name: c for c in list_cases(self.raw_folder)}
        out = self.fold_dir / "validation"
        predictor = Predictor(
            load_spec(self.output_dir),
            {str(self.fold): load_weights(self.fold_dir)},
            device=str(self.device),
            amp=self.cfg.amp,
        )
        val_cases = [cases[n] for n in self.val_names if n in cases]
        predictor.predict_cases(val_cases, out, overwrite=True)
        summary = evaluate_folder(
            out, self.raw_folder / "labelsTr", self.plan.labels, names=self.val_names, output=out / "summary.json"
        )
        self.log(
            f"final validation (fold {self.fold}, {len(val_cases)} cases, native space): "
            + ", ".join(f"{k} Dice {v['dice']:.4f}" for k, v in summary["mean"].items())
        )
        return summary


def log_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
