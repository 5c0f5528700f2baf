"""One I-MedSAM training step (forward, prompt_dice_bce loss, backward, AdamW step) through the
prompt_segmentation task, rendering the implicit decoder on the whole patch grid against rendering
it on ``train_points`` random points, side by side in one process (full-size model, batch 8 of the
BUSI 2d patch 224 x 256, bf16 autocast as the trainer runs on CPUs with native bf16).

    .venv/bin/python benchmarks/bench_imedsam_step.py [--points 4096 0] [--steps 3] [--batch 8]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch
from _common import REPO, cpu_model, log


def _step_seconds(net, task, batch, opt, steps: int, amp: bool) -> float:
    from medseg.training.config import TrainingConfig
    from medseg.training.losses import LOSSES

    loss_fn, cfg, times = LOSSES.get("prompt_dice_bce"), TrainingConfig(), []
    for _ in range(steps + 1):  # the first step warms the allocator and kernels up
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = task.forward(net, batch)
        out = {k: v.float() for k, v in out.items()}
        loss_fn(out, batch, cfg).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, nargs="+", default=[4096, 0], help="train_points (0: whole grid).")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--fp32", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from medseg.models import create_model
    from medseg.tasks import Batch, get_task
    from medseg.tasks.prompt_segmentation import prompt_targets

    torch.manual_seed(0)
    net = create_model("imedsam", 1, 1).train()
    opt = torch.optim.AdamW([p for _, p in net.trainable_parameters()], lr=1e-4)
    seg = torch.zeros(args.batch, 1, 224, 256, dtype=torch.int64)
    seg[:, :, 60:150, 80:200] = 1
    target, boxes = prompt_targets(seg, torch.Generator().manual_seed(0))
    batch = Batch(torch.rand(args.batch, 1, 224, 256), target, {"boxes": boxes})
    print(f"# I-MedSAM training step, {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"batch {args.batch} x 224x256, {'fp32' if args.fp32 else 'bf16 autocast'}, median of {args.steps} steps")
    print("| decoder rendered on | s / step | peak RSS (GB) |\n|---|---:|---:|")
    for n in args.points:
        task = get_task("prompt_segmentation", 2, train_points=n)
        sec = _step_seconds(net, task, batch, opt, args.steps, not args.fp32)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        what = "the whole 224x256 grid" if n == 0 else f"{n} random points"
        print(f"| {what} | {sec:.2f} | {rss:.1f} (process peak so far) |", flush=True)
        log(f"train_points={n}: {sec:.2f} s/step")


if __name__ == "__main__":
    main()
