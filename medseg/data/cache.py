"""Read the preprocessed cache and make cross-validation splits."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import DatasetError
from medseg.io.jsonio import write_json

SPLIT_SEED = 12345


@dataclass
class CachedCase:
    name: str
    data: np.ndarray  # (C, *spatial) float32
    seg: np.ndarray  # (*spatial) integer
    fg: dict[int, np.ndarray]  # class -> (N, ndim) voxel coordinates
    # per-case conditioning arrays (CASE_cond.npz): text tokens/embeddings, histograms, scalars, and
    # ``points`` (N, ndim) / ``boxes`` (N, 2*ndim) in voxel coordinates of the cached arrays
    conditions: dict[str, np.ndarray] = field(default_factory=dict)
    # dense maps derived from the image by a frozen network (medseg.data.derived), name -> DenseMap
    maps: dict = field(default_factory=dict)


def load_cached_case(cache: Path, name: str, *, mmap: bool = False) -> CachedCase:
    mode = "r" if mmap else None
    try:
        data = np.load(cache / f"{name}.npy", mmap_mode=mode)
        seg = np.load(cache / f"{name}_seg.npy", mmap_mode=mode)
        with np.load(cache / f"{name}_fg.npz") as z:
            fg = {int(k): z[k] for k in z.files}
        conditions = {}
        if (cache / f"{name}_cond.npz").is_file():
            with np.load(cache / f"{name}_cond.npz", allow_pickle=False) as z:
                conditions = {k: z[k] for k in z.files}
    except FileNotFoundError as exc:
        raise DatasetError(exc.filename, "preprocessed file missing (run `medseg preprocess`)") from None
    except ValueError as exc:  # a pickled object array in CASE_cond.npz is refused, never loaded
        raise DatasetError(cache / f"{name}_cond.npz", f"cannot read conditions ({exc})") from None
    return CachedCase(name, data, seg, fg, conditions)


def cached_case_names(cache: Path) -> list[str]:
    path = cache / "cases.json"
    if not path.is_file():
        raise DatasetError(cache, "no preprocessed data (run `medseg preprocess`)")
    return json.loads(path.read_text())


def make_splits(names: list[str], n_folds: int = 5, seed: int = SPLIT_SEED, groups: dict | None = None) -> list[dict]:
    """Seeded k-fold split over sorted case names: [{"train": [...], "val": [...]}, ...]. With
    ``groups`` (case -> group) the groups are split and every case follows its group (the sentences
    of one image, the scans of one patient)."""
    names = sorted(names)
    keys = sorted({(groups or {}).get(n, n) for n in names})
    order = np.random.default_rng(seed).permutation(len(keys))
    fold_of = {keys[i]: k for k, f in enumerate(np.array_split(order, n_folds)) for i in f}
    fold = {n: fold_of[(groups or {}).get(n, n)] for n in names}
    return [
        {"train": [n for n in names if fold[n] != k], "val": [n for n in names if fold[n] == k]} for k in range(n_folds)
    ]


def get_split(
    preprocessed_dir: Path, names: list[str], fold: int | str, *, write: bool = True
) -> tuple[list[str], list[str]]:
    """Train/val case names for ``fold``; ``splits_final.json`` is created once and honoured if edited.

    ``write=False`` (non-zero DDP ranks) computes the default split without writing it."""
    if fold == "all":
        return sorted(names), []
    path = preprocessed_dir / "splits_final.json"
    if path.is_file():
        splits = json.loads(path.read_text())
    else:
        groups_file = preprocessed_dir / "groups.json"
        groups = json.loads(groups_file.read_text()) if groups_file.is_file() else None
        splits = make_splits(names, groups=groups)
        if write:
            write_json(path, splits)
    fold = int(fold)
    if fold >= len(splits):
        raise DatasetError(path, f"fold {fold} requested but the splits define {len(splits)} folds")
    split = splits[fold]
    unknown = sorted((set(split["train"]) | set(split["val"])) - set(names))
    if unknown:
        raise DatasetError(path, f"split names cases that are not preprocessed: {', '.join(unknown[:5])}")
    return list(split["train"]), list(split["val"])
