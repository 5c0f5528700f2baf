"""nnU-Net's augmentation set as batched torch ops (2D and 3D).

Each transform samples its random parameters per sample, then applies them to the whole
batch at once; the spatial transform is a single ``grid_sample`` per batch that also crops
the enlarged sampling region down to the patch. Probabilities and ranges follow nnU-Net v2's
defaults (rotation +-30 deg 3D / +-180 deg 2D, scale 0.7-1.4, noise, blur, brightness,
contrast, low resolution, gamma, mirroring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    p_rotation: float = 0.2
    rotation_deg_3d: float = 30.0
    rotation_deg_2d: float = 180.0
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)  # sampled value used as the std, as batchgenerators does
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.25
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    mirror_axes: tuple[int, ...] | None = None  # spatial axes; None = all
    p_mirror: float = 0.5
    rotate_inplane_only: bool = False  # anisotropic data: rotate around the first axis only
    region_margin: float = 1.4  # sampling region / patch, gives rotations real context


NO_AUGMENTATION = AugmentConfig(
    p_rotation=0,
    p_scale=0,
    p_noise=0,
    p_blur=0,
    p_brightness=0,
    p_contrast=0,
    p_lowres=0,
    p_gamma_inverted=0,
    p_gamma=0,
    p_mirror=0,
    region_margin=1.0,
)


def _rand(n, lo, hi, g, device):
    return torch.rand(n, generator=g, device="cpu").to(device) * (hi - lo) + lo


def _rotation(angles: torch.Tensor, dim: int, inplane_only: bool) -> torch.Tensor:
    """Rotation matrices (B, dim, dim) in (z, y, x) voxel axes."""
    b = angles.shape[0]
    if dim == 2:
        c, s = torch.cos(angles[:, 0]), torch.sin(angles[:, 0])
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], 1)
    mats = torch.eye(3).repeat(b, 1, 1)
    planes = [(1, 2)] if inplane_only else [(1, 2), (0, 2), (0, 1)]
    for k, (i, j) in enumerate(planes):
        r = torch.eye(3).repeat(b, 1, 1)
        c, s = torch.cos(angles[:, k]), torch.sin(angles[:, k])
        r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
        mats = mats @ r
    return mats


def affine_theta(angles: torch.Tensor, scale: torch.Tensor, region, patch, inplane_only: bool = False) -> torch.Tensor:
    """``affine_grid`` matrices (B, dim, dim+1) for explicit rotation angles (radians, B x 1 in 2D,
    B x 3 in 3D: planes (y,x), (z,x), (z,y)) and zoom factors (B,), mapping the centred patch
    into the centred region. A scale > 1 samples a larger area (zooms out)."""
    dim = len(region)
    region = torch.tensor([float(r) for r in region])
    patch = torch.tensor([float(p) for p in patch])
    angles, scale = angles.float().cpu(), scale.float().cpu()
    # output voxel offsets (from centre) -> input voxel offsets, in (z, y, x)
    a = _rotation(angles, dim, inplane_only) * scale[:, None, None]
    # normalised coords (align_corners=False): x_in_norm = diag(2/region) A diag(patch/2) x_out_norm
    m = torch.diag(2.0 / region) @ a @ torch.diag(patch / 2.0)
    # affine_grid expects (x, y, z) ordering: reverse both axes of the matrix
    m = m.flip(1).flip(2)
    return torch.cat([m, torch.zeros(angles.shape[0], dim, 1)], dim=2)


def spatial_transform(image, seg, patch_size, cfg: AugmentConfig, g: torch.Generator, record: dict | None = None):
    """Rotate/scale and crop the (B, C, *region) batch to (B, C, *patch) with one grid_sample.

    ``seg`` may be None; ``record`` (a dict) receives ``theta`` (None for the exact centre crop) so
    that points and boxes can follow (:func:`augment_spatial_conditions`)."""
    b, dim = image.shape[0], image.ndim - 2
    n_ang = 1 if dim == 2 else 3
    # 2D and anisotropic 3D data ("dummy 2D" in nnU-Net) rotate freely in-plane
    max_deg = cfg.rotation_deg_2d if dim == 2 or cfg.rotate_inplane_only else cfg.rotation_deg_3d
    do_rot = torch.rand(b, generator=g) < cfg.p_rotation
    angles = (torch.rand(b, n_ang, generator=g) * 2 - 1) * math.radians(max_deg) * do_rot[:, None]
    do_scale = torch.rand(b, generator=g) < cfg.p_scale
    scale = torch.where(
        do_scale,
        torch.rand(b, generator=g) * (cfg.scale_range[1] - cfg.scale_range[0]) + cfg.scale_range[0],
        torch.ones(b),
    )
    theta = affine_theta(angles, scale, image.shape[2:], patch_size, cfg.rotate_inplane_only).to(image.device)
    identity = ~(do_rot | do_scale)
    if bool(identity.all()):  # pure centre crop: exact slicing, no interpolation
        if record is not None:
            record["theta"] = None
        return _center_crop(image, patch_size), None if seg is None else _center_crop(seg, patch_size)
    if record is not None:
        record["theta"] = theta
    grid = F.affine_grid(theta, (b, image.shape[1], *patch_size), align_corners=False)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if seg is None:
        return image, None
    seg = F.grid_sample(seg.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return image, seg.to(torch.int64)


def _center_crop(x, patch_size):
    sl = [slice((r - p) // 2, (r - p) // 2 + p) for r, p in zip(x.shape[2:], patch_size)]
    return x[(slice(None), slice(None), *sl)]


def _per_sample(mask: torch.Tensor, dim: int) -> torch.Tensor:
    return mask.view(-1, *([1] * (dim + 1)))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, *spatial) with one sigma (voxels) per sample."""
    dim = x.ndim - 2
    out = []
    for i in range(x.shape[0]):
        s = float(sigma[i])
        radius = max(1, int(math.ceil(3 * s)))
        t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / s) ** 2)
        k = k / k.sum()
        xi = x[i : i + 1].transpose(0, 1)  # channels as batch: (C, 1, *spatial)
        for axis in range(dim):
            shape = [1, 1] + [1] * dim
            shape[2 + axis] = len(k)
            pad = [0, 0] * dim
            pad[2 * (dim - 1 - axis)] = pad[2 * (dim - 1 - axis) + 1] = radius
            conv = F.conv3d if dim == 3 else F.conv2d
            xi = conv(F.pad(xi, pad, mode="replicate"), k.view(shape))
        out.append(xi.transpose(0, 1))
    return torch.cat(out)


