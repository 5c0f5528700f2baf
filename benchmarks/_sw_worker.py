"""Driver run inside benchmarks/.venvs/monai (monai + editable medseg) by bench_sliding_window.py.

``--method medseg|monai``: build medseg's U-Net from the registry (seeded weights, so every
process gets the same network), make a seeded random (1, *size) volume, warm up on one tile,
then time ``--repeats`` full sliding-window passes under ``torch.inference_mode()``:

* medseg: ``medseg.inference.sliding_window.sliding_window_predict(image, model, tile, K,
  step=1-overlap, gaussian=True, mirror_axes=(), tile_batch=B)``
* MONAI:  ``monai.inferers.sliding_window_inference(image[None], tile, B, model,
  overlap=overlap, mode="gaussian", sigma_scale=0.125)``

``--method check``: both on the same (smaller) volume in one process, plus MONAI given medseg's
Gaussian as ``roi_weight_map``; prints the max abs logit differences.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def build(args):
    from medseg.models.registry import create_model

    torch.manual_seed(args.seed)
    n = len(args.features)
    strides = [[1, 1, 1]] + [[2, 2, 2]] * (n - 1)
    model = create_model(
        "unet",
        1,
        args.classes,
        spatial_dims=3,
        deep_supervision=False,
        features=list(args.features),
        strides=strides,
        kernel_sizes=[[3, 3, 3]] * n,
    )
    return model.eval()


def volume(size, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn((1, *size), generator=g)


def network_fn(model, amp: bool):
    """The network as both tilers see it: plain, or under bf16 autocast returning float32 logits (what
    medseg's Predictor does by default on CPUs with native bf16; a MONAI user would wrap it the same way)."""
    if not amp:
        return model

    def fn(x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return model(x).float()

    return fn


def run_medseg(model, image, args):
    from medseg.inference.sliding_window import sliding_window_predict

    return sliding_window_predict(
        image,
        model,
        args.patch,
        args.classes,
        step=1 - args.overlap,
        gaussian=True,
        mirror_axes=(),
        tile_batch=args.sw_batch,
    )


def run_monai(model, image, args, roi_weight_map=None):
    from monai.inferers import sliding_window_inference

    out = sliding_window_inference(
        image[None],
        args.patch,
        args.sw_batch,
        model,
        overlap=args.overlap,
        mode="gaussian",
        sigma_scale=0.125,
        roi_weight_map=roi_weight_map,
    )
    return out[0]


def compare(a, b, margin) -> dict:
    """Max / mean abs difference of two (K, *spatial) logit arrays, also away from the volume border
    (where MONAI's 1e-3 weight clamp and medseg's unclamped Gaussian blend the outermost voxels
    differently), and how often the argmax agrees."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    d = np.abs(a - b)
    inner = d[(slice(None), *[slice(m, s - m) for m, s in zip(margin, d.shape[1:])])]
    return {
        "max_abs_logit": float(np.abs(a).max()),
        "max_abs_diff": float(d.max()),
        "mean_abs_diff": float(d.mean()),
        "max_abs_diff_interior": float(inner.max()) if inner.size else None,
        "argmax_agree": float((a.argmax(0) == b.argmax(0)).mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", choices=["medseg", "monai", "check", "compare"], required=True)
    p.add_argument("--compare", nargs=2, default=None, help="Two .npy logit files (--method compare).")
    p.add_argument("--size", type=int, nargs=3, default=None)
    p.add_argument("--patch", type=int, nargs=3, required=True)
    p.add_argument("--features", type=int, nargs="+", required=True)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--sw-batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="Network under bf16 autocast (both methods).")
    p.add_argument("--save", default=None, help="Write the last logits (float32 .npy) here.")
    p.add_argument("--result", required=True)
    args = p.parse_args()
    margin = [t // 2 for t in args.patch]
    if args.method == "compare":
        with open(args.result, "w") as fh:
            json.dump(
                compare(np.load(args.compare[0], mmap_mode="r"), np.load(args.compare[1], mmap_mode="r"), margin), fh
            )
        return
    torch.set_num_threads(args.threads)
    net = build(args)
    model = network_fn(net, args.amp)
    image = volume(args.size, args.seed)
    result = {
        "method": args.method,
        "size": args.size,
        "amp": args.amp,
        "params": sum(q.numel() for q in net.parameters()),
        "torch_threads": torch.get_num_threads(),
    }
    with torch.inference_mode():
        if args.method == "check":
            from medseg.inference.sliding_window import gaussian_weights

            a = run_medseg(model, image, args)
            b = run_monai(model, image, args)
            c = run_monai(model, image, args, roi_weight_map=gaussian_weights(args.patch))
            result.update(
                {
                    "monai_gaussian": compare(a.numpy(), b.numpy(), margin),
                    "monai_medseg_weights": compare(a.numpy(), c.numpy(), margin),
                }
            )
        else:
            fn = run_medseg if args.method == "medseg" else run_monai
            fn(model, torch.randn((1, *args.patch)), args)  # warm-up: one tile (oneDNN primitives, allocator)
            times, out = [], None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = fn(model, image, args)
                times.append(time.perf_counter() - t0)
            result.update({"times_s": times, "out_shape": list(out.shape)})
            if args.save:
                np.save(args.save, out.float().numpy())
    with open(args.result, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
