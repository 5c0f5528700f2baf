"""How close the networks run to what this CPU can do (issue: the CPU fast path).

In one process, on this machine:

1. the practical peak: the best of square matmuls (1024-4096) in bf16 and fp32, all threads;
2. per registered CNN at a representative planned input (the hippocampus plans; STU-Net at its
   TotalSegmentator patch), the network forward (inference) and the training step (forward +
   backward, fp32 master weights, bf16 autocast), each
   * **before**: today's path before the fast path — autocast, NCDHW, ``nn.InstanceNorm`` (which
     copies channels-last tensors to NCDHW and back),
   * **after**: what :func:`medseg.execution.choose_execution` picks here (every candidate's time is
     listed), with the layout-preserving instance norm;
   as GFLOP/s (FLOPs counted by torch's FlopCounterMode: 2 x MACs of convs; a training step counts
   3 x the forward) and as a fraction of the measured peak of the precision it runs in;
3. the fast path's agreement with fp32 on real held-out MRIs (bundled hippocampus model, every
   ``--agreement-cases`` MSD hippocampus case that is not in its training split).

    python benchmarks/bench_limit.py [--threads N] [--quick]

The end-to-end effect against nnU-Net is measured by bench_inference.py and bench_training.py.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, default_data_root, header_lines, log, machine_info, write_results  # noqa: E402

NAME = "limit"
HIPPO_TOPOLOGY = {"strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 4}
# (label, registry name, kwargs, input channels, classes, patch, batch); the hippocampus plans as
# medseg and nnU-Net plan them, ResEnc M at the same topology, STU-Net S at TotalSegmentator's patch
MODELS = [
    ("unet (medseg's hippocampus plan)", "unet", {"features": [16, 32, 64, 128], **HIPPO_TOPOLOGY}, 1, 3, (40, 56, 40), 2),
    ("unet (nnU-Net's hippocampus plan)", "unet", {"features": [32, 64, 128, 256], **HIPPO_TOPOLOGY}, 1, 3, (40, 56, 40), 4),
    ("resenc_m (hippocampus topology)", "resenc_m", {"features": [32, 64, 128, 256], **HIPPO_TOPOLOGY}, 1, 3, (40, 56, 40), 4),
    ("stunet_s (TotalSegmentator patch)", "stunet_s", {}, 1, 105, (128, 128, 128), 1),
]  # fmt: skip


def matmul_peak(dtype: torch.dtype, sizes=(1024, 2048, 4096), reps: int = 3) -> float:
    """GFLOP/s: the best square matmul."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


@contextlib.contextmanager
def legacy_norms():
    """Instance norm as torch computes it (the path before the fast path)."""
    import medseg.models.norms as norms

    saved = norms._forward
    norms._forward = lambda norm, x: nn.modules.instancenorm._InstanceNorm.forward(norm, x)
    try:
        yield
    finally:
        norms._forward = saved


