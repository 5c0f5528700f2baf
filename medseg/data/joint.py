"""Joint training over several preprocessed datasets (SAMDA's joint fine-tuning, multi-site training).

``TrainingConfig.extra_data`` lists further datasets preprocessed with the same plan configuration,
each ``{"cache": FOLDER, "share": 0.5, "label_map": {"1": 1, "2": 1}, "cases": [...]}``: the cached
case folder (``PREPROCESSED/data_...``), the fraction of each batch's samples drawn from it (the
training dataset's own cases share the rest), how its label values map onto the training dataset's
(values not named become background; omitted: identical labels) and optionally which of its cases
to use (default: all). Labels are mapped in memory: the cache is only read.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from medseg.data.cache import CachedCase, cached_case_names, load_cached_case
from medseg.errors import DatasetError


def check_extra_data(entries: list[dict]) -> None:
    """ValueError for a malformed ``extra_data`` list (before any work starts)."""
    total = 0.0
    for i, e in enumerate(entries):
        unknown = sorted(set(e) - {"cache", "share", "label_map", "cases"})
        if "cache" not in e or unknown:
            raise ValueError(f"extra_data[{i}]: needs 'cache' (and only share, label_map, cases); got {sorted(e)}")
        share = float(e.get("share", 0.5))
        if not 0 < share < 1:
            raise ValueError(f"extra_data[{i}]: share must be between 0 and 1, got {share}")
        total += share
    if total >= 1:
        raise ValueError(f"extra_data: shares add up to {total:g}; the training dataset needs a share too")


def _lut(label_map: dict | None, max_value: int) -> np.ndarray | None:
    if label_map is None:
        return None
    lut = np.zeros(max_value + 1, dtype=np.int64)
    for src, dst in label_map.items():
        if int(src) <= max_value:
            lut[int(src)] = int(dst)
    return lut


def map_case(case: CachedCase, label_map: dict | None) -> CachedCase:
    """``case`` with its label values mapped (segmentation and foreground locations)."""
    lut = _lut(label_map, max([int(case.seg.max()), *case.fg.keys(), 0]))
    if lut is None:
        return case
    fg: dict[int, list] = {}
    for c, locs in case.fg.items():
        if lut[c] > 0:
            fg.setdefault(int(lut[c]), []).append(locs)
    merged = {c: np.concatenate(v) for c, v in fg.items()}
    return replace(case, seg=lut[np.asarray(case.seg)].astype(case.seg.dtype), fg=merged)


def extra_cases(entry: dict, load=None) -> list[CachedCase]:
    """The cases of one ``extra_data`` entry, labels mapped; ``load(cache, names)`` loads them (the
    trainer's loader, which also attaches derived maps)."""
    cache = Path(entry["cache"])
    names = list(entry.get("cases") or cached_case_names(cache))
    known = set(cached_case_names(cache))
    missing = [n for n in names if n not in known]
    if missing:
        raise DatasetError(cache, f"extra_data names cases that are not preprocessed here: {', '.join(missing[:5])}")
    cases = load(cache, names) if load else [load_cached_case(cache, n) for n in names]
    return [map_case(c, entry.get("label_map")) for c in cases]


def sampling_weights(n_main: int, groups: list[tuple[int, float]]) -> np.ndarray:
    """Per-case probabilities: each extra group of n cases shares its ``share`` evenly, the training
    dataset's ``n_main`` cases the rest."""
    rest = 1.0 - sum(share for _, share in groups)
    parts = [np.full(n_main, rest / max(n_main, 1))] + [np.full(n, share / n) for n, share in groups]
    p = np.concatenate(parts)
    return p / p.sum()


def joint_training_cases(load, names: list[str], extra_data: list[dict], *, log=print):
    """``load(names, cache)`` of the training dataset's ``names`` plus the cases of every ``extra_data``
    entry (labels mapped), and per-case sampling weights (None without extra data)."""
    cases = load(names)
    if not extra_data:
        return cases, None
    groups = [extra_cases(e, lambda cache, n: load(n, Path(cache))) for e in extra_data]
    shares = [(len(g), float(e.get("share", 0.5))) for g, e in zip(groups, extra_data)]
    log("joint training: " + ", ".join(f"{n} cases of {e['cache']} ({s:.0%})" for (n, s), e in zip(shares, extra_data)))
    return cases + [c for g in groups for c in g], sampling_weights(len(cases), shares)
