"""Parsing of CLI option values shared by subcommands (JSON objects, NAME=JSON conditions)."""

from __future__ import annotations

import json
from pathlib import Path


def json_value(text: str, option: str, kind: type | tuple = (dict, list)):
    """``text`` parsed as JSON of ``kind``; ValueError naming ``option`` otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{option}: not valid JSON ({exc})") from None
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{option}: expected a JSON {names.replace('dict', 'object').replace('list', 'list')}")
    return value


def parse_conditions(items: list[str], file: Path | None) -> tuple[dict, dict]:
    """``--condition NAME=JSON`` (every case) and ``--conditions FILE`` ({case: {NAME: value}}) ->
    (common, per case). Values are JSON numbers or nested lists, e.g. ``boxes=[[10,20,30,18,40,50]]``."""
    common = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--condition: expected NAME=JSON, got {item!r}")
        common[name.strip()] = json_value(value, f"--condition {name.strip()}", (list, int, float))
    per_case = {}
    if file is not None:
        from medseg.errors import DatasetError
        from medseg.io.jsonio import read_json_object

        per_case = read_json_object(file, DatasetError, "conditions file")
        bad = next((k for k, v in per_case.items() if not isinstance(v, dict)), None)
        if bad is not None:
            raise DatasetError(file, f"case '{bad}': expected an object of NAME: value")
    return common, per_case
