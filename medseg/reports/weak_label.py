"""Weak labels from a report sentence's SUVmax and image number (ConTEXTual Net 3D, Huemann et al.
2025, arXiv 2502.00528): the lesion a sentence names becomes a PET threshold contour.

1. **Find the lesion.** Threshold the PET at ``0.617 + 0.316 * SUV`` (``SUV`` = the reported SUVmax;
   the paper's background-adaptive formula with a background of 1 SUV), take 6-connected
   components and keep the one that spans the named axial image and whose SUVmax is within
   ``tol`` (0.1: the report quotes one decimal) of the reported value.
2. **Split merged uptake.** When the lesion's component has merged with hotter uptake at that
   threshold (no component's SUVmax matches), the component is split instead of giving up: the seed
   is the voxel of the named image within ``tol`` of the value (a local maximum preferred); the
   threshold is raised inside the component until the seed's part holds nothing hotter than
   ``SUV + tol`` (the saddle between the peaks, found by bisection), and the rest of the component
   is flooded from the separated cores in order of decreasing SUV (a marker watershed), so each
   voxel goes to the peak it drains to. The hotter peaks' basins are excluded from then on
   (status ``matched-split``).
3. **Refine** (iterative thresholding from the SUVmax voxel):
   ``T = (0.078 / V + 0.617 * bg / SUVmax + 0.316) * SUVmax`` with ``V`` the contour's volume (mL)
   and ``bg`` the mean SUV of a shell around it; the contour becomes the 6-connected component of
   ``PET > T`` holding the SUVmax voxel; stop when ``T`` changes by less than 1 %. The refinement
   aborts when ``T / SUVmax > 0.9`` (or ``T`` reaches the SUVmax voxel): no lesion stands out of
   its background by that test. The lesion located in step 1 or 2 is not thrown away then: the
   last contour whose threshold passed that test is kept, or, when the very first step already
   fails it, the matched first-threshold component (status ``matched-unrefined``; the reason says
   at which ``T / SUVmax`` and which contour was kept). This happens when the SUVmax is a single
   hot voxel (or a few) over a cooler lesion: the first-threshold component is then 1-3 voxels
   (0.05-0.15 mL), so ``0.078 / V`` alone adds 0.5-1.6 to ``T / SUVmax`` and ``T`` lands above the
   SUVmax (sts_026, sts_043 and sts_045 of sts_fdg_petct; their labels are those few voxels, on
   the lesion, Dice near 0). A threshold that does not settle in 50 iterations keeps the last
   contour the same way.

**Shell** (background): the voxels at Chebyshev distance exactly 3 (one voxel thick: the
26-connected dilation by 3 minus the dilation by 2, as in the authors' code; here 12-16 mm
in-plane and 10 mm axially, outside the PET's partial-volume spill-out) from the contour joined
with the lesion's first-threshold component. Around the contour alone, a contour that shrinks to a
heterogeneous lesion's hot core would take the lesion's own rim for background, which raises the
threshold, shrinks the contour further and ends in an abort. Voxels of excluded hotter uptake are
left out of the shell, so a neighbour does not count as background.

**Statuses** (:data:`STATUSES`; ``reason`` says why in one line): matched, matched-split and
matched-unrefined carry a mask (:data:`MATCHED`); no-component (no component on the image has the
value, and none can be split off), ambiguous (more than one component on the image has the value),
aborted and bad-input (an image number outside the volume, a non-positive SUVmax, a non-finite PET)
carry none. matched-unrefined takes precedence over matched-split (the reason then names both).
``aborted`` is left only for a refined contour that runs into hotter uptake it cannot be split from
(the lesion cannot be told from its neighbour at its own threshold, as for no-component in step 2).
That cannot follow a match for an SUVmax above ~1.1 (every voxel as hot as the seed that touches it
lies in its first-threshold contour, which has no hotter voxel), so it is a guard; no crop of
sts_fdg_petct gives it.

**Small labels on large, cool lesions** (sts_004: SUVmax 5.4, a 297 mL GTV, a 0.9 mL label, Dice
0.006). No bug: the label is small from step 1 on. The GTV's median SUV is 1.3 (24 % of SUVmax, 90 %
of its voxels are below 2.2), so at the first threshold (2.32, 43 % of SUVmax) it breaks into 113
separate foci; the one that holds the SUVmax is 45 voxels (2.2 mL). The refinement then raises ``T``
to 2.62 (48 %) and the focus to 18 voxels (0.9 mL): the volume term adds 0.19-0.28 SUV (``V`` of
1.5-2.2 mL) and the shell's background is 1.03 (the shell lies 58 % inside the GTV, in the tumour's
own cooler tissue, 1.4 there against ~0.5 outside, as a local background does around a focus
inside a lesion). Even a background of 0 would leave ``T >= 0.316 * SUVmax + 0.078 / V * SUVmax``
= 1.9 SUV, above 80 % of the GTV's voxels: a fixed-fraction threshold outlines the hot part of a
heterogeneous lesion, while the GTV follows the MRI extent.

**Differences from the authors' code** (zhuemann/cog_2d_segmentation, ``make_labels_from_point.py``):
the contour is recomputed as the whole 6-connected component at each threshold (theirs grows by one
voxel layer per iteration and never shrinks); SUVmax is not capped at 10 in step 3; the background
shell includes the first-threshold component (above); merged lesions are split (theirs drops them).

**Image numbers** are 1-based axial images counted from the most superior slice (as a viewer lists
a head-first series), mapped to an array index through the affine: :func:`image_to_index`.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from medseg.io.image import ImageMeta

FIRST_OFFSET, FIRST_SLOPE = 0.617, 0.316  # first threshold 0.617 + 0.316 * SUV (background = 1 SUV)
ITM_VOLUME, ITM_BACKGROUND, ITM_CONSTANT = 0.078, 0.617, 0.316
SUV_TOL = 0.1  # the report's SUVmax has one decimal
ABORT_FRACTION = 0.9
CONVERGED = 0.01
MAX_ITERATIONS = 50
SHELL_VOXELS = 3
STATUSES = ("matched", "matched-split", "matched-unrefined", "no-component", "ambiguous", "aborted", "bad-input")
MATCHED = ("matched", "matched-split", "matched-unrefined")  # the statuses that carry a mask
SIX = ndi.generate_binary_structure(3, 1)
CUBE = ndi.generate_binary_structure(3, 3)


@dataclass(frozen=True)
class WeakLabel:
    """The result for one sentence: ``mask`` (bool, the PET's grid) only when ``status`` is one of
    :data:`MATCHED` (matched, matched-split, matched-unrefined); ``ml`` in millilitres,
    ``threshold`` the SUV threshold of the returned contour (for matched-unrefined the kept one)."""

    mask: np.ndarray | None
    status: str
    reason: str = ""
    voxels: int = 0
    ml: float = 0.0
    suvmax_inside: float = float("nan")
    threshold: float = float("nan")

    @property
    def ok(self) -> bool:
        return self.status in MATCHED


# ---------------------------------------------------------------------------- image numbers


def meta_affine(meta: ImageMeta) -> np.ndarray:
    """4x4 matrix from an index of medseg's (z, y, x) arrays to world mm (LPS, as ITK holds it)."""
    direction = np.asarray(meta.direction, float).reshape(3, 3)  # columns: x, y, z voxel axes
    affine = np.eye(4)
    for axis in range(3):  # array axis 0 is ITK's z (column 2)
        affine[:3, axis] = direction[:, 2 - axis] * meta.spacing[axis]
    affine[:3, 3] = meta.origin[::-1]
    return affine


def axial_axis(affine: np.ndarray) -> int:
    """The array axis closest to the patient's S-I axis (world row 2 in LPS and RAS alike)."""
    columns = np.asarray(affine, float)[:3, :3]
    cosines = np.abs(columns[2]) / np.linalg.norm(columns, axis=0)
    return int(np.argmax(cosines))


def _runs_inferior(affine: np.ndarray, axis: int) -> bool:
    """True when a growing index along ``axis`` moves towards the feet."""
    return float(np.asarray(affine, float)[2, axis]) < 0


def image_to_index(image_number: int, affine: np.ndarray, shape: tuple[int, ...]) -> int:
    """Index along :func:`axial_axis` of the 1-based image counted from the most superior slice;
    ValueError outside the volume."""
    axis = axial_axis(affine)
    n = int(shape[axis])
    if not 1 <= int(image_number) <= n:
        raise ValueError(f"image {image_number} is outside the volume (images 1-{n})")
    return int(image_number) - 1 if _runs_inferior(affine, axis) else n - int(image_number)


def index_to_image(index: int, affine: np.ndarray, shape: tuple[int, ...]) -> int:
    """Inverse of :func:`image_to_index`."""
    axis = axial_axis(affine)
    n = int(shape[axis])
    if not 0 <= int(index) < n:
        raise ValueError(f"index {index} is outside the volume (0-{n - 1})")
    return int(index) + 1 if _runs_inferior(affine, axis) else n - int(index)


# ---------------------------------------------------------------------------- thresholds


def first_threshold(suv: float) -> float:
    """The search threshold of step 1 (SUV)."""
    return FIRST_OFFSET + FIRST_SLOPE * suv


def itm_threshold(volume_ml: float, background: float, suvmax: float) -> float:
    """The iterative threshold (SUV) for a contour of ``volume_ml`` over a ``background`` SUV."""
    return (ITM_VOLUME / volume_ml + ITM_BACKGROUND * background / suvmax + ITM_CONSTANT) * suvmax


def shell(mask: np.ndarray, distance: int = SHELL_VOXELS) -> np.ndarray:
    """Voxels at Chebyshev distance exactly ``distance`` from ``mask`` (a one-voxel-thick shell)."""
    outer = ndi.binary_dilation(mask, CUBE, iterations=distance)
    return outer & ~ndi.binary_dilation(mask, CUBE, iterations=distance - 1)


def _background(pet: np.ndarray, contour: np.ndarray, exclude: np.ndarray) -> float:
    ring = shell(contour)
    kept = ring & ~exclude
    values = pet[kept if kept.any() else ring]
    return float(values.mean()) if values.size else 0.0


# ---------------------------------------------------------------------------- splitting


def _component_at(above: np.ndarray, seed: tuple[int, ...]) -> np.ndarray:
    """The 6-connected component of ``above`` holding ``seed`` (empty when the seed is not in it)."""
    if not above[seed]:
        return np.zeros_like(above)
    labels, _ = ndi.label(above, SIX)
    return labels == labels[seed]


def _flood(pet: np.ndarray, region: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """Marker watershed inside ``region``: labelled voxels grow into 6-neighbours in order of
    decreasing SUV, so every voxel takes the label of the peak it drains to."""
    labels = np.where(region, markers, 0).astype(np.int32)
    flat_pet, flat_region, flat = pet.ravel(), region.ravel(), labels.ravel()
    shape, strides = pet.shape, np.cumprod((1, *pet.shape[:0:-1]))[::-1]
    heap: list[tuple[float, int, int]] = []

    def push_neighbours(i: int) -> None:
        coord = np.unravel_index(i, shape)
        for axis, stride in enumerate(strides):
            for step in (-1, 1):
                c = coord[axis] + step
                j = i + step * int(stride)
                if 0 <= c < shape[axis] and flat_region[j] and flat[j] == 0:
                    flat[j] = -1  # queued
                    heapq.heappush(heap, (-float(flat_pet[j]), j, flat[i]))

    for i in np.flatnonzero(flat > 0):
        push_neighbours(int(i))
    while heap:
        _, j, label = heapq.heappop(heap)
        flat[j] = label
        push_neighbours(j)
    return labels


def _split(pet: np.ndarray, comp: np.ndarray, seed: tuple[int, ...], ceiling: float) -> np.ndarray | None:
    """The part of ``comp`` hotter peaks (> ``ceiling``) drain to, to exclude; None when the seed
    cannot be separated from them (a hotter voxel touches it)."""
    levels = np.unique(pet[comp & (pet < pet[seed])])

    def separated(t: float) -> bool:
        return pet[_component_at(comp & (pet > t), seed)].max() <= ceiling

    if not levels.size or not separated(levels[-1]):
        return None
    lo, hi = 0, len(levels) - 1  # separated(levels[hi]) holds; find the lowest level that separates
    if separated(levels[0]):
        hi = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if separated(levels[mid]) else (mid, hi)
    cores, _ = ndi.label(comp & (pet > levels[hi]), SIX)
    hot_labels = np.unique(cores[comp & (pet > ceiling)])
    markers = np.where(cores == cores[seed], 1, 0) + np.where(np.isin(cores, hot_labels), 2, 0)
    return _flood(pet, comp, markers) == 2


def _seed_candidates(pet: np.ndarray, comp: np.ndarray, on_slice: np.ndarray, suv: float, tol: float) -> list:
    """Voxels of ``comp`` within ``tol`` of ``suv``: local maxima on the named image first, then other
    local maxima, then other voxels of the named image; closest value first within each group."""
    near = comp & (np.abs(pet - suv) <= tol + 1e-6)
    peak = pet >= ndi.maximum_filter(np.where(comp, pet, -np.inf), footprint=CUBE)
    groups = (near & peak & on_slice, near & peak & ~on_slice, near & ~peak & on_slice)
    out = []
    for group in groups:
        coords = np.argwhere(group)
        order = np.argsort(np.abs(pet[group] - suv), kind="stable")
        out += [tuple(int(v) for v in coords[i]) for i in order]
    return out


# ---------------------------------------------------------------------------- the labeller


def _find(pet, axis, index, suv, tol, keep) -> tuple[np.ndarray | None, np.ndarray | None, str, str]:
    """Step 1 and 2: (contour, excluded, status, reason)."""
    labels, _ = ndi.label(pet > first_threshold(suv), SIX)
    spans = [i + 1 for i, sl in enumerate(ndi.find_objects(labels)) if sl[axis].start <= index < sl[axis].stop]
    if keep is not None:
        spans = [i for i in spans if keep(labels == i)]
    if not spans:
        return None, None, "no-component", f"no component above SUV {first_threshold(suv):.2f} spans the image"
    maxima = ndi.maximum(pet, labels, spans)
    matched = [i for i, m in zip(spans, maxima) if abs(m - suv) <= tol + 1e-6]
    if len(matched) > 1:
        return None, None, "ambiguous", f"{len(matched)} components on the image have SUVmax {suv:.1f}"
    if matched:
        return labels == matched[0], np.zeros(pet.shape, bool), "matched", ""
    on_slice = np.zeros(pet.shape, bool)
    on_slice[(slice(None),) * axis + (index,)] = True
    found = []
    for i, m in zip(spans, maxima):
        comp = labels == i
        if m <= suv + tol:
            continue
        for seed in _seed_candidates(pet, comp, on_slice, suv, tol)[:5]:
            excluded = _split(pet, comp, seed, suv + tol)
            if excluded is not None and (comp & ~excluded & on_slice).any():
                found.append((comp & ~excluded, excluded))
                break
    if len(found) > 1:
        return None, None, "ambiguous", f"{len(found)} merged components on the image hold SUV {suv:.1f}"
    if found:
        return found[0][0], found[0][1], "matched-split", "split from hotter uptake at the first threshold"
    best = max(maxima)
    why = f"no component on the image has SUVmax {suv:.1f} (hottest {best:.1f})"
    if best > suv + tol:
        why += f" and no peak of {suv:.1f} on it can be split from the hotter uptake"
    return None, None, "no-component", why


def _refine(pet, contour, excluded, suv, tol, voxel_ml):
    """Step 3: (contour, threshold, splits, why, refined). ``refined`` is False when the refinement
    gave up and the last contour whose threshold passed the abort test (or, at the first step, the
    first-threshold contour) is returned with ``why``; contour None only when the contour joins hotter
    uptake that cannot be split off."""
    seed = np.unravel_index(np.argmax(np.where(contour, pet, -np.inf)), pet.shape)
    first, previous, splits = contour, first_threshold(suv), 0
    kept, kept_threshold, kept_what = contour, previous, "first-threshold contour kept"
    for step in range(1, MAX_ITERATIONS + 1):
        background = _background(pet, contour | first, excluded)
        threshold = itm_threshold(contour.sum() * voxel_ml, background, suv)
        if threshold / suv > ABORT_FRACTION or pet[seed] <= threshold:
            why = (
                f"T/SUVmax {threshold / suv:.2f} > {ABORT_FRACTION}"
                if threshold / suv > ABORT_FRACTION
                else f"T {threshold:.2f} reaches the SUVmax voxel ({pet[seed]:.2f})"
            )
            return kept, kept_threshold, splits, f"refinement aborted at {why}; {kept_what}", False
        contour = _component_at((pet > threshold) & ~excluded, seed)
        if pet[contour].max() > suv + tol:  # joined hotter uptake below the first threshold
            more = _split(pet, contour, seed, suv + tol)
            if more is None:
                return None, threshold, splits, "joins hotter uptake that cannot be split off", False
            excluded, contour, splits = excluded | more, contour & ~more, splits + 1
        if abs(threshold - previous) < CONVERGED * previous:
            return contour, threshold, splits, "", True
        kept, kept_threshold, kept_what = contour, threshold, f"contour of step {step} (T {threshold:.2f}) kept"
        previous = threshold
    why = f"threshold did not settle in {MAX_ITERATIONS} iterations; {kept_what}"
    return kept, kept_threshold, splits, why, False


def _side_check(meta: ImageMeta, laterality: str | None, midline_x_mm: float):
    """A predicate on components: is its centroid on the named side (LPS: +x is the patient's left)."""
    if laterality is None:
        return None
    if laterality not in ("left", "right"):
        raise ValueError(f"laterality must be 'left', 'right' or None, got {laterality!r}")
    affine = meta_affine(meta)

    def on_side(comp: np.ndarray) -> bool:
        x = (affine @ np.append(np.argwhere(comp).mean(axis=0), 1.0))[0]
        return (x > midline_x_mm) == (laterality == "left")

    return on_side


def weak_label(
    pet: np.ndarray,
    meta: ImageMeta,
    suvmax: float,
    image: int,
    *,
    tol: float = SUV_TOL,
    laterality: str | None = None,
    midline_x_mm: float = 0.0,
) -> WeakLabel:
    """The weak label of the lesion a sentence describes by ``suvmax`` (SUV) on axial ``image``
    (1-based from the most superior slice) in the SUV volume ``pet`` ((z, y, x), geometry ``meta``).
    ``laterality`` ('left'/'right', off by default: crops need not show the midline, given as
    ``midline_x_mm`` in world LPS x) keeps only components on that side."""
    pet = np.asarray(pet, dtype=np.float32)
    affine = meta_affine(meta)
    try:
        index = image_to_index(image, affine, pet.shape)
    except ValueError as exc:
        return WeakLabel(None, "bad-input", str(exc))
    if not np.isfinite(suvmax) or suvmax <= 0:
        return WeakLabel(None, "bad-input", f"SUVmax {suvmax} is not a positive number")
    if not np.isfinite(pet).all():
        return WeakLabel(None, "bad-input", "PET holds non-finite voxels")
    if pet.max() < suvmax - tol:
        return WeakLabel(None, "no-component", f"no voxel reaches SUV {suvmax:.1f} (PET max {pet.max():.1f})")
    keep = _side_check(meta, laterality, midline_x_mm)
    contour, excluded, status, reason = _find(pet, axial_axis(affine), index, suvmax, tol, keep)
    if contour is None:
        return WeakLabel(None, status, reason)
    voxel_ml = float(np.prod(meta.spacing)) / 1000.0
    contour, threshold, splits, why, refined = _refine(pet, contour, excluded, suvmax, tol, voxel_ml)
    if contour is None:
        return WeakLabel(None, "aborted", why, threshold=threshold)
    notes = [reason, f"split from hotter uptake during refinement ({splits}x)" if splits else ""]
    if splits:
        status = "matched-split"
    if not refined:
        status = "matched-unrefined"
        notes.append(why)
    reason = "; ".join(filter(None, notes))
    n = int(contour.sum())
    return WeakLabel(contour, status, reason, n, n * voxel_ml, float(pet[contour].max()), float(threshold))
