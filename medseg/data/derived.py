"""Derived inputs: dense maps a model needs beside the image, computed from it by a frozen network.

SAMDA's U-Net reads the frozen LiteMedSAM image embedding of every slice (:mod:`medseg.sam.embeddings`).
The frozen network never changes, so its maps are computed once per case and cached beside the
preprocessed arrays for training (``CASE_<name>_<key>.npy``, float16, (C, *grid)); at prediction the
Predictor computes them for each case from its preprocessed image. A model asks for them through
``model.derived_inputs()`` -> ``{name: options}`` (options are JSON values: what the provider
registered under ``name`` takes, recorded in the model's kwargs, so a model folder describes them).

A map has one cell per ``stride`` voxels on each axis (cell ``i`` covers voxels ``[i*s, (i+1)*s)``)
and covers the whole preprocessed array. Everything the image goes through, the map follows at its
own resolution: the sampler's region (:func:`dense_region`), the augmentation's rotation, scaling and
mirrors (:func:`medseg.augment.transforms.augment_dense_conditions`) and the predictor's tiles and
TTA flips, so the network always sees the map of exactly the pixels it sees.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.registry import Registry

DERIVED_INPUTS = Registry("derived input", loader=lambda: __import__("medseg.sam.embeddings"))
register_derived_input = DERIVED_INPUTS.register


@dataclass(frozen=True)
class DenseMap:
    array: np.ndarray  # (C, *grid) float16 / float32
    stride: tuple[int, ...]  # voxels per cell, per spatial axis

    def region(self, start, cells, cell_size=None) -> np.ndarray:
        return dense_region(self.array, self.stride, start, cells, cell_size)


def derived_inputs_of(model) -> dict[str, dict]:
    """``{name: options}`` of the dense maps ``model`` reads (none for most models)."""
    fn = getattr(model, "derived_inputs", None)
    return dict(fn()) if callable(fn) else {}


def compute_derived(name: str, data: np.ndarray, options: dict, *, device="cpu", cache: Path | None = None) -> DenseMap:
    """The provider registered as ``name`` on a preprocessed (C, *spatial) array; with ``cache`` (a
    folder) kept there under a digest of the array's content and the options, and reused."""
    path = None
    if cache is not None:
        arr = np.ascontiguousarray(data)
        digest = hashlib.sha256(arr.tobytes() + str((arr.shape, arr.dtype.str)).encode()).hexdigest()[:20]
        path = Path(cache) / f"{digest}_{name}_{options_key(name, options)}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                return DenseMap(z["array"], tuple(int(s) for s in z["stride"]))
    dense = DERIVED_INPUTS.get(name)(data, device=device, **options)
    if path is not None:
        from medseg.io.atomic import temp_file_beside

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_file_beside(path, suffix=".npz")
        np.savez(tmp, array=dense.array.astype(np.float16), stride=np.asarray(dense.stride))
        os.replace(tmp, path)
    return dense


