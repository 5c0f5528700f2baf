"""Lesion-focused diffusion (LeFusion): the denoiser learns only the lesion.

A batch is a real ROI x0 in [-1, 1] (the plan's ``range`` normalisation, e.g. CT -1000..400 HU, mapped
from [0, 1]), one channel per lesion class (multi-channel decomposition: channel k is the image where
class k is the lesion to learn), a diffusion step t, the noise and the noised ROI
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``. The model predicts the noise from x_t, t and the
lesion-intensity histogram of each class (``bins`` bins over [-1, 1], normalised to sum 1); the loss
(``masked_l1``) counts only the lesion voxels of each channel. Outside the lesion the model is never
asked anything: at sampling time that region is the real image, forward-diffused (RePaint).

Classifier-free guidance (Ho & Salimans 2022; medseg's addition, LeFusion samples with the condition
alone): with the task option ``cond_dropout`` p, each training sample's histogram is replaced by zeros
(the "no condition" input: a real histogram sums to 1) with probability p, so one network learns both
the conditional and the unconditional noise, and ``medseg synthesize --guidance w`` extrapolates from
the second to the first.

Augmentation: flips of the in-plane axes only, with the preset's mirror probability (LeFusion flips
one in-plane axis), so the histogram and the intensities the model learns are the real ones.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from medseg.tasks.base import Batch, Task, register_task

DEFAULT_TIMESTEPS = 300


def cosine_alphas_cumprod(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """abar_t of the cosine schedule (Nichol & Dhariwal 2021; diffusers' ``squaredcos_cap_v2``):
    betas from abar(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), clipped at ``max_beta``."""
    f = lambda t: math.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = torch.tensor([min(1 - f(i + 1) / f(i), max_beta) for i in range(timesteps)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def lesion_histograms(x0: torch.Tensor, masks: torch.Tensor, bins: int = 16) -> torch.Tensor:
    """(B, K, ...) images in [-1, 1] and lesion masks -> (B, K * bins) histograms of the intensities inside
    each mask, each summing to 1 (zeros for an empty mask)."""
    b, k = masks.shape[:2]
    idx = ((x0.clamp(-1, 1) + 1) / 2 * bins).long().clamp(max=bins - 1)
    out = torch.zeros(b, k, bins, device=x0.device)
    out.scatter_add_(2, idx.flatten(2), masks.flatten(2).float())
    return (out / out.sum(2, keepdim=True).clamp_min(1)).flatten(1)


def flip_inplane(tensors: list[torch.Tensor], p: float, g: torch.Generator) -> list[torch.Tensor]:
    """The same random flips of H and W (probability ``p`` each, per sample) on every (B, C, D, H, W) tensor
    (none for validation batches: p 0)."""
    b, device = tensors[0].shape[0], tensors[0].device
    for axis in (3, 4):
        flip = (torch.rand(b, generator=g) < p).to(device).view(b, 1, 1, 1, 1)
        tensors = [torch.where(flip, x.flip(axis), x) for x in tensors]
    return tensors


def decompose(image: torch.Tensor, seg: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, ...) image in [0, 1] and (B, 1, ...) labels -> x0 (B, K, ...) in [-1, 1] (the image per
    class) and the per-class lesion masks (B, K, ...)."""
    x0 = (image * 2 - 1).expand(-1, classes, *image.shape[2:])
    masks = torch.cat([(seg == c) for c in range(1, classes + 1)], dim=1).float()
    return x0.contiguous(), masks


@register_task("lesion_diffusion")
class LesionDiffusionTask(Task):
    name = "lesion_diffusion"
    loss_name = "masked_l1"
    label_output = None
    optimizer = "adam"  # LeFusion: Adam 1e-4, no weight decay (use --schedule constant and --ema-decay 0.995)
    initial_lr = 1e-4
    weight_decay = 0.0
    sliding_window = False
    prompt_command = "medseg synthesize"
    option_names = ("timesteps", "bins", "textures", "cond_dropout")

    def __init__(self, num_classes: int, **options):
        super().__init__(num_classes, **options)
        self.timesteps = int(options.get("timesteps", DEFAULT_TIMESTEPS))
        self.bins = int(options.get("bins", 16))
        self.textures = int(options.get("textures", 3))  # k-means clusters of the training lesions' histograms
        self.cond_dropout = float(options.get("cond_dropout", 0.0))  # P(histogram -> zeros): classifier-free guidance
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"--task-options: cond_dropout must be in [0, 1), got {self.cond_dropout}")
        self.classes = max(num_classes - 1, 1)
        self.alphas_cumprod = cosine_alphas_cumprod(self.timesteps).float()

    def make_batch(self, sample: dict[str, np.ndarray], device, patch_size, augment, g) -> Batch:
        from medseg.augment.transforms import _center_crop

        image = torch.from_numpy(sample["image"][:, :1]).to(device)
        seg = torch.from_numpy(sample["seg"].astype(np.int64)).to(device)
        image, seg = flip_inplane([_center_crop(image, patch_size), _center_crop(seg, patch_size)], augment.p_mirror, g)
        x0, masks = decompose(image, seg, self.classes)
        t, noise, x_t = self.noised(x0, g)
        hist = lesion_histograms(x0, masks, self.bins)
        if self.cond_dropout:
            keep = torch.rand(hist.shape[0], generator=g) >= self.cond_dropout
            hist = hist * keep.to(hist.device, hist.dtype)[:, None]
        cond = {"timesteps": t, "histogram": hist}
        return Batch(x_t, noise, cond, {"loss_mask": masks})

    def noised(self, x0: torch.Tensor, g: torch.Generator):
        """(t, noise, x_t): a uniform step per sample, Gaussian noise and the forward-diffused x0."""
        b, device = x0.shape[0], x0.device
        t = torch.randint(0, self.timesteps, (b,), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        abar = self.alphas_cumprod.to(device)[t].view(b, *[1] * (x0.ndim - 1))
        return t, noise, abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def validation_state(self) -> torch.Tensor:
        return torch.zeros(2, dtype=torch.float64)

    def validation_update(self, state, prediction, batch) -> None:
        mask = batch.extras["loss_mask"]
        state[0] += float(((prediction.float() - batch.target).abs() * mask).sum())
        state[1] += float(mask.sum())

    def validation_summary(self, state) -> dict:
        if state is None:
            return {"lesion_noise_l1": None}
        return {"lesion_noise_l1": round(float(state[0] / state[1].clamp_min(1)), 5)}

    def summary_line(self, summary: dict) -> str:
        v = summary.get("lesion_noise_l1")
        return "lesion noise L1 n/a" if v is None else f"lesion noise L1 {v:.4f}"

    def outputs(self, raw) -> dict:
        return {"noise": raw}

    def after_training(self, trainer) -> None:
        """``MODEL/textures.json``: k-means centres of the training lesions' histograms (the textures
        ``medseg synthesize --texture K`` asks for), from the cached training cases."""
        from medseg.data.cache import load_cached_case
        from medseg.io.jsonio import write_json

        hists = []
        for name in trainer.train_names:
            case = load_cached_case(trainer.cache_dir, name, mmap=True)
            image = torch.from_numpy(np.array(case.data[:1], np.float32))[None]
            seg = torch.from_numpy(np.array(case.seg, np.int64))[None, None]
            x0, masks = decompose(image, seg, self.classes)
            hists.append(lesion_histograms(x0, masks, self.bins)[0].numpy())
        norm = trainer.plan.normalization[0]
        window = (norm.clip_low, norm.clip_high) if norm.scheme == "range" else None
        write_json(
            trainer.output_dir / "textures.json", texture_clusters(np.stack(hists), self.textures, self.bins, window)
        )


def texture_clusters(hists: np.ndarray, k: int, bins: int, window=None, seed: int = 0) -> dict:
    """k-means (k-means++ seeding, seeded) of (N, K*bins) lesion histograms -> the cluster centres, ordered
    by mean intensity, each with its size and (with the HU ``window``) its mean HU."""
    from scipy.cluster.vq import kmeans2

    k = max(1, min(k, len(hists)))
    centres, labels = kmeans2(hists.astype(np.float64), k, seed=seed, minit="++")
    per_class = np.clip(centres, 0, None).reshape(k, -1, bins)
    centres = (per_class / np.maximum(per_class.sum(-1, keepdims=True), 1e-12)).reshape(k, -1)
    mids = (np.arange(bins) + 0.5) / bins  # bin centres in [0, 1]
    mean01 = (centres.reshape(k, -1, bins) * mids).sum(-1).mean(-1)
    order = np.argsort(mean01)
    out = []
    for new_id, c in enumerate(order):
        entry = {"id": new_id, "histogram": [round(float(v), 6) for v in centres[c]], "cases": int((labels == c).sum())}
        if window is not None:
            entry["mean_hu"] = round(float(window[0] + mean01[c] * (window[1] - window[0])), 1)
        out.append(entry)
    return {"bins": bins, "classes": hists.shape[1] // bins, "textures": out}


def enclosing_sphere(masks: torch.Tensor) -> torch.Tensor:
    """(B, 1, D, H, W) binary masks -> (B, 1, D, H, W) spheres in {-1, 1}: centre = the mask's centroid,
    radius = its largest voxel distance from it (DiffMask's condition; in voxels of the array)."""
    out = torch.full_like(masks, -1.0)
    grids = torch.stack(torch.meshgrid(*[torch.arange(n, device=masks.device) for n in masks.shape[2:]], indexing="ij"))
    for b in range(masks.shape[0]):
        pts = torch.nonzero(masks[b, 0] > 0).float()
        if not len(pts):
            continue
        centre = pts.mean(0)
        radius = (pts - centre).norm(dim=1).max()
        dist = (grids.float() - centre.view(3, 1, 1, 1)).norm(dim=0)
        out[b, 0][dist <= radius] = 1.0
    return out


def sphere(shape, centre, radius) -> torch.Tensor:
    """(1, 1, *shape) ball in {-1, 1} around ``centre`` (z, y, x voxels); ``radius``: voxels, one value
    or one per axis (a ball in mm on an anisotropic grid)."""
    grids = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")).float()
    r = torch.as_tensor(radius, dtype=torch.float32).reshape(-1).expand(3).view(3, 1, 1, 1)
    dist = ((grids - torch.tensor(centre, dtype=torch.float32).view(3, 1, 1, 1)) / r).norm(dim=0)
    return torch.where(dist <= 1.0, 1.0, -1.0)[None, None]


@register_task("mask_diffusion")
class MaskDiffusionTask(LesionDiffusionTask):
    """DiffMask: the same denoiser learns lesion *masks* x0 = 2 * mask - 1 (all lesion classes together),
    conditioned on the mask's enclosing sphere (an extra input channel), loss L1 over every voxel."""

    name = "mask_diffusion"
    loss_name = "masked_l1"
    initial_lr = 3e-4  # DiffMask's
    prompt_command = "medseg synthesize-mask"
    option_names = ("timesteps",)

    def make_batch(self, sample, device, patch_size, augment, g) -> Batch:
        from medseg.augment.transforms import _center_crop

        seg = _center_crop(torch.from_numpy(sample["seg"].astype(np.int64)).to(device), patch_size)
        (seg,) = flip_inplane([seg], augment.p_mirror, g)
        masks = (seg > 0).float()
        x0 = masks * 2 - 1
        t, noise, x_t = self.noised(x0, g)
        return Batch(x_t, noise, {"timesteps": t, "extra": enclosing_sphere(masks)}, {"loss_mask": torch.ones_like(x0)})

    def summary_line(self, summary: dict) -> str:
        v = summary.get("lesion_noise_l1")
        return "mask noise L1 n/a" if v is None else f"mask noise L1 {v:.4f}"

    def after_training(self, trainer) -> None:
        pass  # no textures: DiffMask has no histogram condition
