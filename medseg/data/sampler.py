"""Patch sampling with foreground oversampling (nnU-Net: a third of each batch is forced to
contain foreground), extracting a larger region so rotations and zooms have real context."""

from __future__ import annotations

import numpy as np

from medseg.data.cache import CachedCase
from medseg.data.derived import dense_region


def region_size(patch_size, margin: float, multiple=None) -> tuple[int, ...]:
    """Patch enlarged by ``margin`` with the same parity as the patch (exact centre crops); with
    ``multiple`` (per axis) also rounded up to a multiple of it (a dense map's cells tile the region)."""
    out = []
    for i, p in enumerate(patch_size):
        r, m = int(np.ceil(p * margin)), int(multiple[i]) if multiple is not None else 1
        while r % m or (r - p) % 2:  # the smallest such size with the patch's parity
            r += 1
        out.append(r)
    return tuple(out)


def extract(arr: np.ndarray, center, size, fill=0) -> np.ndarray:
    """Crop ``size`` around ``center`` over the last len(size) axes, zero-padding outside."""
    nd = len(size)
    spatial = arr.shape[-nd:]
    lead = arr.shape[:-nd]
    starts = [int(c) - s // 2 for c, s in zip(center, size)]
    out = np.full(lead + tuple(size), fill, dtype=arr.dtype)
    src, dst = [], []
    for st, s, dim in zip(starts, size, spatial):
        a, b = max(st, 0), min(st + s, dim)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - st, b - st))
    out[(Ellipsis,) + tuple(dst)] = arr[(Ellipsis,) + tuple(src)]
    return out


class PatchSampler:
    """Draws (image, seg) regions of ``region`` voxels from cached cases.

    For a 2D configuration (``patch_size`` of length 2 on 3D data) a random slice along the
    first axis is taken and the returned arrays are 2D. Cases with dense maps (``CachedCase.maps``)
    get each map's region in ``cond`` at the map's own resolution; the region is then a multiple of
    the maps' cell size, so its cells tile it exactly.
    """

    def __init__(
        self,
        cases: list[CachedCase],
        patch_size,
        batch_size: int,
        *,
        margin: float = 1.0,
        oversample_foreground: float = 0.33,
        seed: int = 0,
        weights=None,
    ):
        """``weights``: per-case sampling probabilities (joint training); None: uniform."""
        self.cases = cases
        self.patch_size = tuple(patch_size)
        self.batch_size = batch_size
        self.region = region_size(self.patch_size, margin, map_cell_size(cases, len(self.patch_size)))
        self.oversample = oversample_foreground
        self.rng = np.random.default_rng(seed)
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)

    def _center(self, case: CachedCase, force_fg: bool) -> np.ndarray:
        shape = np.array(case.seg.shape)
        classes = [c for c, locs in case.fg.items() if len(locs)]
        if force_fg and classes:
            c = classes[self.rng.integers(len(classes))]
            locs = case.fg[c]
            return locs[self.rng.integers(len(locs))]
        # uniform: any centre such that the patch overlaps the image
        nd = len(self.patch_size)
        lo = np.zeros(len(shape), int)
        hi = shape.copy()
        if nd == len(shape):
            half = np.array(self.patch_size) // 2
            lo = np.minimum(half, shape // 2)
            hi = np.maximum(shape - half, lo + 1)
        return np.array([self.rng.integers(a, b) for a, b in zip(lo, hi)])

    def sample(self) -> dict:
        """{"image": (B, C, *region) float32, "seg": (B, 1, *region), "cond": {name: (B, ...)}};
        "cond" only when the cases carry conditions (spatial ones shifted into region coordinates)."""
        images, segs, conds = [], [], []
        n_fg = int(round(self.batch_size * self.oversample))
        for i in range(self.batch_size):
            pick = (
                self.rng.integers(len(self.cases))
                if self.weights is None
                else self.rng.choice(len(self.cases), p=self.weights)
            )
            case = self.cases[pick]
            # the last n_fg samples are forced to contain foreground, as in nnU-Net; a batch too
            # small to hold one (e.g. 1 per DDP rank) forces each sample with probability p instead
            force = i >= self.batch_size - n_fg if n_fg else self.rng.random() < self.oversample
            center = self._center(case, force_fg=force)
            data, seg = case.data, case.seg
            sliced = len(self.patch_size) == 2 and seg.ndim == 3
            if sliced:
                z = int(center[0])
                data, seg, center = data[:, z], seg[z], center[1:]
            images.append(extract(data, center, self.region))
            segs.append(extract(seg, center, self.region))
            if case.conditions or case.maps:
                cond = region_conditions(case, center, self.region, sliced)
                cond.update(region_maps(case, center, self.region, z if sliced else None))
                conds.append(cond)
        out = {"image": np.stack(images).astype(np.float32, copy=False), "seg": np.stack(segs)[:, None]}
        if conds:
            out["cond"] = stack_conditions(conds, [c.name for c in self.cases])
        return out

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


SPATIAL = ("points", "boxes")


def region_conditions(case: CachedCase, center, region, sliced: bool) -> dict[str, np.ndarray]:
    """A case's conditions for the region of ``region`` voxels around ``center``: points and boxes
    move into region coordinates (a 2D slice of a single-slice image drops their z)."""
    start = np.asarray(center, dtype=np.float32) - np.asarray(region) // 2
    out = {}
    for key, value in case.conditions.items():
        if key in SPATIAL:
            v = np.asarray(value, dtype=np.float32)
            if sliced:
                if case.seg.shape[0] != 1:
                    raise ValueError(f"case {case.name}: {key} on 2D slices of a 3D volume are not supported")
                v = np.concatenate([v[..., 1:3], v[..., 4:6]], -1) if key == "boxes" else v[..., 1:]
            reps = 2 if key == "boxes" else 1
            value = v - np.tile(start, reps)
        out[key] = value
    return out


def map_cell_size(cases: list[CachedCase], nd: int):
    """The cell size (voxels, per axis of the patch) shared by the cases' dense maps; None without maps."""
    strides = {tuple(m.stride[-nd:]) for c in cases[:1] for m in c.maps.values()}
    if not strides:
        return None
    return tuple(int(np.lcm.reduce([s[a] for s in strides])) for a in range(nd))


def region_maps(case: CachedCase, center, region, z: int | None) -> dict[str, np.ndarray]:
    """Each dense map of ``case`` over the region around ``center`` (of slice ``z`` of a 3D map for a
    2D configuration): (C, *region / stride) float32."""
    out = {}
    for key, dense in case.maps.items():
        array, stride = dense.array, dense.stride
        if z is not None:
            array, stride = array[:, z], stride[1:]
        start = np.asarray(center) - np.asarray(region) // 2
        out[key] = dense_region(array, stride, start, [r // s for r, s in zip(region, stride)])
    return out


def stack_conditions(conds: list[dict], names) -> dict[str, np.ndarray]:
    keys = set(conds[0])
    if any(set(c) != keys for c in conds):
        raise ValueError(f"the cases {', '.join(names[:4])}... do not all carry the same conditions")
    return {k: np.stack([np.asarray(c[k]) for c in conds]) for k in sorted(keys)}