def _seconds(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def time_forward(net, ex, x, reps) -> float:
    model = ex.prepare(copy.deepcopy(net).eval())
    xi = ex.input(x)

    def run():
        with torch.no_grad(), ex.context("cpu"):
            model(xi)

    return _seconds(run, reps)


def time_training(net, ex, x, target, reps) -> float:
    model = ex.prepare(copy.deepcopy(net).train())
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.99, nesterov=True)
    xi = ex.input(x)

    def run():
        opt.zero_grad(set_to_none=True)
        with ex.context("cpu"):
            out = model(xi)
        outs = out if isinstance(out, (list, tuple)) else [out]
        loss = sum(nn.functional.cross_entropy(o.float(), target[(slice(None), *[slice(None, None, target.shape[i + 1] // o.shape[i + 2]) for i in range(3)])]) for o in outs)  # fmt: skip
        loss.backward()
        opt.step()

    return _seconds(run, reps)


def measure_model(label, name, kwargs, cin, ncls, patch, batch, peaks, reps) -> dict:
    from medseg.execution import Execution, choose_execution
    from medseg.models.flops import forward_cost
    from medseg.models.registry import create_model, get_entry

    torch.manual_seed(0)
    net = create_model(name, cin, ncls, deep_supervision=False, spatial_dims=3, **kwargs)
    train_net = create_model(name, cin, ncls, deep_supervision=True, spatial_dims=3, **kwargs)
    flops = forward_cost(net, patch, cin)[0] * batch
    x = torch.randn(batch, cin, *patch)
    target = torch.randint(0, ncls, (batch, *patch))
    fast = get_entry(name).cpu_fast_path
    before = Execution("bfloat16", "contiguous")
    row = {"model": label, "registry": name, "batch": batch, "patch": list(patch), "gflop_forward": flops / 1e9,
           "params_m": sum(p.numel() for p in net.parameters()) / 1e6}  # fmt: skip
    with legacy_norms():
        row["forward_before_s"] = time_forward(net, before, x, reps)
        row["train_before_s"] = time_training(train_net, before, x, target, max(1, reps - 1))
    inf = choose_execution(net, tuple(x.shape), "cpu", fast_path=fast, cache=False)
    trn = choose_execution(train_net, tuple(x.shape), "cpu", training=True, fast_path=fast, cache=False)
    row["forward_after_s"] = time_forward(net, inf, x, reps)
    row["train_after_s"] = time_training(train_net, trn, x, target, max(1, reps - 1))
    row.update(inference=inf.name, inference_candidates_ms=inf.timings, training=trn.name,
               training_candidates_ms=trn.timings)  # fmt: skip
    for kind, mult, ex in (("forward", 1, inf), ("train", 3, trn)):
        for when in ("before", "after"):
            gfs = mult * flops / row[f"{kind}_{when}_s"] / 1e9
            prec = "bfloat16" if when == "before" else ex.precision
            row[f"{kind}_{when}_gflops"] = gfs
            row[f"{kind}_{when}_peak_fraction"] = gfs / peaks[prec]
    log(f"{label}: forward {row['forward_before_s'] * 1e3:.0f} -> {row['forward_after_s'] * 1e3:.0f} ms ({inf.name}), "
        f"training step {row['train_before_s'] * 1e3:.0f} -> {row['train_after_s'] * 1e3:.0f} ms ({trn.name})")  # fmt: skip
    return row


def agreement(data: Path, splits: Path, max_cases: int) -> dict:
    """Dice per structure between the fast path and fp32 (contiguous) on MSD hippocampus cases the
    bundled model never trained on (fold 0's validation cases of ``splits``, the split it was trained on)."""
    import numpy as np

    from medseg.inference.predictor import Predictor
    from medseg.io.image import read_image

    val = json.loads(splits.read_text())[0]["val"] if splits.is_file() else []
    images = sorted((data / "imagesTr").glob("*_0000.nii.gz"))
    cases = [p for p in images if p.name.removesuffix("_0000.nii.gz") in set(val)] or images[-max_cases:]
    cases = cases[:max_cases]
    ref = Predictor.from_folder("hippocampus", device="cpu", amp=False, layout="contiguous")
    fast = Predictor.from_folder("hippocampus", device="cpu")
    dices = []
    for p in cases:
        image, meta = read_image(p)
        a, _ = ref.predict_array(image[None].astype(np.float32), meta)
        b, _ = fast.predict_array(image[None].astype(np.float32), meta)
        for lab in (1, 2):
            s = (a == lab).sum() + (b == lab).sum()
            dices.append(float(2 * ((a == lab) & (b == lab)).sum() / s) if s else 1.0)
    return {"cases": len(cases), "execution": fast.execution.name, "dice_min": min(dices),
            "dice_mean": float(np.mean(dices)), "split": "fold-0 validation" if val else "last cases"}  # fmt: skip


def report(info, res) -> list[str]:
    lines = header_lines("Networks against the CPU's limit (bf16/fp32 peak, fast path)", info, {}, res["quick"])
    pk = res["peaks"]
    lines += [
        f"Threads: {res['threads']}. Measured peak (best square matmul 1024-4096): **bf16 {pk['bfloat16']:.0f} "
        f"GFLOP/s, fp32 {pk['float32']:.0f} GFLOP/s**. Before = bf16 autocast, NCDHW, torch's InstanceNorm "
        "(the path before this change); after = the execution medseg.execution picks on this machine "
        "(forward: pre-cast bf16 weights, no autocast; training: fp32 master weights + bf16 autocast), "
        "layout-preserving instance norm. Fraction = GFLOP/s / the peak of the precision it runs in; a "
        "training step counts 3x the forward's FLOPs. Best of repeats, one process.",
        "",
        "| model | batch x patch | GFLOP fwd | forward before | forward after | fwd % peak before → after | "
        "training step before | after | train % peak before → after | chosen (inference / training) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["models"]:
        lines.append(
            f"| {r['model']} | {r['batch']} x {'x'.join(map(str, r['patch']))} | {r['gflop_forward']:.0f} | "
            f"{r['forward_before_s'] * 1e3:.0f} ms | {r['forward_after_s'] * 1e3:.0f} ms | "
            f"{100 * r['forward_before_peak_fraction']:.0f} % → **{100 * r['forward_after_peak_fraction']:.0f} %** | "
            f"{r['train_before_s'] * 1e3:.0f} ms | {r['train_after_s'] * 1e3:.0f} ms | "
            f"{100 * r['train_before_peak_fraction']:.0f} % → **{100 * r['train_after_peak_fraction']:.0f} %** | "
            f"{r['inference']} / {r['training']} |"
        )
    lines += ["", "Candidates timed by the automatic choice (ms, best of 2 after a warm-up):", ""]
    for r in res["models"]:
        lines.append(f"* {r['model']}: inference {json.dumps(r['inference_candidates_ms'])}; "
                     f"training {json.dumps(r['training_candidates_ms'])}")  # fmt: skip
    a = res.get("agreement")
    if a:
        lines += ["", f"Agreement with fp32 (bundled hippocampus model, {a['cases']} MSD cases, {a['split']}, "
                  f"{a['execution']}): Dice per structure min {a['dice_min']:.4f}, mean {a['dice_mean']:.4f}."]  # fmt: skip
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--agreement-cases", type=int, default=42)
    p.add_argument("--data", type=Path, default=default_data_root() / "msd_hippocampus")
    p.add_argument("--splits", type=Path, default=Path(__file__).resolve().parents[1]
                   / "workspace/hippo/preprocessed/MSD_Task04_Hippocampus/splits_final.json",
                   help="splits_final.json of the bundled model's training (`medseg plan/preprocess` of msd_hippocampus)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smoke test: the small U-Net only, 3 agreement cases")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    peaks = {"bfloat16": matmul_peak(torch.bfloat16), "float32": matmul_peak(torch.float32)}
    log(f"peak: bf16 {peaks['bfloat16']:.0f} GFLOP/s, fp32 {peaks['float32']:.0f} GFLOP/s")
    models = MODELS[:1] if args.quick else MODELS
    rows = [measure_model(*m, peaks, 1 if args.quick else args.reps) for m in models]
    res = {"quick": args.quick, "threads": torch.get_num_threads(), "peaks": peaks, "models": rows, "machine": info}
    if args.data.is_dir():
        res["agreement"] = agreement(args.data, args.splits, 3 if args.quick else args.agreement_cases)
    md = write_results(NAME, report(info, res), args.quick)
    (RESULTS / (f"{NAME}-quick.json" if args.quick else f"{NAME}.json")).write_text(
        json.dumps(res, indent=1, default=str)
    )
    log(f"written {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
