"""Lesion synthesis with a trained LeFusion denoiser (``medseg synthesize``).

RePaint (Lugmayr et al. 2022) over a respaced cosine schedule, with diffusers' ``RePaintScheduler``
(``medseg[synthesis]``): at every step the region outside the lesion mask is the real ROI forward-diffused
to that step, the lesion region is the model's denoising, and every ``jump_length`` steps the chain jumps
back ``jump_n_sample - 1`` times to harmonise the two. The result is pasted into the input: every
voxel outside the mask is the input's own value (bit for bit), the lesion is written in HU (the plan's
``range`` normalisation inverted) in the input's geometry and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medseg.errors import CheckpointError, DatasetError, MedsegError

INSTALL_HINT = "pip install 'medseg[synthesis]' (diffusers)"
DEFAULT_GUIDANCE = 2.0  # classifier-free guidance weight for models trained with cond_dropout (docs/synthesis.md)


def repaint_scheduler(timesteps: int, steps: int, jump_length: int, jump_n_sample: int):
    try:
        from diffusers import RePaintScheduler
    except ImportError:
        raise MedsegError(None, f"lesion synthesis needs the diffusers schedulers: {INSTALL_HINT}") from None
    sched = RePaintScheduler(
        num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2", eta=1.0, clip_sample=True
    )
    sched.set_timesteps(steps, jump_length=jump_length, jump_n_sample=jump_n_sample)
    return sched


@torch.inference_mode()
def repaint(net, known: torch.Tensor, lesion: torch.Tensor, histogram: torch.Tensor, *, timesteps: int = 300,
            steps: int = 20, jump_length: int = 5, jump_n_sample: int = 2, seed: int = 0, dtype=None,
            guidance: float = 1.0) -> torch.Tensor:  # fmt: skip
    """(1, K, D, H, W) real ROI in [-1, 1], (1, K, ...) lesion masks (1 = generate) and (1, K*bins)
    histograms -> the sampled ROI (1, K, ...) in [-1, 1] (outside the masks: the real ROI at t = 0).
    ``guidance`` w != 1: classifier-free guidance, eps = eps(none) + w (eps(histogram) - eps(none)), both
    predictions in one batch of two (a model trained with ``cond_dropout``)."""
    from medseg.utils import autocast_context

    sched = repaint_scheduler(timesteps, steps, jump_length, jump_n_sample)
    g = torch.Generator(device=known.device).manual_seed(seed)
    keep = 1.0 - lesion
    x = torch.randn(known.shape, generator=g, device=known.device)
    t_last = int(sched.timesteps[0]) + 1
    for t in sched.timesteps.tolist():
        if t < t_last:
            with autocast_context(known.device, dtype):
                eps = guided_noise(net, x, t, histogram, guidance)
            x = sched.step(eps, t, x, known, keep, generator=g).prev_sample
        else:
            x = sched.undo_step(x, t_last, generator=g)
        t_last = t
    return keep * known + lesion * x.clamp(-1, 1)


def guided_noise(net, x: torch.Tensor, t: int, histogram: torch.Tensor, guidance: float) -> torch.Tensor:
    """The predicted noise at step ``t``: conditional (``guidance`` 1), or classifier-free guided."""
    step = torch.tensor([t], device=x.device)
    if guidance == 1.0:
        return net(x, timesteps=step, histogram=histogram).float()
    both = net(torch.cat([x, x]), timesteps=step, histogram=torch.cat([histogram, torch.zeros_like(histogram)]))
    cond, uncond = both.float().chunk(2)
    return uncond + guidance * (cond - uncond)


@dataclass
class Synthesizer:
    net: torch.nn.Module
    spec: object  # ModelSpec
    device: torch.device
    dtype: object = None

    @classmethod
    def from_folder(
        cls, folder: str | Path, *, device: str = "cpu", amp: bool | None = None, task: str = "lesion_diffusion"
    ) -> Synthesizer:
        from medseg.io.checkpoint import available_folds, load_spec, load_weights, resolve_model
        from medseg.utils import autocast_dtype, resolve_device

        folder = Path(resolve_model(str(folder)))
        spec = load_spec(folder)
        if spec.task != task:
            what = {"lesion_diffusion": "lesion-diffusion (LeFusion)", "mask_diffusion": "mask-diffusion (DiffMask)"}[
                task
            ]
            raise CheckpointError(folder, f"is a {spec.task} model, not a {what} model")
        folds = available_folds(folder)
        if not folds:
            raise CheckpointError(folder, "holds no fold_*/model.safetensors")
        net = spec.build()
        net.load_state_dict(load_weights(folder / f"fold_{folds[0]}"))
        dev = resolve_device(device)
        return cls(net.to(dev).eval(), spec, dev, autocast_dtype(dev, amp))

    def task_option(self, name: str, default):
        """The model's training task option ``name`` (``--task-options``), else ``default``."""
        return (self.spec.training or {}).get("task_options", {}).get(name, default)

    @property
    def timesteps(self) -> int:
        return int(self.task_option("timesteps", 300))

    def synthesize_mask(self, like: np.ndarray, meta, centre, radius_mm: float, *, steps: int = 50, seed: int = 0):
        """A new lesion mask on the grid of the image ``like`` (z, y, x), around voxel ``centre`` (z, y, x
        of ``like``) in a ball of ``radius_mm``: DiffMask sampling in the plan's space, post-processed."""
        from medseg.inference.conditions import points_to_preprocessed
        from medseg.inference.export import map_to_native
        from medseg.preprocessing.pipeline import preprocess_array
        from medseg.tasks.lesion_diffusion import sphere

        conf = self.spec.plan.configuration(self.spec.configuration)
        data, _, props = preprocess_array(like[None].astype(np.float32), meta, self.spec.plan, conf)
        c = points_to_preprocessed(np.asarray([centre], np.float64), props)[0]
        ball = sphere(data.shape[1:], c, [radius_mm / sp for sp in conf.spacing]).to(self.device)
        shifted, _, crop = _pad_in_plane(ball + 1, ball, self.net.in_plane_stride)  # padding is outside the ball
        ball = shifted - 1
        x = sample_mask(self.net, ball, timesteps=self.timesteps, steps=steps, seed=seed,
                        dtype=self.dtype)  # fmt: skip
        prob = ((x[(0, slice(None), *crop)] + 1) / 2).float().cpu()
        return clean_mask(map_to_native(prob, props)[0])

    @property
    def cond_dropout(self) -> float:
        return float(self.task_option("cond_dropout", 0.0))

    @property
    def default_guidance(self) -> float:
        """DEFAULT_GUIDANCE for a model trained with condition dropout, else 1 (the condition alone)."""
        return DEFAULT_GUIDANCE if self.cond_dropout > 0 else 1.0

    def check_guidance(self, guidance: float | None) -> float:
        if guidance is None:
            return self.default_guidance
        if guidance < 0:
            raise MedsegError(None, f"--guidance {guidance}: the guidance weight is >= 0 (1: no guidance)")
        if guidance != 1.0 and self.cond_dropout == 0:
            raise MedsegError(
                None,
                f"--guidance {guidance}: the model was trained without cond_dropout, so it has no "
                "unconditional prediction to guide from (use 1, or train with --task-options '{\"cond_dropout\": 0.1}')",
            )
        return float(guidance)

    @property
    def classes(self) -> int:
        return max(self.spec.num_classes - 1, 1)

    def _window(self) -> tuple[float, float]:
        norm = self.spec.plan.normalization[0]
        if norm.scheme != "range":
            raise CheckpointError(
                None, f"the model's plan normalises with '{norm.scheme}', synthesis needs 'range' (HU window)"
            )
        return float(norm.clip_low), float(norm.clip_high)

    def synthesize(self, image: np.ndarray, meta, mask: np.ndarray, histogram: np.ndarray | None = None, *,
                   steps: int = 20, jump_length: int = 5, jump_n_sample: int = 2, seed: int = 0,
                   guidance: float | None = None) -> np.ndarray:  # fmt: skip
        """(z, y, x) image in HU and its lesion label map (0 = keep, k = lesion class k) -> the image with
        new lesions: outside the mask identical to ``image``, inside in HU, same dtype. ``histogram``:
        (K, bins) or (K * bins,) target lesion histograms (None: the input's own lesion histograms).
        ``guidance``: classifier-free guidance weight (None: :attr:`default_guidance`)."""
        from medseg.inference.export import map_to_native
        from medseg.preprocessing.pipeline import preprocess_array
        from medseg.tasks.lesion_diffusion import decompose, lesion_histograms

        conf = self.spec.plan.configuration(self.spec.configuration)
        data, seg, props = preprocess_array(
            image[None].astype(np.float32), meta, self.spec.plan, conf, mask.astype(np.int16)
        )
        x = torch.from_numpy(data[None, :1]).to(self.device)
        s = torch.from_numpy(seg.astype(np.int64)[None, None]).to(self.device)
        x, s, crop = _pad_in_plane(x, s, self.net.in_plane_stride)
        known, lesion = decompose(x, s, self.classes)
        bins = self.net.cond_dim // self.classes
        if histogram is None:
            h = lesion_histograms(known, lesion, bins)
        else:
            h = torch.as_tensor(np.asarray(histogram, np.float32).reshape(1, -1), device=self.device)
            if h.shape[1] != self.net.cond_dim:
                raise MedsegError(None, f"histogram has {h.shape[1]} values; the model takes {self.classes} x {bins}")
        out = repaint(self.net, known, lesion, h, timesteps=self.timesteps, steps=steps, jump_length=jump_length,
                      jump_n_sample=jump_n_sample, seed=seed, dtype=self.dtype,
                      guidance=self.check_guidance(guidance))  # fmt: skip
        real = x * 2 - 1
        merged = real * (1 - lesion.amax(1, keepdim=True)) + (out * lesion).sum(1, keepdim=True)
        merged = merged[(slice(None), slice(None), *crop)][
            0
        ]  # (1, D, H, W) in [-1, 1]: class k's channel in its lesion
        lo, hi = self._window()
        hu = map_to_native(torch.from_numpy(((merged.float().cpu().numpy() + 1) / 2) * (hi - lo) + lo), props)[0]
        return paste(image, mask > 0, hu)