def options_key(name: str, options: dict) -> str:
    """A short digest naming one variant of a derived input (its cache files, its digest check)."""
    blob = json.dumps({"name": name, "options": options}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------- regions
def _axis_weights(start: float, cells: int, cell: float, stride: int, n: int):
    """Indices (lo, hi) and weights (w_lo, w_hi, inside) to interpolate ``cells`` output cells of
    size ``cell`` from ``start`` (voxel-edge coordinates) on a stored axis of ``n`` cells of ``stride``."""
    centres = start + (np.arange(cells) + 0.5) * cell
    inside = (centres >= 0) & (centres < n * stride)
    f = np.clip(centres / stride - 0.5, 0, n - 1)
    lo = np.floor(f).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = (f - lo).astype(np.float32)
    return lo, hi, 1 - w, w, inside


def dense_region(array: np.ndarray, stride, start, cells, cell_size=None) -> np.ndarray:
    """The (C, *cells) float32 map over the region starting at ``start`` (voxel-edge coordinates of the
    full array, may be fractional or outside it), with cells of ``cell_size`` voxels (default: the
    stored stride), linearly interpolated from the stored (C, *grid) map; zero outside the array.

    A region aligned with the stored grid (integer start a multiple of the stride, same cell size) is
    an exact copy."""
    nd = len(cells)
    cell_size = stride if cell_size is None else cell_size
    out = np.asarray(array, dtype=np.float32)
    for axis in range(nd):
        lo, hi, w_lo, w_hi, inside = _axis_weights(
            float(start[axis]), int(cells[axis]), float(cell_size[axis]), int(stride[axis]), out.shape[1 + axis]
        )
        shape = [1] * out.ndim
        shape[1 + axis] = -1
        a, b = np.take(out, lo, axis=1 + axis), np.take(out, hi, axis=1 + axis)
        out = a * (w_lo * inside).reshape(shape) + b * (w_hi * inside).reshape(shape)
    return out


def map_cells(size, stride) -> tuple[int, ...]:
    """Cells of ``stride`` over ``size`` voxels, rounded up (a region's map covers at least the region)."""
    return tuple(int(-(-int(s) // int(t))) for s, t in zip(size, stride))


def check_divisible(patch, stride, what: str = "patch") -> None:
    bad = [int(p) % int(s) for p, s in zip(patch, stride)]
    if any(bad):
        raise ValueError(f"{what} {list(patch)} is not a multiple of the derived input's stride {list(stride)}")


# ---------------------------------------------------------------------------------- the cache
def cache_file(cache_dir: Path, case: str, name: str, options: dict) -> Path:
    return Path(cache_dir) / f"{case}_{name}_{options_key(name, options)}.npy"


def ensure_cached(cache_dir: Path, names: list[str], specs: dict[str, dict], *, device="cpu", log=print) -> None:
    """Compute every missing ``CASE_<name>_<key>.npy`` of ``specs`` for the cached cases ``names``
    (one atomic file per case: an interrupted run resumes where it stopped) and record each variant's
    options and stride in ``derived_inputs.json``."""
    from medseg.data.cache import load_cached_case
    from medseg.io.atomic import save_npy_atomic
    from medseg.io.jsonio import write_json
    from medseg.utils import track

    cache_dir = Path(cache_dir)
    index_file = cache_dir / "derived_inputs.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    for name, options in specs.items():
        key = options_key(name, options)
        todo = [n for n in names if not cache_file(cache_dir, n, name, options).is_file()]
        if todo:
            log(f"computing {name} for {len(todo)} case(s) (cached for later runs)")
        stride = index.get(f"{name}_{key}", {}).get("stride")
        for case in track(todo, total=len(todo), description=f"{name}"):
            dense = compute_derived(name, load_cached_case(cache_dir, case, mmap=True).data, options, device=device)
            save_npy_atomic(cache_file(cache_dir, case, name, options), dense.array.astype(np.float16))
            stride = list(dense.stride)
        if stride is not None:
            index[f"{name}_{key}"] = {"name": name, "options": options, "stride": list(stride)}
            write_json(index_file, index)


def with_maps(case, cache_dir: Path, specs: dict[str, dict]):
    """``case`` (a CachedCase) with its cached dense maps of ``specs`` attached."""
    if specs:
        case.maps = load_cached_maps(cache_dir, case.name, specs)
    return case


def load_cached_maps(cache_dir: Path, case: str, specs: dict[str, dict]) -> dict[str, DenseMap]:
    """The cached maps of ``case`` (memory-mapped), as :func:`ensure_cached` wrote them."""
    from medseg.errors import DatasetError

    cache_dir = Path(cache_dir)
    index_file = cache_dir / "derived_inputs.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    out = {}
    for name, options in specs.items():
        path = cache_file(cache_dir, case, name, options)
        entry = index.get(f"{name}_{options_key(name, options)}")
        if entry is None or not path.is_file():
            raise DatasetError(path, f"derived input '{name}' not computed (the trainer computes it at start)")
        out[name] = DenseMap(np.load(path, mmap_mode="r"), tuple(entry["stride"]))
    return out
