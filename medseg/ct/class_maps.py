"""Structure names for label values.

Built-in maps (``medseg/ct/class_maps/*.json``) are TotalSegmentator's, taken from its
``map_to_binary.py`` (Apache-2.0): ``total`` (v2, 117 classes), ``total_v1`` (104 classes) and
``total_mr`` (50 classes). A map may also come from a JSON file: a medseg/nnU-Net ``dataset.json``
(``{"labels": {name: value}}``), a medseg ``model.json`` or a bare ``{name: value}`` /
``{value: name}`` object.
"""

from __future__ import annotations

import json
from pathlib import Path

from medseg.errors import DatasetError
from medseg.io.jsonio import read_json_object

_BUILTIN = Path(__file__).with_name("class_maps")


def builtin_class_maps() -> list[str]:
    return sorted(p.stem for p in _BUILTIN.glob("*.json"))


def _normalise(raw: dict, source) -> dict[str, int]:
    """name -> value without background, sorted by value; accepts either direction."""
    out: dict[str, int] = {}
    for k, v in raw.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer():
            name, value = str(k), int(v)
        elif str(k).lstrip("-").isdigit() and isinstance(v, str):
            name, value = v, int(k)
        else:
            raise DatasetError(source, f"class map entry {k!r}: {v!r} is not a name/integer-value pair")
        if value < 0:
            raise DatasetError(source, f"class map value for {name!r} is negative ({value})")
        if value != 0:
            out[name] = value
    values = list(out.values())
    if len(set(values)) != len(values):
        raise DatasetError(source, "class map assigns the same value to several names")
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def load_class_map(spec: str | Path | dict) -> dict[str, int]:
    """Structure name -> label value (background excluded), ordered by value."""
    if isinstance(spec, dict):
        return _normalise(spec.get("labels", spec), "class map")
    if str(spec) in builtin_class_maps():
        return _normalise(json.loads((_BUILTIN / f"{spec}.json").read_text())["labels"], spec)
    path = Path(spec)
    if not path.is_file():
        raise DatasetError(path, f"class map not found (built-in maps: {', '.join(builtin_class_maps())})")
    raw = read_json_object(path, DatasetError, "class map")
    return _normalise(raw.get("labels", raw), path)


def _values(labels: dict[str, int]) -> str:
    vals = sorted(v for v in labels.values() if v)
    if not vals:
        return "no values"
    if vals == list(range(vals[0], vals[-1] + 1)):
        return f"values {vals[0]}-{vals[-1]}" if len(vals) > 1 else f"value {vals[0]}"
    return f"values {', '.join(map(str, vals[:6]))}{' ...' if len(vals) > 6 else ''}"


def fit_class_map(class_map: str | Path | dict | None, model_labels: dict[str, int], model_source) -> dict[str, int]:
    """The names for a model's classes: the model's own labels, or ``class_map`` if it fits them.

    A map fits when it names exactly the model's label values; then its names are used (e.g. a
    TotalSegmentator map for an imported model with generic names). A map that does not fit is
    an error naming both sides: a 117-structure map on a 12-class model would otherwise write 117
    wrongly named masks. ``model_source``: the model folder (or record) named in the error."""
    own = {k: int(v) for k, v in model_labels.items() if int(v)}
    if class_map is None:
        return dict(sorted(own.items(), key=lambda kv: kv[1]))
    labels = load_class_map(class_map)
    if set(labels.values()) != set(own.values()):
        raise DatasetError(
            class_map if isinstance(class_map, (str, Path)) else "--class-map",
            f"class map names {len(labels)} structures ({_values(labels)}) but the model {model_source} has "
            f"{len(own)} ({_values(own)}); omit --class-map to use the model's own labels",
        )
    renamed = [(n, m) for n, v in own.items() for m, w in labels.items() if v == w and n != m]
    if renamed:
        import sys

        print(
            f"medseg: warning: --class-map renames {len(renamed)} of the model's {len(own)} classes "
            f"(e.g. {renamed[0][0]!r} -> {renamed[0][1]!r})",
            file=sys.stderr,
        )
    return labels


def recorded_labels(seg_path: str | Path) -> tuple[dict[str, int], Path] | None:
    """The labels ``medseg predict`` recorded beside a label map it wrote (its folder's
    ``.medseg_predictions.json``), with the record's path; None when there is no record."""
    record = Path(seg_path).parent / ".medseg_predictions.json"  # medseg.inference.provenance.RECORD
    if not record.is_file():
        return None
    try:
        labels = json.loads(record.read_text()).get("labels")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return (labels, record) if isinstance(labels, dict) and labels else None


def class_map_for_label_map(
    class_map: str | Path | dict | None, seg_path: str | Path, *, model: str | Path | None = None
) -> dict[str, int]:
    """Names for the values of a label map file (``ct-stats``, ``dicom-seg``): those of the model
    that made it (``-m``, or recorded by ``medseg predict`` beside it), which ``class_map`` must
    fit; or ``class_map`` alone. With neither, an error: guessing a map (TotalSegmentator's, as
    before) named an MR's hippocampus labels 'spleen' and 'kidney_right'."""
    source = None
    if model is not None:
        from medseg.io.checkpoint import load_spec, resolve_model

        folder = resolve_model(model)
        own, source = dict(load_spec(folder).labels), folder
    else:
        found = recorded_labels(seg_path)
        own, source = found if found else (None, None)
    if own is not None:
        return fit_class_map(class_map, own, source)
    if class_map is None:
        raise DatasetError(
            seg_path,
            "no class map: the label map does not say what its values are; pass --class-map "
            f"({', '.join(builtin_class_maps())} or a dataset.json/model.json) or -m MODEL",
        )
    return load_class_map(class_map)


def unnamed_values_problem(seg, labels: dict[str, int], map_name: str = "the class map") -> str | None:
    """Why ``labels`` cannot name every value of ``seg`` (None if it can): values it lacks would
    silently drop out of statistics and DICOM-SEGs."""
    import numpy as np

    present = set(np.unique(seg).tolist()) - {0}
    unknown = sorted(int(v) for v in present - set(labels.values()))
    if not unknown:
        return None
    shown = ", ".join(map(str, unknown[:8])) + (" ..." if len(unknown) > 8 else "")
    return f"label values [{shown}] are not in {map_name} ({len(labels)} structures, {_values(labels)})"