def _pad_in_plane(x: torch.Tensor, s: torch.Tensor, stride: int):
    """Zero-pad H and W (after the crop: -1 = the window's low end) to multiples of ``stride``."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    ph, pw = -h % stride, -w % stride
    crop = (slice(None), slice(ph // 2, ph // 2 + h), slice(pw // 2, pw // 2 + w))
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return F.pad(x, pads), F.pad(s, pads), crop


def paste(image: np.ndarray, inside: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``image`` with ``values`` (float HU) inside the mask, rounded and clipped to the image's dtype."""
    out = image.copy()
    v = values[inside]
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        v = np.clip(np.rint(v), info.min, info.max)
    out[inside] = v.astype(image.dtype)
    return out


def read_textures(model: Path) -> dict:
    path = Path(model) / "textures.json"
    if not path.is_file():
        raise CheckpointError(path, "no texture clusters (written at the end of `medseg train` for lesion_diffusion)")
    import json

    return json.loads(path.read_text())


def texture_histogram(textures: dict, texture: int, seed: int, jitter: float = 0.1) -> np.ndarray:
    """Cluster ``texture``'s centre with LeFusion's perturbation: each bin moved by up to ``jitter`` of
    its own value (zero-mean noise scaled to the largest), then each class's histogram renormalised."""
    ids = [t["id"] for t in textures["textures"]]
    if texture not in ids:
        raise MedsegError(None, f"--texture {texture}: the model has textures {', '.join(map(str, ids))}")
    h = np.asarray(textures["textures"][ids.index(texture)]["histogram"], np.float64)
    noise = np.random.default_rng(seed).standard_normal(h.shape)
    noise -= noise.mean()
    h = h + jitter * np.abs(h) * noise / max(np.abs(noise).max(), 1e-12)
    per_class = np.clip(h, 0, None).reshape(int(textures["classes"]), -1)
    return (per_class / np.maximum(per_class.sum(-1, keepdims=True), 1e-12)).reshape(-1).astype(np.float32)


