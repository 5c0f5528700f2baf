"""I-MedSAM fine-tuned on BUSI against LiteMedSAM zero-shot, from the same ground-truth boxes, on the
40 test images of bench_2d's split, side by side with bench_2d's nnU-Net v2 and medseg 2D models
(`results/2d.json`, trained on the same 160 images), and at other output resolutions.

Dice per image (all lesions of an image: the union of one mask per connected component's box, as
bench_sam's zero-shot protocol, tight boxes and boxes enlarged by 5 px). Resolution: the same
embedding decoded onto half and twice the image's pixel grid; I-MedSAM renders that grid directly,
LiteMedSAM's fixed 256 x 256 logits are resized bilinearly to it; the reference is the manual mask
resampled to that grid (bilinear on the 0/1 mask, antialiased when shrinking, > 0.5).

    .venv/bin/python benchmarks/bench_imedsam.py -m runs/busi_imedsam
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, add_common_args, default_data_root, header_lines, log, machine_info, write_results  # noqa: E402
from bench_sam import PAD, bbox2d, busi, busi_cases, components, dice, png  # noqa: E402

SCALES = (0.5, 2.0)


def resampled(mask: np.ndarray, size) -> np.ndarray:
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    shrink = size[0] < mask.shape[0]
    return (F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=shrink)[0, 0] > 0.5).numpy()


def at_scales(predictor, image: np.ndarray, gt: np.ndarray) -> dict:
    """Dice at each of SCALES (tight boxes) against the resampled manual mask."""
    comps = components(gt)
    emb = predictor.embed(image)
    boxes = np.array([bbox2d(c) for c in comps], np.float32)
    res = {}
    for s in SCALES:
        size = (round(gt.shape[0] * s), round(gt.shape[1] * s))
        logits = predictor.decode(emb, boxes, output_size=size)
        res[f"x{s:g}"] = dice((logits > 0).any(0).numpy(), resampled(gt, size))
    return res


def evaluate(args, predictor, cases) -> dict:
    per, peers = busi(args, predictor, cases)  # native grid, tight and enlarged boxes
    src = args.data / "busi_breast_ultrasound"
    for c in cases:
        gt = png(src / "labelsTr" / f"{c}.png") > 0
        if per[c]:
            per[c].update(at_scales(predictor, png(src / "imagesTr" / f"{c}_0000.png"), gt))
    keys = ["tight", f"pad{PAD}", *(f"x{s:g}" for s in SCALES)]
    means = {k: statistics.mean(per[c][k] for c in cases if per[c]) for k in keys}
    return {"mean": means, "per_case": per, "peers": peers}


def training_budget(model: Path) -> str:
    log_file = next(model.glob("fold_*/training_log.jsonl"), None)
    if log_file is None:
        return "unknown"
    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    spec = json.loads((model / "model.json").read_text())
    minutes = sum(r.get("seconds", 0) for r in rows) / 60
    last = rows[-1].get("prompt_dice") if rows else None
    return f"{len(rows)} epochs, {minutes:.0f} min of training; recipe {json.dumps(spec.get('training'))}; last per-epoch prompt Dice {last}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", type=Path, required=True, help="The fine-tuned I-MedSAM model folder.")
    ap.add_argument("--data", type=Path, default=default_data_root())
    add_common_args(ap, workdir_default="medseg_bench_imedsam")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from medseg.sam.predictor import SamPredictor
    from medseg.sam.weights import import_litemedsam

    lite_dir = args.workdir / "litemedsam"
    if not (lite_dir / "model.json").is_file():
        import_litemedsam(lite_dir, overwrite=True)
    cases = busi_cases(args.data, args.quick)
    res = {}
    for name, folder in (("LiteMedSAM zero-shot", lite_dir), ("I-MedSAM fine-tuned", args.model)):
        log(f"evaluating {name}")
        res[name] = evaluate(args, SamPredictor.from_folder(folder), cases)
    info = machine_info()
    lines = header_lines("I-MedSAM on BUSI: fine-tuned vs LiteMedSAM zero-shot", info, {}, args.quick)
    lines += [f"* I-MedSAM training: {training_budget(args.model)}", ""]
    lines += [f"| model ({len(cases)} test images) | Dice, tight boxes | boxes + {PAD} px | half resolution | "
              "double resolution |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in res.items():
        m = r["mean"]
        lines.append(f"| {name} | {m['tight']:.4f} | {m[f'pad{PAD}']:.4f} | {m['x0.5']:.4f} | {m['x2']:.4f} |")
    for peer, d in res["LiteMedSAM zero-shot"]["peers"].items():
        lines.append(f"| {peer} (no box; bench_2d, same split) | {d:.4f} | – | – | – |")
    (args.workdir / "imedsam_busi.json").write_text(json.dumps(res, indent=1, default=float))
    write_results("imedsam_busi", lines, args.quick, args.out)


if __name__ == "__main__":
    main()