def _gamma(x: torch.Tensor, gamma: torch.Tensor, invert: bool) -> torch.Tensor:
    """nnU-Net's gamma: rescale to [0, 1], power, rescale back, keep mean/std (per channel, as
    nnU-Net: channels can have very different ranges)."""
    dims = tuple(range(2, x.ndim))
    if invert:
        x = -x
    mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    rng = (hi - lo).clamp_min(1e-7)
    y = ((x - lo) / rng).pow(gamma.view(-1, *([1] * (x.ndim - 1)))) * rng + lo
    y = (y - y.mean(dims, keepdim=True)) / y.std(dims, keepdim=True).clamp_min(1e-7) * std + mean
    return -y if invert else y


def intensity_transforms(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    b, dim = x.shape[0], x.ndim - 2
    dev = x.device

    def coin(p):
        return (torch.rand(b, generator=g) < p).to(dev)

    if cfg.p_noise > 0:
        sigma = _rand(b, *cfg.noise_variance, g, dev)
        noise = torch.randn(x.shape, generator=g).to(dev) * sigma.view(-1, *([1] * (dim + 1)))
        x = x + noise * _per_sample(coin(cfg.p_noise), dim)
    if cfg.p_blur > 0:
        do = coin(cfg.p_blur)
        if bool(do.any()):
            sig = _rand(b, *cfg.blur_sigma, g, "cpu")
            blurred = gaussian_blur(x[do], sig[do.cpu()])
            x = x.clone()
            x[do] = blurred
    if cfg.p_brightness > 0:
        f = torch.where(coin(cfg.p_brightness), _rand(b, *cfg.brightness_range, g, dev), torch.ones(b, device=dev))
        x = x * _per_sample(f, dim)
    if cfg.p_contrast > 0:
        f = torch.where(coin(cfg.p_contrast), _rand(b, *cfg.contrast_range, g, dev), torch.ones(b, device=dev))
        dims = tuple(range(2, x.ndim))  # per channel, like nnU-Net
        mean = x.mean(dims, keepdim=True)
        lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
        x = ((x - mean) * _per_sample(f, dim) + mean).clamp(lo, hi)
    if cfg.p_lowres > 0:
        do = coin(cfg.p_lowres)
        if bool(do.any()):
            x = x.clone()
            zoom = _rand(b, *cfg.lowres_zoom, g, "cpu")
            for i in torch.nonzero(do).flatten().tolist():
                size = [max(1, int(round(s * float(zoom[i])))) for s in x.shape[2:]]
                small = F.interpolate(x[i : i + 1], size=size, mode="nearest")
                mode = "trilinear" if dim == 3 else "bilinear"
                x[i : i + 1] = F.interpolate(small, size=x.shape[2:], mode=mode, align_corners=False)
    for invert, p in ((True, cfg.p_gamma_inverted), (False, cfg.p_gamma)):
        if p > 0:
            do = coin(p)
            if bool(do.any()):
                gam = _rand(b, *cfg.gamma_range, g, dev)
                x = x.clone()
                x[do] = _gamma(x[do], gam[do], invert)
    return x


def mirror(image, seg, cfg: AugmentConfig, g: torch.Generator, record: dict | None = None):
    """Flip each sample along each mirror axis with probability ``p_mirror``; ``record["flips"]``
    receives the (axis, per-sample flag) pairs."""
    b, dim = image.shape[0], image.ndim - 2
    axes = cfg.mirror_axes if cfg.mirror_axes is not None else tuple(range(dim))
    flips = []
    for axis in axes:
        do = (torch.rand(b, generator=g) < cfg.p_mirror).to(image.device)
        if bool(do.any()):
            image = torch.where(_per_sample(do, dim), image.flip(2 + axis), image)
            if seg is not None:
                seg = torch.where(_per_sample(do, dim), seg.flip(2 + axis), seg)
            flips.append((axis, do))
    if record is not None:
        record["flips"] = flips
    return image, seg


def augment_batch(
    image: torch.Tensor, seg: torch.Tensor | None, patch_size, cfg: AugmentConfig, g: torch.Generator,
    cond: dict | None = None,
):  # fmt: skip
    """(B, C, *region) image and (B, 1, *region) seg -> augmented (B, C, *patch) pair.

    With ``cond`` (named conditioning tensors) the result is (image, seg, cond), where ``points``
    (B, N, dim) and ``boxes`` (B, N, 2*dim) in region voxel coordinates have been moved by the same
    rotation, scaling, crop and mirrors as the image, and so have dense maps (derived inputs, (B, C,
    *region / cell) at their own resolution); other conditions pass through."""
    record: dict = {}
    region = tuple(image.shape[2:])
    image, seg = spatial_transform(image, seg, patch_size, cfg, g, record)
    image = intensity_transforms(image, cfg, g)
    image, seg = mirror(image, seg, cfg, g, record)
    image, seg = image.contiguous(), None if seg is None else seg.contiguous()
    if cond is None:
        return image, seg
    cond = augment_spatial_conditions(cond, record, region, tuple(patch_size))
    return image, seg, augment_dense_conditions(cond, record, region, tuple(patch_size))


# ------------------------------------------------------------------ spatial conditioning
# Points and boxes (prompts, lesion centres) move with the image: the same affine that
# grid_sample applies, then the same mirrors. Coordinates are voxel indices in (z, y, x) order
# (2 or 3 of them); a box is (min corner, max corner) = 2 x dims numbers.


def transform_points(points: torch.Tensor, theta: torch.Tensor | None, region, patch) -> torch.Tensor:
    """Map (B, N, dim) voxel coordinates of the sampled region to the output patch.

    ``theta`` are the ``affine_grid`` matrices (output -> input, normalised, x/y/z order); None
    means the exact centre crop."""
    region_t = torch.tensor([float(r) for r in region], dtype=points.dtype, device=points.device)
    patch_t = torch.tensor([float(p) for p in patch], dtype=points.dtype, device=points.device)
    if theta is None:
        return points - (region_t - patch_t) / 2
    m = theta[:, :, :-1].to(points).flip(1).flip(2)  # back to (z, y, x) order
    u_in = (2 * points + 1) / region_t - 1
    u_out = torch.linalg.solve(m, u_in.transpose(1, 2)).transpose(1, 2)
    return ((u_out + 1) * patch_t - 1) / 2


def boxes_to_corners(boxes: torch.Tensor) -> torch.Tensor:
    """(B, N, 2*dim) boxes -> (B, N * 2^dim, dim) corner points."""
    b, n, two_d = boxes.shape
    dim = two_d // 2
    lo, hi = boxes[..., :dim], boxes[..., dim:]
    corners = [torch.where(torch.tensor(bits, device=boxes.device).bool(), hi, lo) for bits in _bit_patterns(dim)]
    return torch.stack(corners, 2).reshape(b, n * 2**dim, dim)


def corners_to_boxes(corners: torch.Tensor, dim: int) -> torch.Tensor:
    b = corners.shape[0]
    c = corners.reshape(b, -1, 2**dim, dim)
    return torch.cat([c.amin(2), c.amax(2)], -1)


def _bit_patterns(dim: int) -> list[list[int]]:
    return [[(k >> (dim - 1 - a)) & 1 for a in range(dim)] for k in range(2**dim)]


def mirror_points(points: torch.Tensor, flips: list[tuple[int, torch.Tensor]], patch) -> torch.Tensor:
    """Apply the mirrors of :func:`mirror` (axis, per-sample flag) to (B, N, dim) coordinates."""
    for axis, do in flips:
        flipped = points.clone()
        flipped[..., axis] = patch[axis] - 1 - points[..., axis]
        points = torch.where(do.view(-1, 1, 1).to(points.device), flipped, points)
    return points


def augment_spatial_conditions(cond: dict, record: dict, region, patch) -> dict:
    """Move the ``points`` and ``boxes`` entries of ``cond`` with the image (others unchanged)."""
    out = dict(cond)
    dim = len(patch)
    for key in ("points", "boxes"):
        if key not in cond:
            continue
        x = cond[key].float()
        pts = boxes_to_corners(x) if key == "boxes" else x
        pts = transform_points(pts, record.get("theta"), region, patch)
        pts = mirror_points(pts, record.get("flips", []), patch)
        out[key] = corners_to_boxes(pts, dim) if key == "boxes" else pts
    return out


def augment_dense_conditions(cond: dict, record: dict, region, patch) -> dict:
    """Resample the dense maps of ``cond`` (:mod:`medseg.data.derived`; (B, C, *cells) covering the
    region, one cell per ``region / cells`` voxels) with the image's affine and mirrors, to the patch's
    cells. The normalised grid of ``affine_grid`` is resolution-free, so the same matrices apply."""
    from medseg.data.derived import DERIVED_INPUTS

    out = dict(cond)
    for key, value in cond.items():
        if key not in DERIVED_INPUTS:
            continue
        cells = [int(c) for c in value.shape[2:]]
        cell = [r // c for r, c in zip(region, cells)]
        if any(r % c for r, c in zip(region, cells)) or any(p % c for p, c in zip(patch, cell)):
            raise ValueError(
                f"dense map '{key}': {cells} cells do not tile region {list(region)} / patch {list(patch)}"
            )
        theta = record.get("theta")
        if theta is None:  # the centre crop, as an affine (it may fall between cells)
            b = value.shape[0]
            theta = affine_theta(torch.zeros(b, 1 if len(patch) == 2 else 3), torch.ones(b), region, patch)
        size = (value.shape[0], value.shape[1], *[p // c for p, c in zip(patch, cell)])
        grid = F.affine_grid(theta.to(value.device, torch.float32), size, align_corners=False)
        x = F.grid_sample(value.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        for axis, do in record.get("flips", []):
            x = torch.where(_per_sample(do, len(patch)), x.flip(2 + axis), x)
        out[key] = x.contiguous()
    return out