def texture_lines(textures: dict) -> list[str]:
    """One line per texture, id first: mean HU, the HU range of its peak bin, how many training lesions."""
    bins, lines = int(textures["bins"]), []
    for t in textures["textures"]:
        h = np.asarray(t["histogram"]).reshape(-1, bins).mean(0)
        peak = int(h.argmax())
        hu = f"mean {t['mean_hu']:.0f} HU, " if "mean_hu" in t else ""
        lines.append(f"{t['id']}  {hu}peak bin {peak}/{bins}, {t['cases']} training lesion(s)")
    return lines


# ---------------------------------------------------------------------------------- DiffMask
# size-adaptive smoothing of a sampled mask (DiffMask's post-processing): (max voxels, sigma, threshold)
SMOOTHING = ((20, 0.5, 0.01), (50, 0.5, 0.1), (100, 0.5, 0.2), (1000, 1.0, 0.3), (10000, 1.5, 0.5), (None, 2.0, 0.5))


@torch.inference_mode()
def sample_mask(net, ball: torch.Tensor, *, timesteps: int = 300, steps: int = 50, seed: int = 0, dtype=None):
    """Ancestral DDPM sampling (diffusers ``DDPMScheduler``, cosine schedule respaced to ``steps``) of a
    lesion mask conditioned on ``ball`` (1, 1, D, H, W) in {-1, 1} -> (1, 1, ...) values in [-1, 1]."""
    from medseg.utils import autocast_context

    try:
        from diffusers import DDPMScheduler
    except ImportError:
        raise MedsegError(None, f"mask synthesis needs the diffusers schedulers: {INSTALL_HINT}") from None
    sched = DDPMScheduler(num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    sched.set_timesteps(steps)
    g = torch.Generator(device=ball.device).manual_seed(seed)
    x = torch.randn(ball.shape, generator=g, device=ball.device)
    for t in sched.timesteps.tolist():
        with autocast_context(ball.device, dtype):
            eps = net(x, timesteps=torch.tensor([t], device=ball.device), extra=ball).float()
        x = sched.step(eps, t, x, generator=g).prev_sample
    return x.clamp(-1, 1)


def clean_mask(prob: np.ndarray) -> np.ndarray:
    """DiffMask's post-processing of a sampled mask (probabilities in [0, 1]): threshold 0.5, fill holes,
    Gaussian smoothing with a size-dependent sigma and threshold, the largest connected component."""
    import cc3d
    from scipy import ndimage

    mask = ndimage.binary_fill_holes(prob > 0.5)
    n = int(mask.sum())
    if n == 0:
        return mask.astype(np.uint8)
    sigma, thr = next((s, t) for limit, s, t in SMOOTHING if limit is None or n < limit)
    mask = ndimage.gaussian_filter(mask.astype(np.float32), sigma) > thr
    labels = cc3d.connected_components(mask.astype(np.uint8), connectivity=26)
    if labels.max() > 1:
        sizes = np.bincount(labels.ravel())[1:]
        mask = labels == (int(sizes.argmax()) + 1)
    return mask.astype(np.uint8)


def read_histogram(path: Path) -> np.ndarray:
    """A target histogram from a JSON list (``--histogram``, or a batch table's ``histogram`` column)."""
    import json

    try:
        return np.asarray(json.loads(Path(path).read_text()), np.float32)
    except (OSError, ValueError, TypeError) as exc:
        raise DatasetError(path, f"cannot read a JSON list of histogram values ({exc})") from None


def synthesize_file(syn: Synthesizer, image_path: Path, mask_path: Path, out: Path, mask_out: Path,
                    histogram: np.ndarray | None = None, **sampling) -> float:  # fmt: skip
    """One image + lesion mask -> ``out`` (the image with new lesions) and ``mask_out`` (the mask, written
    last: it marks the job complete); both atomic. Returns the sampling seconds."""
    import time

    from medseg.io.image import read_image, write_image

    image, meta = read_image(image_path)
    mask, mask_meta = read_image(mask_path)
    if mask.shape != image.shape:
        raise DatasetError(mask_path, f"shape {mask.shape} is not the image's {image.shape} ({image_path})")
    if not (mask > 0).any():
        raise DatasetError(mask_path, "the mask is empty: nothing to synthesise")
    t0 = time.perf_counter()
    new = syn.synthesize(image, meta, mask, histogram, **sampling)
    seconds = time.perf_counter() - t0
    write_image(new, meta, out)
    write_image(mask, mask_meta, mask_out)
    return seconds


def mask_name(output: Path) -> Path:
    """Where the mask of the synthetic image ``output`` goes: ``NAME_mask`` + the same ending."""
    ending = ".nii.gz" if output.name.endswith(".nii.gz") else output.suffix
    return output.with_name(output.name[: len(output.name) - len(ending)] + "_mask" + ending)


def synthesize_dataset(syn: Synthesizer, model: Path, dataset: Path, out: Path, *, samples: int = 1,
                       texture: int | None = None, all_textures: bool = False, seed: int = 0, log=print,
                       **sampling) -> list[dict]:  # fmt: skip
    """Every labelled case of ``dataset`` (nnU-Net layout) ``samples`` times with new lesions into ``out``,
    an nnU-Net dataset of its own (``CASE_synK``: the image with synthetic lesions and the unchanged mask),
    model loaded once; cases already written are skipped (the label file is written last). Texture:
    ``texture``, each texture in turn (``all_textures``) or each lesion's own histogram."""
    import json

    from medseg.io.dataset import list_cases
    from medseg.io.jsonio import write_json
    from medseg.utils import track

    cases = [c for c in list_cases(dataset) if c.label is not None]
    tex = read_textures(model) if (texture is not None or all_textures) else None
    n_tex = len(tex["textures"]) if tex else 0
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(exist_ok=True)
    meta_json = json.loads((Path(dataset) / "dataset.json").read_text())
    meta_json.update(name=f"{meta_json.get('name', 'dataset')}_synthetic", numTraining=len(cases) * samples)
    write_json(out / "dataset.json", meta_json)
    rows = []
    for i, case in enumerate(track(cases, total=len(cases), description="synthesize")):
        for k in range(samples):
            name, s = f"{case.name}_syn{k}", seed + 1000 * i + k
            tid = (k % n_tex) if all_textures else texture
            row = {"case": name, "source": case.name, "texture": tid, "seed": s}
            label_out = out / "labelsTr" / f"{name}.nii.gz"
            if not label_out.is_file():
                h = texture_histogram(tex, tid, s) if tid is not None else None
                row["seconds"] = round(synthesize_file(syn, case.images[0], case.label, out / "imagesTr" /
                                                       f"{name}_0000.nii.gz", label_out, h, seed=s, **sampling), 2)  # fmt: skip
            rows.append(row)
    write_json(out / "synthesis.json", {"model": str(model), "source": str(dataset), "cases": rows})
    log(f"{len(rows)} synthetic case(s) in {out}")
    return rows


# -------------------------------------------------------------------------- batch table (CSV)
TABLE_COLUMNS = ("image", "mask", "texture", "histogram", "seed", "output")


def read_jobs(table: Path, out: Path, textures: dict | None, seed: int) -> list[dict]:
    """The rows of a batch table (CSV with a header: ``image,mask`` and optionally ``texture``,
    ``histogram``, ``seed``, ``output``; paths relative to the table's folder) as checked jobs. Every
    row is checked before anything is sampled: a bad row is a one-line error naming the table and row."""
    import csv

    try:
        with open(table, newline="") as fh:
            reader = csv.DictReader(fh)
            header, rows = [c.strip() for c in reader.fieldnames or []], list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(table, f"cannot read the batch table ({exc})") from None
    unknown = sorted(set(header) - set(TABLE_COLUMNS))
    if unknown:
        raise DatasetError(table, f"unknown column(s) {', '.join(unknown)}; known: {', '.join(TABLE_COLUMNS)}")
    if not rows or not {"image", "mask"} <= set(header):
        raise DatasetError(table, "needs a header with at least the columns image,mask and one row")
    jobs, outputs = [], set()
    for n, raw in enumerate(rows, start=2):  # line 1 is the header
        jobs.append(_job(table, n, {k.strip(): (v or "").strip() for k, v in raw.items()}, out, textures, seed))
        if jobs[-1]["output"] in outputs:
            raise DatasetError(table, f"line {n}: output {jobs[-1]['output'].name} is also another row's output")
        outputs.add(jobs[-1]["output"])
    return jobs


def _job(table: Path, line: int, row: dict, out: Path, textures: dict | None, seed: int) -> dict:
    where, base = f"line {line}", table.parent
    paths = {}
    for col in ("image", "mask", "histogram"):
        if row.get(col):
            paths[col] = (base / row[col]) if not Path(row[col]).is_absolute() else Path(row[col])
            if not paths[col].is_file():
                raise DatasetError(table, f"{where}: {col} {paths[col]} does not exist")
        elif col != "histogram":
            raise DatasetError(table, f"{where}: no {col}")
    try:
        texture = int(row["texture"]) if row.get("texture") else None
        job_seed = int(row["seed"]) if row.get("seed") else seed + line - 2
    except ValueError as exc:
        raise DatasetError(table, f"{where}: texture and seed are integers ({exc})") from None
    if texture is not None and "histogram" in paths:
        raise DatasetError(table, f"{where}: give a texture or a histogram, not both")
    ids = [t["id"] for t in (textures or {}).get("textures", [])]
    if texture is not None and texture not in ids:
        known = ", ".join(map(str, ids)) or "none (no textures.json)"
        raise DatasetError(table, f"{where}: texture {texture} is not one of the model's textures: {known}")
    name = row.get("output") or paths["image"].name.replace(".nii.gz", "").rsplit(".", 1)[0] + f"_syn{line - 2}.nii.gz"
    if Path(name).name != name:
        raise DatasetError(table, f"{where}: output {name} must be a file name (outputs go to -o)")
    return {"line": line, "image": paths["image"], "mask": paths["mask"], "histogram": paths.get("histogram"),
            "texture": texture, "seed": job_seed, "output": out / name}  # fmt: skip


def synthesize_table(syn: Synthesizer, model: Path, table: Path, out: Path, *, seed: int = 0, log=print,
                     **sampling) -> list[dict]:  # fmt: skip
    """Every row of the batch table ``table`` (:func:`read_jobs`) into the folder ``out``; resumable
    (a job whose mask is written is skipped); ``out/synthesis.json`` records each job."""
    from medseg.io.jsonio import write_json
    from medseg.utils import track

    textures = read_textures(model) if (Path(model) / "textures.json").is_file() else None
    jobs = read_jobs(table, out, textures, seed)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for job in track(jobs, total=len(jobs), description="synthesize"):
        rec = {"line": job["line"], "image": str(job["image"]), "mask": str(job["mask"]), "seed": job["seed"],
               "texture": job["texture"], "output": job["output"].name}  # fmt: skip
        if not mask_name(job["output"]).is_file():
            if job["texture"] is not None:
                h = texture_histogram(textures, job["texture"], job["seed"])
            else:
                h = read_histogram(job["histogram"]) if job["histogram"] else None
            rec["seconds"] = round(synthesize_file(syn, job["image"], job["mask"], job["output"],
                                                   mask_name(job["output"]), h, seed=job["seed"], **sampling), 2)  # fmt: skip
        records.append(rec)
    write_json(out / "synthesis.json", {"model": str(model), "table": str(table), "jobs": records})
    log(f"{len(records)} synthetic image(s) in {out}")
    return records
