"""LeFusion, measured: do synthetic lesion pairs make a nodule segmenter better? (issue 13)

Data: ``lidc_nodule_vois`` (LIDC-IDRI nodule VOIs, manual masks). Patients are split once (seeded):
40 % of them give the held-out test VOIs; from the VOIs of the others, ``--real`` (default 50) are
drawn: the small real training set. Everything below is trained on those real VOIs only.

1. **denoiser**: ``lefusion_unet`` trained on the real VOIs (``lesion_diffusion`` task, LeFusion's
   recipe: Adam 1e-4, constant LR, EMA 0.995, no augmentation but in-plane flips), texture clusters at
   its end (or ``--denoiser MODEL``: an existing model trained on the same VOIs);
2. **synthetic pairs**: ``medseg synthesize`` of the real dataset, 4 samples per VOI, the textures in
   turn: each VOI's lesion region regenerated with a new texture under its own mask (the background
   stays the real VOI bit for bit); x2 = the first two samples of each VOI;
3. **texture control**: every test VOI regenerated with each texture; the histogram of each generated
   lesion is assigned to its nearest cluster centre (L1): the confusion matrix, and a PNG grid;
4. **segmenters**: the 3D U-Net of the real dataset's plan, same budget (epochs x iterations) in every
   arm, ``--seeds`` seeds each:
   * ``real``: the real VOIs alone (nnU-Net's online augmentation, as in every arm);
   * ``conventional x4``: plus 4 rotated/scaled copies of each real VOI (offline, medseg's spatial
     augmentation) drawn as 4/5 of each batch — the control with as many extra images;
   * ``lefusion x2`` / ``x4``: plus the synthetic pairs, drawn as 2/3 and 4/5 of each batch;
5. **report**: Dice and HD95 on the test VOIs, averaged per patient then over patients, mean ± std
   over the seeds (``benchmarks/results/lefusion.md``, ``docs/images/lefusion_textures.png``).

    .venv/bin/python benchmarks/bench_lefusion.py            # hours on 2 CPU cores (see BENCHMARKS.md)
    .venv/bin/python benchmarks/bench_lefusion.py --quick    # smoke test: tiny budgets, not figures
    .venv/bin/python benchmarks/bench_lefusion.py --speed --denoiser MODEL   # seconds per 32 x 64 x 64 ROI
    # a new denoiser, the arms that do not depend on it read from an earlier run of the same split and budget:
    .venv/bin/python benchmarks/bench_lefusion.py --arms lefusion_x2 lefusion_x4 --reuse OLD/lefusion.json

Every stage resumes: rerun the same command and finished work is read back.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, default_data_root, log, machine_info  # noqa: E402

ARMS = {"real": None, "conventional_x4": ("conventional_x4", 0.8), "lefusion_x2": ("syn_x2", 2 / 3),
        "lefusion_x4": ("syn_x4", 0.8)}  # fmt: skip


# ------------------------------------------------------------------------------------ split
def split(data: Path, n_real: int, seed: int, test_share: float = 0.4) -> tuple[list[str], list[str], dict]:
    """(real training VOIs, test VOIs, VOI -> patient): by patient, seeded."""
    with open(data / "nodules.csv", newline="") as fh:
        patient = {r["case"]: r["patient_id"] for r in csv.DictReader(fh)}
    patients = sorted(set(patient.values()))
    random.Random(seed).shuffle(patients)
    test_patients = set(patients[: round(len(patients) * test_share)])
    test = sorted(c for c, p in patient.items() if p in test_patients)
    pool = sorted(c for c, p in patient.items() if p not in test_patients)
    return sorted(random.Random(seed).sample(pool, n_real)), test, patient


def make_dataset(src: Path, names: list[str], dest: Path) -> Path:
    """An nnU-Net dataset of links to ``names`` of ``src``."""
    for sub, suffix in (("imagesTr", "_0000.nii.gz"), ("labelsTr", ".nii.gz")):
        (dest / sub).mkdir(parents=True, exist_ok=True)
        for n in names:
            link = dest / sub / f"{n}{suffix}"
            if not link.exists():
                link.symlink_to((src / sub / f"{n}{suffix}").resolve())
    meta = json.loads((src / "dataset.json").read_text())
    meta.update(numTraining=len(names), name=dest.name)
    (dest / "dataset.json").write_text(json.dumps(meta, indent=1))
    return dest


# ------------------------------------------------------------------------ denoiser, samples
def _planned(dataset: Path, ws: Path) -> bool:
    from medseg import api
    from medseg.io.dataset import load_dataset_json

    return api.open_workspace(ws).plan_path(load_dataset_json(dataset).name).is_file()


def train_denoiser(real: Path, out: Path, args) -> Path:
    from medseg import api
    from medseg.training.config import TrainingConfig

    model = out / "denoiser"
    if (model / "textures.json").is_file():
        return model
    ws = out / "ws_denoiser"
    if not _planned(real, ws):
        api.plan(real, ws, normalization={0: "range:-1000,400"}, progress=False)
        api.preprocess(real, ws, progress=False)
    cfg = TrainingConfig(model="lefusion_unet", epochs=args.denoiser_epochs, iterations_per_epoch=args.denoiser_iterations,
                         val_iterations=0, schedule="constant", ema_decay=0.995, augmentation="none",
                         checkpoint_every=5, seed=0, model_kwargs={"hist_scale": args.hist_scale},
                         task_options={"cond_dropout": args.cond_dropout})  # fmt: skip
    resume = (model / "fold_all" / "training_state.pt").is_file()
    api.train(real, ws, fold="all", config=cfg, output=model, resume=resume, log=log)
    return model


def sampling(args, guidance: float | None) -> dict:
    return {"steps": args.steps, "jump_length": args.jump_length, "jump_n_sample": args.jump_n_sample,
            "guidance": guidance}  # fmt: skip


def synthesize(denoiser: Path, real: Path, out: Path, names: list[str], args) -> None:
    from medseg.apps.synthesis import Synthesizer, synthesize_dataset

    syn = Synthesizer.from_folder(denoiser, device="cpu")
    rows = synthesize_dataset(syn, denoiser, real, out / "syn_x4", samples=4, all_textures=True, log=log,
                              **sampling(args, syn.check_guidance(args.guidance)))  # fmt: skip
    seconds = [r["seconds"] for r in rows if "seconds" in r]
    if seconds:
        log(f"sampling: {statistics.median(seconds):.1f} s per ROI (median of {len(seconds)})")
    x2 = out / "syn_x2"
    make_dataset(out / "syn_x4", [f"{n}_syn{k}" for n in names for k in (0, 1)], x2)


def conventional_copies(real: Path, dest: Path, names: list[str], copies: int = 4, seed: int = 0) -> None:
    """``copies`` rotated/scaled versions of each real VOI (medseg's spatial augmentation, default
    preset, the VOI's own size; HU shifted so that the padding is air), labels moved with them."""
    import torch

    from medseg.augment.presets import default
    from medseg.augment.transforms import spatial_transform
    from medseg.io.image import read_image, write_image

    cfg = default(3, anisotropic=True)
    g = torch.Generator().manual_seed(seed)
    (dest / "imagesTr").mkdir(parents=True, exist_ok=True)
    (dest / "labelsTr").mkdir(exist_ok=True)
    for n in names:
        image, meta = read_image(real / "imagesTr" / f"{n}_0000.nii.gz")
        label, lmeta = read_image(real / "labelsTr" / f"{n}.nii.gz")
        for k in range(copies):
            out_label = dest / "labelsTr" / f"{n}_aug{k}.nii.gz"
            if out_label.is_file():
                continue
            x = torch.from_numpy(image.astype(np.float32) + 1024)[None, None]
            s = torch.from_numpy(label.astype(np.int64))[None, None]
            xa, sa = spatial_transform(x, s, image.shape, cfg, g)
            write_image((xa[0, 0].numpy() - 1024).round().astype(image.dtype), meta,
                        dest / "imagesTr" / f"{n}_aug{k}_0000.nii.gz")  # fmt: skip
            write_image(sa[0, 0].numpy().astype(label.dtype), lmeta, out_label)
    meta_json = json.loads((real / "dataset.json").read_text())
    meta_json.update(numTraining=len(names) * copies, name=dest.name)
    (dest / "dataset.json").write_text(json.dumps(meta_json, indent=1))


# ---------------------------------------------------------------------------- texture control
def texture_control(denoiser: Path, data: Path, test: list[str], out: Path, args, guidance=None, grid_png=None) -> dict:
    """Each test VOI regenerated with each texture: the nearest centre of each generated lesion's histogram."""
    import torch

    from medseg.apps.synthesis import Synthesizer, read_textures, texture_histogram
    from medseg.io.image import read_image

    syn = Synthesizer.from_folder(denoiser, device="cpu")
    guidance = syn.check_guidance(guidance)
    path = out / f"texture_control_s{args.steps}_j{args.jump_length}x{args.jump_n_sample}_g{guidance:g}.json"
    if path.is_file():
        return json.loads(path.read_text())
    tex = read_textures(denoiser)
    centres = np.asarray([t["histogram"] for t in tex["textures"]])
    lo, hi = syn._window()
    bins = int(tex["bins"])
    confusion = np.zeros((len(centres), len(centres)), int)
    grid, seconds, asked_hu, got_hu, real_hu = [], [], [], [], []
    bin_hu = lo + (np.arange(bins) + 0.5) / bins * (hi - lo)
    for n in test[: args.texture_vois]:
        image, meta = read_image(data / "imagesTr" / f"{n}_0000.nii.gz")
        mask, _ = read_image(data / "labelsTr" / f"{n}.nii.gz")
        row = [image]
        real_hu.append(float(np.clip(image[mask > 0], lo, hi).mean()))
        for k in range(len(centres)):
            t0 = time.perf_counter()
            asked = texture_histogram(tex, k, seed=k)
            new = syn.synthesize(image, meta, mask, asked, seed=k, **sampling(args, guidance))
            seconds.append(time.perf_counter() - t0)
            v = (np.clip(new[mask > 0].astype(np.float64), lo, hi) - lo) / (hi - lo) * 2 - 1
            h = torch.histc(torch.from_numpy(v), bins=bins, min=-1, max=1).numpy()
            h = h / max(h.sum(), 1)
            confusion[k, int(np.abs(centres - h[None]).sum(1).argmin())] += 1
            asked_hu.append(float(asked[:bins] @ bin_hu))
            got_hu.append(float(np.clip(new[mask > 0], lo, hi).mean()))
            row.append(new)
        grid.append((row, mask))
    result = {"confusion": confusion.tolist(), "vois": len(grid),
              "accuracy": float(np.trace(confusion) / max(confusion.sum(), 1)),
              "mean_hu": [t.get("mean_hu") for t in tex["textures"]], "seconds_per_roi": statistics.median(seconds),
              "generated_mean_hu": [statistics.mean(got_hu[k :: len(centres)]) for k in range(len(centres))],
              "asked_vs_generated_hu_r": float(np.corrcoef(asked_hu, got_hu)[0, 1]), "real_mean_hu": statistics.mean(real_hu),
              "sampling": sampling(args, guidance)}  # fmt: skip
    if grid_png is not None:
        plot_grid(grid, grid_png, result["mean_hu"])
    path.write_text(json.dumps(result, indent=1))
    return result


def plot_grid(grid, path: Path, mean_hu) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = grid[:6]
    fig, axes = plt.subplots(len(rows), len(rows[0][0]), figsize=(2 * len(rows[0][0]), 2 * len(rows)), dpi=100)
    axes = np.atleast_2d(axes)
    for r, (images, mask) in enumerate(rows):
        z = int(np.argmax((mask > 0).sum((1, 2))))
        for c, img in enumerate(images):
            ax = axes[r, c]
            ax.imshow(img[z], cmap="gray", vmin=-1000, vmax=400)
            ax.contour(mask[z] > 0, levels=[0.5], colors="y", linewidths=0.5)
            ax.set_axis_off()
            if r == 0:
                ax.set_title("real" if c == 0 else f"texture {c - 1} ({mean_hu[c - 1]:.0f} HU)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


# ------------------------------------------------------------------------------------- speed
SPEED_SETTINGS = ((30, 5, 3, 1.0), (30, 5, 3, 2.0), (20, 5, 2, 2.0))  # steps, jump length, jump n sample, guidance


def speed(denoiser: Path, out: Path) -> str:
    """Seconds per ROI of LeFusion's size (32 x 64 x 64, a 16 x 32 x 32 lesion box) for each sampling setting."""
    import torch

    from medseg.apps.synthesis import Synthesizer, repaint

    syn = Synthesizer.from_folder(denoiser, device="cpu")
    known = torch.rand(1, 1, 32, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lesion = torch.zeros_like(known)
    lesion[..., 8:24, 16:48, 16:48] = 1
    h = torch.full((1, syn.net.cond_dim), 1 / 16)
    lines = ["| steps | jumps | guidance | seconds per 32 x 64 x 64 ROI |", "|---:|---:|---:|---:|"]
    for steps, jl, jn, g in SPEED_SETTINGS:
        if g != 1.0 and syn.cond_dropout == 0:
            continue
        for n, a, b in ((2, 1, 1), (steps, jl, jn)):  # a warm-up, then the timed run
            t0 = time.perf_counter()
            repaint(syn.net, known, lesion, h, steps=n, jump_length=a, jump_n_sample=b, dtype=syn.dtype, guidance=g)
        lines.append(f"| {steps} | {jl} x {jn} | {g:g} | {time.perf_counter() - t0:.1f} |")
        log(lines[-1])
    return "\n".join(lines)


# --------------------------------------------------------------------------------- segmenters
def train_segmenter(real: Path, out: Path, arm: str, seed: int, args) -> Path:
    from medseg import api
    from medseg.apps.adapt import source_cache
    from medseg.training.config import TrainingConfig

    model = out / "segmenters" / f"{arm}_s{seed}"
    if (model / "fold_all" / "model.safetensors").is_file():
        return model
    ws = out / "ws_seg"
    if not _planned(real, ws):
        api.plan(real, ws, progress=False)
        api.preprocess(real, ws, configurations=("3d_fullres",), progress=False)
    extra = []
    if ARMS[arm]:
        folder, share = ARMS[arm]
        plan = api.load_plan(real, ws)
        cache = source_cache(out / folder, plan, "3d_fullres", api.open_workspace(ws), progress=False)
        extra = [{"cache": str(cache), "share": share}]
    cfg = TrainingConfig(epochs=args.seg_epochs, iterations_per_epoch=args.seg_iterations, val_iterations=0,
                         seed=seed, extra_data=extra, final_validation=False, checkpoint_every=5)  # fmt: skip
    resume = (model / "fold_all" / "training_state.pt").is_file()
    api.train(real, ws, configuration="3d_fullres", fold="all", config=cfg, output=model, resume=resume, log=log)
    return model


def score(model: Path, data: Path, test: list[str], patient: dict) -> dict:
    """Dice and HD95 of the test VOIs, averaged per patient, then over patients."""
    from medseg.evaluation.metrics import evaluate_folder
    from medseg.inference.predictor import Predictor
    from medseg.io.dataset import list_cases

    path = model / "test_summary.json"
    if not path.is_file():
        cases = [c for c in list_cases(data) if c.name in set(test)]
        Predictor.from_folder(model).predict_cases(cases, model / "test_predictions", progress=False)
        evaluate_folder(model / "test_predictions", data / "labelsTr", {"background": 0, "nodule": 1},
                        names=test, output=path)  # fmt: skip
    per_case = json.loads(path.read_text())["per_case"]
    by_patient: dict[str, list] = {}
    for case, m in per_case.items():
        by_patient.setdefault(patient[case], []).append(m["nodule"])
    per_patient = {p: statistics.mean(r["dice"] for r in rows) for p, rows in by_patient.items()}
    dice = statistics.mean(per_patient.values())
    hd = [
        statistics.mean(h) for rows in by_patient.values() if (h := [r["hd95"] for r in rows if r["hd95"] is not None])
    ]
    return {"dice": dice, "hd95": statistics.mean(hd) if hd else None, "patients": len(by_patient),
            "per_patient_dice": per_patient}  # fmt: skip


def paired_gain(rows: list[dict], base: list[dict], seed: int = 0, draws: int = 10000) -> dict:
    """Per-patient Dice of an arm minus the ``real`` arm's (each averaged over the seeds first): the mean,
    a 95 % bootstrap interval over patients, and how many patients gain / lose."""
    patients = sorted(base[0]["per_patient_dice"])
    arm = np.array([statistics.mean(r["per_patient_dice"][p] for r in rows) for p in patients])
    ref = np.array([statistics.mean(r["per_patient_dice"][p] for r in base) for p in patients])
    d = arm - ref
    boot = np.random.default_rng(seed).choice(d, (draws, len(d))).mean(1)
    return {"mean": float(d.mean()), "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "better": int((d > 1e-9).sum()), "worse": int((d < -1e-9).sum())}  # fmt: skip


def _agg(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def report(results: dict, texture_runs: list[dict], args, meta: dict) -> str:
    lines = [f"Test: {meta['test_vois']} VOIs of {meta['test_patients']} patients; real training set: {args.real} VOIs; "
             f"segmenter budget {args.seg_epochs} x {args.seg_iterations} iterations; {len(args.seeds)} seed(s).", "",
             "| arm | Dice (per patient) | HD95 mm (per patient) | Dice vs real, paired by patient (95 % CI) | patients better / worse |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    if meta.get("reused_arms"):
        lines.insert(1, f"Arms {', '.join(meta['reused_arms'])} (independent of the denoiser): read from "
                        f"{Path(next(iter(meta['reused_arms'].values()))).name}, the same split, seeds and budget.")  # fmt: skip
    for arm, rows in results.items():
        gain = "–"
        if arm != "real" and "real" in results and all("per_patient_dice" in r for r in rows + results["real"]):
            g = paired_gain(rows, results["real"])
            gain = f"{g['mean']:+.4f} ({g['ci95'][0]:+.4f} … {g['ci95'][1]:+.4f}) | {g['better']} / {g['worse']}"
        else:
            gain += " | –"
        lines.append(f"| {arm} | {_agg([r['dice'] for r in rows])} | {_agg([r['hd95'] for r in rows])} | {gain} |")
    for textures in texture_runs:
        k, w = len(textures["confusion"]), textures["sampling"].get("guidance", 1.0)
        lines += ["", f"Texture control, guidance {w:g} ({textures['vois']} test VOIs x {k} textures; rows: asked, "
                  f"columns: nearest centre of the generated lesion's histogram): accuracy {textures['accuracy']:.2f}", "",
                  "| asked \\ nearest | " + " | ".join(map(str, range(k))) + " |", "|---|" + "---:|" * k]  # fmt: skip
        lines += [f"| {i} | " + " | ".join(map(str, row)) + " |" for i, row in enumerate(textures["confusion"])]
        if "generated_mean_hu" in textures:
            got = ", ".join(
                f"{k}: {a:.0f} (asked {m:.0f})"
                for k, (a, m) in enumerate(zip(textures["generated_mean_hu"], textures["mean_hu"]))
            )
            lines += ["", f"Mean HU of the generated lesions per asked texture: {got}; the same VOIs' real lesions: "
                      f"{textures['real_mean_hu']:.0f}; correlation of asked and generated mean HU over all samples: "
                      f"r = {textures['asked_vs_generated_hu_r']:.2f}. Sampling: {textures['seconds_per_roi']:.1f} s per ROI "
                      f"(median, steps {textures['sampling']['steps']}, jumps {textures['sampling']['jump_length']} x "
                      f"{textures['sampling']['jump_n_sample']})."]  # fmt: skip
    return "\n".join(lines)


def reused_arms(args) -> dict:
    """The arms that do not depend on the denoiser (``real``, ``conventional_x4``) from an earlier run's
    results JSON (``--reuse``), when they are not among ``--arms`` and that run had the same split and budget."""
    if args.reuse is None:
        return {}
    prev = json.loads(args.reuse.read_text())
    same = ("real", "seeds", "seg_epochs", "seg_iterations")
    for key in same:
        if prev["args"][key] != str(getattr(args, key)):
            raise SystemExit(f"{args.reuse}: {key} {prev['args'][key]} differs from this run's {getattr(args, key)}")
    return {a: rows for a, rows in prev["results"].items() if a in ("real", "conventional_x4") and a not in args.arms}


def main() -> None:
    data = default_data_root() / "lidc_nodule_vois"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=data)
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "lefusion")
    ap.add_argument("--real", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--denoiser", type=Path, default=None, help="an existing lefusion model trained on the same VOIs")
    ap.add_argument("--denoiser-epochs", type=int, default=40)
    ap.add_argument("--denoiser-iterations", type=int, default=100)
    ap.add_argument("--hist-scale", type=float, default=16.0, help="the denoiser's histogram factor (1: LeFusion's)")
    ap.add_argument(
        "--cond-dropout", type=float, default=0.1, help="P(no histogram) in training: classifier-free guidance"
    )
    ap.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance of the synthetic pairs (default: the model's, see medseg synthesize)",
    )
    ap.add_argument(
        "--texture-guidance",
        type=float,
        nargs="*",
        default=[],
        help="further guidance weights for the texture-control table (e.g. 1 3)",
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--jump-length", type=int, default=5)
    ap.add_argument("--jump-n-sample", type=int, default=2)
    ap.add_argument("--texture-vois", type=int, default=20)
    ap.add_argument("--seg-epochs", type=int, default=30)
    ap.add_argument("--seg-iterations", type=int, default=100)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--reuse", type=Path, default=None,
                    help="an earlier run's results JSON: its real and conventional_x4 arms (independent of the denoiser) "
                    "stand for those not in --arms")  # fmt: skip
    ap.add_argument("--stop-after", choices=("denoiser", "textures", "samples"), default=None,
                    help="run the stages up to this one only (each resumes; rerun without it to go on)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="tiny budgets and sets (smoke test, not figures)")
    ap.add_argument("--speed", action="store_true", help="only the sampling-time table of the denoiser (idle machine)")
    args = ap.parse_args()
    if args.quick:
        args.real, args.seeds, args.denoiser_epochs, args.denoiser_iterations = 6, [0], 1, 4
        args.steps, args.jump_length, args.jump_n_sample, args.texture_vois = 3, 1, 1, 2
        args.seg_epochs, args.seg_iterations = 1, 4
        args.workdir = args.workdir.with_name(args.workdir.name + "_quick")
    out, t0 = args.workdir, time.time()
    out.mkdir(parents=True, exist_ok=True)
    names, test, patient = split(args.data, args.real, seed=2026)
    if args.quick:
        test = test[:4]
    real = make_dataset(args.data, names, out / "Dataset601_LIDCReal")
    log(f"split: {len(names)} real training VOIs, {len(test)} test VOIs of {len({patient[c] for c in test})} patients")
    denoiser = args.denoiser or train_denoiser(real, out, args)
    if args.speed:
        text = speed(denoiser, out)
        if not args.quick:
            (RESULTS / "lefusion_speed.md").write_text(f"{json.dumps(machine_info())}\n\n{text}\n")
        return print(text)
    if args.stop_after == "denoiser":
        return log(f"denoiser ready: {denoiser}")
    png = out / "lefusion_textures.png" if args.quick else REPO / "docs" / "images" / "lefusion_textures.png"
    texture_runs = []
    for w in dict.fromkeys([*args.texture_guidance, args.guidance]):  # the downstream weight last: its grid is kept
        texture_runs.append(
            texture_control(denoiser, args.data, test, out, args, w, png if w == args.guidance else None)
        )
        t = texture_runs[-1]
        log(f"texture control, guidance {t['sampling']['guidance']:g}: accuracy {t['accuracy']:.2f}, "
            f"{t['seconds_per_roi']:.1f} s per ROI")  # fmt: skip
    if args.stop_after == "textures":
        return None
    synthesize(denoiser, real, out, names, args)
    conventional_copies(real, out / "conventional_x4", names)
    if args.stop_after == "samples":
        return log(f"synthetic pairs ready: {out / 'syn_x4'}")
    results, reused = {}, reused_arms(args)
    for arm in ARMS:
        if arm in args.arms:
            results[arm] = [
                score(train_segmenter(real, out, arm, s, args), args.data, test, patient) for s in args.seeds
            ]
            log(f"{arm}: Dice {_agg([r['dice'] for r in results[arm]])}")
        elif arm in reused:
            results[arm] = reused[arm]
    meta = {"test_vois": len(test), "test_patients": len({patient[c] for c in test}),
            "reused_arms": {a: str(args.reuse) for a in reused if a in results}}  # fmt: skip
    text = report(results, texture_runs, args, meta)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "lefusion.md").write_text(text + "\n")
        (RESULTS / "lefusion.json").write_text(json.dumps({"results": results, "textures": texture_runs, **meta,
            "machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
            "elapsed_s": round(time.time() - t0)}, indent=1))  # fmt: skip
    print(text)


if __name__ == "__main__":
    main()
