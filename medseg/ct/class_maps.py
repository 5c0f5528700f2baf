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
