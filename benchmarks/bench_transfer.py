"""Transfer learning, measured: fine-tuning the shipped hippocampus model vs training from scratch.

Every run of a setting shares the plan (made from the setting's training cases only), the
training cases, the budget (epochs x iterations), the seed and every hyper-parameter; only the
initialisation differs. The test cases are never seen by plan, preprocess or training; they are
predicted with ``medseg predict`` (no TTA unless ``--tta``) and scored with ``medseg evaluate``
(Dice, HD95).

Settings (``--settings``, default both):

* ``spinalcord``: cross-anatomy MRI. Target = ``spinalcord_mri`` (binary cord, 5 images of 2
  subjects). Leave one subject out, both ways: train on one subject's images, test on the other's.
* ``hippo_lowdata``: low-data regime with a new label set. Target = whole hippocampus (labels 1+2
  merged to 1) on ``--n-train`` (default 8) of the 42 fold-0 validation cases of msd_hippocampus,
  which the shipped model never trained on (the cases of its ``validation_summary.json``); test on
  the remaining ones. Also scored: the shipped model with no training at all, its two labels merged
  by ``medseg predict --label-map`` (direct inference).

Runs per setting:

* ``scratch (planned net)``: random init, the network the plan chose (what ``medseg train`` gives);
* ``scratch (pretrained net)``: random init, the pretrained architecture (``--model-kwargs``): the
  controlled comparison, same network and same head size as the fine-tuned one;
* ``fine-tune``: ``--pretrained``: pretrained architecture and weights, heads re-initialised.

Standard library only; medseg runs through its CLI (``.venv/bin/medseg``). The derived datasets
are written under ``--workdir`` (the shared raw data is only read)::

    python3 benchmarks/bench_transfer.py                       # ~30-40 min on 2 cores
    python3 benchmarks/bench_transfer.py --quick               # smoke test, ~3 min
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, command_line, default_data_root, log, machine_info, medseg_git, write_results  # noqa: E402

PRETRAINED = REPO / "medseg" / "pretrained" / "hippocampus"


# ---------------------------------------------------------------------------- data
def binarise_nifti_labels(src: Path, dst: Path) -> None:
    """Copy a uint8 NIfTI-1 label map with every non-zero label set to 1 (standard library only)."""
    raw = gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes()
    endian = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    if struct.unpack(endian + "i", raw[:4])[0] != 348:
        raise SystemExit(f"{src}: not a NIfTI-1 file")
    dims = struct.unpack(endian + "8h", raw[40:56])
    datatype = struct.unpack(endian + "h", raw[70:72])[0]
    slope = struct.unpack(endian + "f", raw[112:116])[0]
    vox_offset = int(struct.unpack(endian + "f", raw[108:112])[0]) or 352
    n = 1
    for d in dims[1 : 1 + dims[0]]:
        n *= d
    scaled = slope == slope and slope not in (0.0, 1.0)  # NaN: no scaling
    if datatype != 2 or scaled or len(raw) != vox_offset + n:
        raise SystemExit(f"{src}: expected an unscaled uint8 label map (datatype {datatype}, slope {slope})")
    table = bytes([0] + [1] * 255)
    out = raw[:vox_offset] + raw[vox_offset:].translate(table)
    dst.write_bytes(gzip.compress(out, mtime=0))


def make_dataset(root: Path, name: str, labels: dict, cases: list[tuple[str, Path, Path]], binarise: bool) -> Path:
    """nnU-Net raw layout at ``root`` with images linked and labels copied (or binarised)."""
    shutil.rmtree(root, ignore_errors=True)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case, image, label in cases:
        os.symlink(image.resolve(), root / "imagesTr" / f"{case}_0000.nii.gz")
        if binarise:
            binarise_nifti_labels(label, root / "labelsTr" / f"{case}.nii.gz")
        else:
            shutil.copyfile(label, root / "labelsTr" / f"{case}.nii.gz")
    info = {
        "name": name,
        "channel_names": {"0": "MRI"},
        "labels": labels,
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(info, indent=2))
    return root


def setting_spinalcord(data: Path, work: Path) -> list[dict]:
    src = data / "spinalcord_mri"
    labels = json.loads((src / "dataset.json").read_text())["labels"]
    names = sorted(p.name[: -len("_0000.nii.gz")] for p in (src / "imagesTr").glob("*_0000.nii.gz"))
    subjects = sorted({n.rsplit("_", 1)[0] for n in names})  # sct_errsm30, spinegeneric_unf01
    out = []
    for subject in subjects:
        train = [n for n in names if n.startswith(subject)]
        test = [n for n in names if not n.startswith(subject)]
        out.append(
            {
                "setting": "spinalcord",
                "name": f"spinalcord_train-{subject}",
                "title": f"spinal cord MRI: train on {subject} ({len(train)} images), test on the other subject "
                f"({len(test)} images)",
                "labels": labels,
                "train": [(n, src / "imagesTr" / f"{n}_0000.nii.gz", src / "labelsTr" / f"{n}.nii.gz") for n in train],
                "test": [(n, src / "imagesTr" / f"{n}_0000.nii.gz", src / "labelsTr" / f"{n}.nii.gz") for n in test],
                "binarise": False,
                "label_map": None,
            }
        )
    return out


def setting_hippo_lowdata(data: Path, work: Path, n_train: int, seed: int) -> list[dict]:
    src = data / "msd_hippocampus"
    held_out = sorted(json.loads((PRETRAINED / "fold_0" / "validation_summary.json").read_text())["per_case"])
    trained = set(_pretrained_training_cases(src))
    assert not trained & set(held_out), "the shipped model's validation cases must not be in its training split"
    order = held_out[:]
    random.Random(seed).shuffle(order)
    train, test = sorted(order[:n_train]), sorted(order[n_train:])
    pair = lambda n: (n, src / "imagesTr" / f"{n}_0000.nii.gz", src / "labelsTr" / f"{n}.nii.gz")  # noqa: E731
    return [
        {
            "setting": "hippo_lowdata",
            "name": f"hippo_whole_{n_train}",
            "title": f"whole hippocampus (labels 1+2 merged), train on {len(train)} / test on {len(test)} of the "
            f"{len(held_out)} cases the shipped model never trained on",
            "labels": {"background": 0, "hippocampus": 1},
            "train": [pair(n) for n in train],
            "test": [pair(n) for n in test],
            "binarise": True,
            "label_map": {"Anterior": "hippocampus", "Posterior": "hippocampus"},
        }
    ]


def _pretrained_training_cases(src: Path) -> list[str]:
    """The shipped model's fold-0 training cases, recomputed from medseg's seeded split."""
    code = (
        "import json,sys; from medseg.data.cache import make_splits; "
        "print(json.dumps(make_splits(sorted(json.loads(sys.argv[1])))[0]['train']))"
    )
    names = sorted(p.name[: -len("_0000.nii.gz")] for p in (src / "imagesTr").glob("*_0000.nii.gz"))
    py = REPO / ".venv" / "bin" / "python"
    return json.loads(subprocess.run([str(py), "-c", code, json.dumps(names)], check=True, capture_output=True,
                                     text=True).stdout)  # fmt: skip


# ---------------------------------------------------------------------------- runs
class Medseg:
    def __init__(self, exe: Path, logs: Path):
        self.exe, self.logs = exe, logs
        logs.mkdir(parents=True, exist_ok=True)

    def __call__(self, *args, log_name: str) -> float:
        cmd = [str(self.exe), *map(str, args)]
        log("$ medseg " + " ".join(map(str, args)))
        t0 = time.perf_counter()
        with open(self.logs / f"{log_name}.log", "w") as fh:
            fh.write(" ".join(cmd) + "\n")
            fh.flush()
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})
        if proc.returncode != 0:
            tail = (self.logs / f"{log_name}.log").read_text().splitlines()[-15:]
            raise SystemExit(f"medseg failed ({proc.returncode}); log {self.logs / log_name}.log:\n" + "\n".join(tail))
        return time.perf_counter() - t0


def test_folders(work: Path, s: dict) -> tuple[Path, Path]:
    images, refs = work / "test" / "images", work / "test" / "labels"
    for d in (images, refs):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    for case, image, label in s["test"]:
        os.symlink(image.resolve(), images / f"{case}_0000.nii.gz")
        if s["binarise"]:
            binarise_nifti_labels(label, refs / f"{case}.nii.gz")
        else:
            shutil.copyfile(label, refs / f"{case}.nii.gz")
    return images, refs


def score(summary_path: Path) -> dict:
    s = json.loads(summary_path.read_text())
    (cls,) = s["mean"]  # binary targets
    per_case = [m[cls]["dice"] for m in s["per_case"].values()]
    m = s["mean"][cls]
    return {
        "dice": m["dice"],
        "hd95": m["hd95"],
        "hd95_undefined": m["n_undefined_hd95"],
        "nsd": m["nsd"],
        "worst_dice": min(per_case),
        "per_case_dice": {k: round(v[cls]["dice"], 4) for k, v in s["per_case"].items()},
        "cases": s["num_cases"],
    }


def run_setting(s: dict, args, medseg: Medseg, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    raw = make_dataset(work / "raw" / s["name"], s["name"], s["labels"], s["train"], s["binarise"])
    ws = work / "ws"
    shutil.rmtree(ws, ignore_errors=True)
    medseg("plan", raw, "-w", ws, log_name=f"{s['name']}_plan")
    medseg("preprocess", raw, "-w", ws, "--workers", 1, log_name=f"{s['name']}_preprocess")
    plan = json.loads((ws / "preprocessed" / s["name"] / "plan.json").read_text())
    conf = plan["configurations"]["3d_fullres"]
    pre = json.loads((PRETRAINED / "model.json").read_text())
    images, refs = test_folders(work, s)
    tta = [] if args.tta else ["--no-tta"]
    dataset_json = raw / "dataset.json"
    budget = [
        "--epochs", args.epochs, "--iterations", args.iterations, "--val-iterations", 0, "--seed", args.seed,
        "--threads", args.threads, "--device", "cpu", "-f", "all", "--no-validation",
    ]  # fmt: skip
    runs = [
        ("scratch (planned net)", []),
        ("scratch (pretrained net)", ["--arch", pre["model"], "--model-kwargs", json.dumps(pre["model_kwargs"])]),
        ("fine-tune", ["--pretrained", PRETRAINED]),
    ]
    if conf["model"] == pre["model"] and conf["model_kwargs"] == pre["model_kwargs"]:
        runs = [("scratch (planned net = pretrained net)", []), runs[2]]
    results = {
        "title": s["title"],
        "train": [c for c, _, _ in s["train"]],
        "test": [c for c, _, _ in s["test"]],
        "plan": {k: conf[k] for k in ("spacing", "patch_size", "batch_size")}
        | {"features": conf["model_kwargs"]["features"]},
        "runs": {},
    }
    for label, extra in runs:
        tag = label.split(" (")[0].replace("-", "") + ("_planned" if "planned" in label else "")
        out = work / "models" / tag
        shutil.rmtree(out, ignore_errors=True)
        secs = medseg("train", raw, "-w", ws, *budget, *extra, "-o", out, log_name=f"{s['name']}_{tag}_train")
        pred = work / "pred" / tag
        shutil.rmtree(pred, ignore_errors=True)
        medseg(
            "predict",
            "-m",
            out,
            "-i",
            images,
            "-o",
            pred,
            "--device",
            "cpu",
            *tta,
            log_name=f"{s['name']}_{tag}_predict",
        )
        medseg("evaluate", "--pred", pred, "--ref", refs, "--labels", dataset_json, log_name=f"{s['name']}_{tag}_eval")
        results["runs"][label] = score(pred / "summary.json") | {"train_seconds": round(secs, 1)}
        if "fine-tune" in label:
            log_text = (medseg.logs / f"{s['name']}_{tag}_train.log").read_text()
            results["runs"][label]["transfer_log"] = [
                ln for ln in log_text.splitlines()[1:] if ln.startswith(("pretrained", "patch"))
            ]
        log(f"{s['name']} {label}: {results['runs'][label]['dice']:.4f} Dice")
    if s["label_map"]:
        map_path = work / "label_map.json"
        map_path.write_text(json.dumps({"labels": s["labels"], "map": s["label_map"]}))
        pred = work / "pred" / "direct"
        shutil.rmtree(pred, ignore_errors=True)
        medseg("predict", "-m", PRETRAINED, "-i", images, "-o", pred, "--device", "cpu", "--label-map", map_path, *tta,
               log_name=f"{s['name']}_direct_predict")  # fmt: skip
        medseg("evaluate", "--pred", pred, "--ref", refs, "--labels", dataset_json, log_name=f"{s['name']}_direct_eval")
        results["runs"]["direct inference (no training, --label-map)"] = score(pred / "summary.json") | {
            "train_seconds": 0.0
        }
    return results


# ---------------------------------------------------------------------------- report
def fmt_hd(r: dict) -> str:
    if r["hd95"] is None:
        return "n/a"
    extra = f" ({r['hd95_undefined']} empty)" if r["hd95_undefined"] else ""
    return f"{r['hd95']:.2f}{extra}"


def report(all_results: list[dict], args, info: dict) -> list[str]:
    lines = [
        "# Transfer learning: fine-tuning vs scratch",
        "",
        f"* command (from the repository root): `{command_line()}`",
        f"* date: {info['date_utc']}",
        f"* machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GiB RAM, {info['os']}",
        f"* medseg commit: {medseg_git()}",
        f"* budget per run: {args.epochs} epochs x {args.iterations} iterations, seed {args.seed}, "
        f"{args.threads} CPU threads, SGD lr 0.01 poly, default augmentation, fold `all` (no per-epoch "
        "validation); every run of a setting identical except its initialisation",
        "* pretrained: `medseg/pretrained/hippocampus` (U-Net 16-32-64-128, 3 classes, 166 MSD hippocampus "
        "MRIs); fine-tuning adopts its architecture and re-initialises the heads",
        f"* test: `medseg predict` ({'mirror TTA' if args.tta else 'no TTA'}) on held-out cases, "
        "`medseg evaluate`; Dice and HD95 (mm) "
        "averaged over test cases; HD95 is undefined for an empty prediction",
        "",
    ]
    if args.quick:
        lines[1:1] = ["", "> **QUICK SMOKE TEST (`--quick`): tiny budget, not a measurement.**"]
    for r in all_results:
        plan = r["plan"]
        lines += [
            f"## {r['title']}",
            "",
            f"train: {', '.join(r['train'])}  ",
            f"test ({len(r['test'])}): {', '.join(r['test'][:6])}{', ...' if len(r['test']) > 6 else ''}  ",
            f"plan: patch {plan['patch_size']}, spacing {plan['spacing']}, batch {plan['batch_size']}, "
            f"planned features {plan['features']}",
            "",
            "| run | Dice | worst case Dice | HD95 (mm) | NSD @ 1 mm | train s |",
            "|---|---|---|---|---|---|",
        ]
        for label, m in r["runs"].items():
            lines.append(
                f"| {label} | {m['dice']:.3f} | {m['worst_dice']:.3f} | {fmt_hd(m)} | {m['nsd']:.3f} | "
                f"{m['train_seconds']:.0f} |"
            )
        lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=["hippo_lowdata", "spinalcord"],
                    choices=["hippo_lowdata", "spinalcord"])  # fmt: skip
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=8, help="hippo_lowdata: training cases (of the 42 held out).")
    ap.add_argument("--data", type=Path, default=default_data_root())
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/medseg_bench_transfer"))
    ap.add_argument("--out", type=Path, default=None, help="Markdown (default benchmarks/results/transfer.md).")
    ap.add_argument("--tta", action="store_true", help="Mirror test-time augmentation (8x slower prediction).")
    ap.add_argument("--quick", action="store_true", help="Smoke test: 2 epochs x 5 iterations.")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.iterations = 2, 5
    exe = REPO / ".venv" / "bin" / "medseg"
    if not exe.exists():
        raise SystemExit(f"{exe} not found: run `bash scripts/install.sh` first")
    info = machine_info()
    medseg = Medseg(exe, args.workdir / "logs")
    settings = []
    if "hippo_lowdata" in args.settings:
        settings += setting_hippo_lowdata(args.data, args.workdir, args.n_train, args.seed)
    if "spinalcord" in args.settings:
        settings += setting_spinalcord(args.data, args.workdir)
    results = []
    for s in settings:
        results.append(run_setting(s, args, medseg, args.workdir / s["name"]))
        (args.workdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    lines = report(results, args, info)
    print("\n".join(lines))
    write_results("transfer", lines, args.quick, args.out)


if __name__ == "__main__":
    main()
