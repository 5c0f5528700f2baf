"""Box prompts: parsing, validation against the image, and the batch boxes table.

A 2D box is ``x0 y0 x1 y1``, a 3D box ``x0 y0 z0 x1 y1 z1``: inclusive pixel/voxel indices of the input
image (x = column, y = row; in a volume x, y, z = ITK index i, j, k). The batch table (CSV with a header,
or a JSON list of objects) has one row per box: ``image, x0, y0, x1, y1`` (+ ``z0, z1`` for volumes) and
an optional ``id``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import MedsegError


@dataclass(frozen=True)
class Box:
    coords: tuple[float, ...]  # x0 y0 x1 y1 or x0 y0 z0 x1 y1 z1
    id: str | None = None
    image: str | None = None

    @property
    def is_3d(self) -> bool:
        return len(self.coords) == 6

    @property
    def lo(self) -> tuple[float, ...]:
        return self.coords[: len(self.coords) // 2]

    @property
    def hi(self) -> tuple[float, ...]:
        return self.coords[len(self.coords) // 2 :]


def parse_box(values, *, source="--box") -> Box:
    """``[x0, y0, x1, y1]`` / 6 numbers, or one string "x0,y0,x1,y1" (commas or spaces)."""
    if isinstance(values, str):
        values = values.replace(",", " ").split()
    try:
        coords = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise MedsegError(source, f"box {values!r}: expected numbers x0 y0 x1 y1 (or x0 y0 z0 x1 y1 z1)") from None
    if len(coords) not in (4, 6):
        raise MedsegError(source, f"box has {len(coords)} numbers; expected 4 (x0 y0 x1 y1) or 6 (x0 y0 z0 x1 y1 z1)")
    return Box(coords)


def check_box(box: Box, shape_xyz: tuple[int, ...], path) -> None:
    """Refuse a box of the wrong dimension, outside the image, inverted or degenerate."""
    dims = len(shape_xyz)
    names = "xyz"[:dims]
    if len(box.coords) != 2 * dims:
        kind = "3D box on a 2D image" if box.is_3d else "2D box on a 3D volume (give x0 y0 z0 x1 y1 z1)"
        raise MedsegError(path, f"{kind}: box {_fmt(box)}")
    for a, (lo, hi, n) in enumerate(zip(box.lo, box.hi, shape_xyz)):
        if lo > hi:
            raise MedsegError(path, f"box {_fmt(box)}: {names[a]}0 > {names[a]}1")
        if lo == hi:
            raise MedsegError(path, f"box {_fmt(box)}: zero {'width' if a == 0 else 'height' if a == 1 else 'depth'}")
        if hi < 0 or lo > n - 1:
            raise MedsegError(path, f"box {_fmt(box)} lies outside the image ({names[a]} in 0..{n - 1})")
        if lo < 0 or hi > n - 1:
            raise MedsegError(path, f"box {_fmt(box)} extends outside the image ({names[a]} in 0..{n - 1})")


def _fmt(box: Box) -> str:
    return " ".join(f"{c:g}" for c in box.coords)


_COLUMNS_2D = ("x0", "y0", "x1", "y1")
_COLUMNS_3D = ("x0", "y0", "z0", "x1", "y1", "z1")


def _row_box(row: dict, where: str) -> Box:
    if not str(row.get("image") or "").strip():
        raise MedsegError(where, "row without an image name")
    cols = _COLUMNS_3D if str(row.get("z0") or "").strip() != "" else _COLUMNS_2D
    missing = [c for c in cols if str(row.get(c, "")).strip() == ""]
    if missing:
        raise MedsegError(where, f"row lacks {', '.join(missing)}")
    box = parse_box([row[c] for c in cols], source=where)
    ident = str(row.get("id") or "").strip() or None
    return Box(box.coords, ident, str(row["image"]).strip())


def read_boxes_table(path: str | Path) -> list[Box]:
    """The boxes of a CSV (header: image,x0,y0,x1,y1[,z0,z1][,id]) or JSON (list of such objects) file."""
    path = Path(path)
    if not path.is_file():
        raise MedsegError(path, "boxes file not found")
    try:
        if path.suffix.lower() == ".json":
            rows = json.loads(path.read_text())
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise MedsegError(path, "expected a JSON list of objects with image, x0, y0, x1, y1")
            start = 0
        else:
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            start = 2
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise MedsegError(path, f"cannot parse boxes table ({exc})") from None
    if not rows:
        raise MedsegError(path, "no boxes")
    boxes = [_row_box(r, f"{path}:{i + start}" if start else f"{path}[{i}]") for i, r in enumerate(rows)]
    ids = [b.id for b in boxes if b.id]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise MedsegError(path, f"duplicate id(s): {', '.join(dup)}")
    return boxes
