"""Driver run in medseg's .venv by bench_training.py (not a user script).

Builds medseg's ``Trainer`` from the workspace plan (batch size / features overridden through
``TrainingConfig``, as ``medseg train --batch-size`` and a plan edit would), creates the patch
sampler exactly as ``Trainer.fit`` does, and times ``Trainer.train_epoch`` with one iteration
per call: patch sampling, batched torch augmentation on the training device, forward,
deep-supervision Dice+CE loss, backward, gradient clipping, SGD step. Validation,
checkpointing and logging are left out (the same is left out on the nnU-Net side).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preprocessed", type=Path, required=True, help="WS/preprocessed/<dataset>")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--features", type=int, nargs="+", required=True)
    p.add_argument("--patch", type=int, nargs="+", required=True)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--precision", choices=("auto", "fp32"), default="auto", help="auto: medseg's default (amp=None)")
    p.add_argument("--result", required=True)
    args = p.parse_args()

    from medseg.data.sampler import PatchSampler
    from medseg.planning.plan import Plan
    from medseg.preprocessing.pipeline import cache_folder
    from medseg.training.config import TrainingConfig
    from medseg.training.trainer import Trainer

    t0 = time.perf_counter()
    plan = Plan.load(args.preprocessed / "plan.json")
    conf = plan.configuration("3d_fullres")
    planned = {"batch": conf.batch_size, "patch": list(conf.patch_size), "features": conf.model_kwargs["features"]}
    if list(conf.patch_size) != list(args.patch):
        raise SystemExit(f"medseg plan patch {list(conf.patch_size)} != requested {args.patch}")
    if len(args.features) != len(conf.model_kwargs["features"]):
        raise SystemExit(f"--features needs {len(conf.model_kwargs['features'])} entries")
    n = args.warmup + args.iters
    cfg = TrainingConfig(
        epochs=n,
        iterations_per_epoch=1,
        val_iterations=0,
        batch_size=args.batch,
        model_kwargs={"features": list(args.features)},
        device="cpu",
        amp=None if args.precision == "auto" else False,
        num_threads=args.threads,
        final_validation=False,
        checkpoint_every=10**9,
    )
    trainer = Trainer(
        plan,
        "3d_fullres",
        cache_folder(args.preprocessed, conf),
        args.preprocessed,
        args.output,
        0,
        cfg,
        log=lambda *a, **k: None,
    )
    # as in Trainer.fit
    cases = trainer._load_cases(trainer.train_names)
    sampler = PatchSampler(
        cases,
        conf.patch_size,
        trainer.batch_size,
        margin=trainer.augment.region_margin,
        oversample_foreground=cfg.oversample_foreground,
    )
    setup_s = time.perf_counter() - t0
    data_t = []
    orig_batch = trainer._batch

    def timed_batch(*a, **k):
        s = time.perf_counter()
        out = orig_batch(*a, **k)
        data_t.append(time.perf_counter() - s)
        return out

    trainer._batch = timed_batch
    n_params = sum(p.numel() for p in trainer.model.parameters())
    iters, losses = [], []
    for epoch in range(n):
        s = time.perf_counter()
        losses.append(trainer.train_epoch(epoch, sampler))
        iters.append(time.perf_counter() - s)
    import torch

    result = {
        "framework": "medseg",
        "params": n_params,
        "batch": trainer.batch_size,
        "patch": list(conf.patch_size),
        "features": list(args.features),
        "da_processes": 0,
        "precision": str(trainer.amp_dtype).removeprefix("torch.") if trainer.amp_dtype else "float32",
        "torch_threads": torch.get_num_threads(),
        "planned": planned,
        "setup_s": setup_s,
        "warmup": args.warmup,
        "iter_s": iters[args.warmup :],
        "data_wait_s": data_t[args.warmup :],
        "losses": losses,
    }
    with open(args.result, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
