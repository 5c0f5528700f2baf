"""Direct inference with a label mapping (STU-Net's direct-inference mode).

A model's classes are mapped onto another label set without retraining, e.g. the hippocampus
model's ``Anterior`` and ``Posterior`` merged into one ``hippocampus`` label. A mapping file is
JSON, either flat::

    {"Anterior": "hippocampus", "Posterior": "hippocampus"}

or with the target label values fixed (e.g. copied from the target dataset.json, so that the
predictions can be evaluated against it)::

    {"labels": {"background": 0, "hippocampus": 1},
     "map": {"Anterior": "hippocampus", "Posterior": 1}}

Keys are the model's label names (or values, as strings). Values are target label names, target
values (with a ``labels`` table), or ``"background"`` / ``null``. Model classes not mentioned become
background. In the flat form target values are 1, 2, ... in order of first appearance.

The mapping acts on the label map (a voxel labelled Anterior or Posterior becomes hippocampus, so a
merged class is exactly the union of its sources); saved probabilities are summed per target class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import DatasetError
from medseg.io.image import label_dtype
from medseg.io.jsonio import read_json_object

BACKGROUND = "background"


@dataclass(frozen=True)
class LabelMapping:
    lut: np.ndarray  # model label value -> target label value
    labels: dict[str, int]  # the target label set (name -> value), background included
    source: str = ""  # the mapping file, for messages and the manifest

    @property
    def num_classes(self) -> int:
        return max(self.labels.values()) + 1


def build_label_mapping(
    mapping: dict, model_labels: dict[str, int], *, source: str | Path | None = None
) -> LabelMapping:
    """Validate ``mapping`` (flat, or ``{"labels": ..., "map": ...}``) against the model's labels."""
    where = str(source) if source is not None else None
    if not isinstance(mapping, dict):
        raise DatasetError(where, "label map must be a JSON object")
    if "map" in mapping:
        unknown_keys = sorted(set(mapping) - {"map", "labels"})
        if unknown_keys:
            raise DatasetError(where, f"label map has unknown key(s) {unknown_keys} (expected 'map' and 'labels')")
        table, pairs = mapping.get("labels"), mapping["map"]
        if not isinstance(pairs, dict):
            raise DatasetError(where, "label map: 'map' must be a JSON object")
    else:
        table, pairs = None, mapping
    target: dict[str, int] = {BACKGROUND: 0}
    if table is not None:
        if not isinstance(table, dict) or not all(isinstance(v, int) and v >= 0 for v in table.values()):
            raise DatasetError(where, "label map: 'labels' must map names to non-negative integers")
        target = {str(k): int(v) for k, v in table.items()}
        zero = [k for k, v in target.items() if v == 0]
        if not zero:
            raise DatasetError(where, "label map: 'labels' needs a background entry with value 0")
    by_value = {v: k for k, v in model_labels.items()}
    names = ", ".join(f"{k} ({v})" for k, v in sorted(model_labels.items(), key=lambda kv: kv[1]))
    lut = np.zeros(max(model_labels.values()) + 1, dtype=np.int64)
    for key, value in pairs.items():
        if key in model_labels:
            src = model_labels[key]
        elif str(key).isdigit() and int(key) in by_value:
            src = int(key)
        else:
            raise DatasetError(where, f"unknown model label '{key}' (the model's labels: {names})")
        dst = _target_value(value, target, fixed=table is not None, where=where)
        if src == 0 and dst != 0:
            raise DatasetError(where, f"the model's background ('{key}') cannot be mapped to a foreground label")
        lut[src] = dst
    return LabelMapping(lut, dict(sorted(target.items(), key=lambda kv: kv[1])), where or "")


def _target_value(value, target: dict[str, int], *, fixed: bool, where) -> int:
    if value is None or value == BACKGROUND:
        return 0
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DatasetError(where, f"label map: target {value!r} must be a label name, a value or null")
    if isinstance(value, int):
        if not fixed:
            raise DatasetError(where, f"label map: target value {value} needs a 'labels' table naming the values")
        if value not in target.values():
            raise DatasetError(where, f"label map: target value {value} is not in 'labels' {target}")
        return value
    if value in target:
        return target[value]
    if fixed:
        raise DatasetError(where, f"label map: unknown target label '{value}' (labels: {', '.join(target)})")
    target[value] = max(target.values()) + 1
    return target[value]


def load_label_mapping(path: str | Path, model_labels: dict[str, int]) -> LabelMapping:
    """Read a mapping file (see the module docstring); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "label map file not found")
    return build_label_mapping(read_json_object(path, DatasetError, "label map"), model_labels, source=path)


def apply_label_mapping(seg: np.ndarray, mapping: LabelMapping) -> np.ndarray:
    """A model label map -> the target label map (same shape, smallest fitting dtype)."""
    return mapping.lut.astype(label_dtype(mapping.num_classes - 1))[seg]


def map_probabilities(probs: np.ndarray, mapping: LabelMapping) -> np.ndarray:
    """(K_model, ...) probabilities -> (K_target, ...), each target class the sum of its sources."""
    out = np.zeros((mapping.num_classes, *probs.shape[1:]), dtype=probs.dtype)
    for src, dst in enumerate(mapping.lut):
        out[dst] += probs[src]
    return out
