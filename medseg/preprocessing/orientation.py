"""Canonical voxel orientation: exact reorientation by axis permutation and flips.

A model learns anatomy in voxel order. A scan stored P-S-R shows it a hippocampus rotated by 90
degrees compared with the R-A-S crops it was trained on, so every case is brought to the plan's
canonical orientation on the way in and mapped back exactly on the way out (no interpolation:
only axes are permuted and reversed, so both steps are lossless).

Conventions (as in :mod:`medseg.io.image`): arrays are (..., z, y, x); ``ImageMeta`` holds
spacing/origin in (z, y, x) order and ``direction``, the row-major 3x3 ITK direction matrix in
LPS physical space whose columns are the index axes i, j, k (= x, y, z, the array's last, middle
and first spatial axis). Orientation codes name, for i, j, k in turn, the direction each index
increases towards, as nibabel does: "RAS" = i towards Right, j towards Anterior, k towards
Superior (nibabel's ``as_closest_canonical``, TotalSegmentator's input orientation).
"""

from __future__ import annotations

import numpy as np

from medseg.io.image import ImageMeta

CANONICAL = "RAS"  # what new plans name, as TotalSegmentator does

_LETTERS = ("LR", "PA", "IS")  # per RAS world axis: (negative, positive) letter


def orientation_axes(code: str) -> list[tuple[int, int]]:
    """(world axis in RAS, sign) for index axes i, j, k of an orientation code like "RAS"."""
    code = str(code).upper()
    out = []
    for letter in code:
        hit = [(w, 1 if pair[1] == letter else -1) for w, pair in enumerate(_LETTERS) if letter in pair]
        if not hit:
            raise ValueError(f"orientation '{code}': '{letter}' is none of R/L, A/P, S/I")
        out.append(hit[0])
    if len(code) != 3 or len({w for w, _ in out}) != 3:
        raise ValueError(f"orientation '{code}' must name each of R/L, A/P, S/I exactly once")
    return out


def _axes_of_direction(direction) -> list[tuple[int, int]]:
    """Closest (RAS world axis, sign) for index axes i, j, k of an ITK (LPS) direction matrix.

    Greedy as nibabel's ``io_orientation``: the largest |cosine| in the whole matrix is assigned
    first, then the largest among the remaining axes, so an oblique matrix always yields a
    permutation. Cosines are rounded to 1e-9 so an exact 45-degree tie is decided by axis order
    (i before j before k, R/L before A/P before S/I), not by float noise.
    """
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    ras = d * np.array([[-1.0], [-1.0], [1.0]])  # LPS -> RAS components
    norms = np.linalg.norm(ras, axis=0)
    if np.any(norms == 0) or abs(np.linalg.det(ras)) < 1e-6 * np.prod(norms):
        raise ValueError(f"direction matrix {d.ravel().tolist()} is singular")
    ras = ras / norms
    score = np.round(np.abs(ras.T), 9)  # [index axis, world axis]
    out: list[tuple[int, int] | None] = [None] * 3
    for _ in range(3):
        c, w = np.unravel_index(int(np.argmax(score)), score.shape)
        out[c] = (int(w), 1 if ras[w, c] > 0 else -1)
        score[c, :] = -1.0
        score[:, w] = -1.0
    return out  # type: ignore[return-value]


def orientation_code(direction) -> str:
    """Orientation code ("RAS", "LPS", "PSR", ...) of the closest axes of an ITK direction matrix."""
    return "".join(_LETTERS[w][(s + 1) // 2] for w, s in _axes_of_direction(direction))


def orientation_transform(direction, target: str = CANONICAL) -> tuple[list[int], list[bool]]:
    """Array-axis permutation and flips that bring an image to ``target``.

    Returns ``(perm, flip)`` over the three spatial array axes (z, y, x): new array axis ``a``
    is old axis ``perm[a]``, reversed where ``flip[a]``. Spacings and shapes in (z, y, x) order
    map as ``[old[p] for p in perm]``.
    """
    have = _axes_of_direction(direction)
    want = orientation_axes(target)
    perm, flip = [0, 0, 0], [False, False, False]
    for c_new, (w, s) in enumerate(want):
        c_old = next(c for c, (w_old, _) in enumerate(have) if w_old == w)
        perm[2 - c_new] = 2 - c_old  # index axis c <-> array axis 2 - c
        flip[2 - c_new] = have[c_old][1] != s
    return perm, flip


def reorient(array: np.ndarray, meta: ImageMeta, target: str = CANONICAL) -> tuple[np.ndarray, ImageMeta, dict]:
    """Bring ``array`` (..., z, y, x) to orientation ``target`` by permuting and flipping axes.

    Returns the new array (C-contiguous), a meta whose origin/direction/spacing put every voxel
    at the same physical point as before, and a JSON-serialisable record for :func:`restore`.
    """
    perm, flip = orientation_transform(meta.direction, target)
    lead = array.ndim - 3
    out = np.transpose(array, [*range(lead), *(lead + p for p in perm)])
    flipped = tuple(lead + a for a in range(3) if flip[a])
    if flipped:
        out = np.flip(out, flipped)
    shape = tuple(int(s) for s in array.shape[-3:])
    d = np.asarray(meta.direction, dtype=float).reshape(3, 3)
    spacing_xyz = np.array(meta.spacing[::-1], dtype=float)
    origin_xyz = np.array(meta.origin[::-1], dtype=float)
    new_d = np.zeros((3, 3))
    for a in range(3):  # new array axis a = new index axis 2 - a
        c_old = 2 - perm[a]
        new_d[:, 2 - a] = -d[:, c_old] if flip[a] else d[:, c_old]
        if flip[a]:  # new voxel 0 along this axis is the old last voxel
            origin_xyz = origin_xyz + d[:, c_old] * spacing_xyz[c_old] * (shape[perm[a]] - 1)
    new_meta = ImageMeta(
        spacing=tuple(float(meta.spacing[p]) for p in perm),
        origin=tuple(float(o) for o in origin_xyz[::-1]),
        direction=tuple(float(v) for v in new_d.ravel()),
        shape=tuple(shape[p] for p in perm),
    )
    record = {
        "from": orientation_code(meta.direction),
        "to": str(target).upper(),
        "perm": perm,
        "flip": flip,
        "shape": list(shape),
    }
    return np.ascontiguousarray(out), new_meta, record


def restore(array: np.ndarray, record: dict | None) -> np.ndarray:
    """Map an array on the canonical grid (any leading channel axes) back onto the input's grid.

    The exact inverse of :func:`reorient`; ``record=None`` (no reorientation) returns ``array``.
    Works on numpy arrays and torch tensors alike.
    """
    if record is None:
        return array
    perm, flip = list(record["perm"]), list(record["flip"])
    lead = array.ndim - 3
    flipped = tuple(lead + a for a in range(3) if flip[a])
    if flipped:
        array = array.flip(flipped) if hasattr(array, "dim") else np.flip(array, flipped)
    inverse = [int(i) for i in np.argsort(perm)]
    axes = [*range(lead), *(lead + i for i in inverse)]
    if hasattr(array, "dim"):  # torch
        out = array.permute(axes).contiguous()
    else:
        out = np.ascontiguousarray(np.transpose(array, axes))
    if "shape" in record and tuple(out.shape[-3:]) != tuple(record["shape"]):
        raise ValueError(f"restored shape {out.shape[-3:]} differs from the input's {tuple(record['shape'])}")
    return out
