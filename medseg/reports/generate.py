"""Report-style sentences **generated** from measured lesion facts: training and test text for
text-guided lesion segmentation where no real report exists.

Every sentence is synthetic. It is written from a template with the lesion's real facts (SUVmax to
one decimal, the axial image number of its SUVmax voxel or of another slice inside the lesion, and
laterality or site only when the facts row gives them), never from a patient's report, and must
never be presented as clinical text: every row carries ``generated=True`` and
``source='generated:medseg.reports.generate v1'``.

Image numbers follow the weak labeller's convention (1-based from the most superior slice, see
:func:`medseg.reports.weak_label.image_to_index`). Generation is seeded per case, so a case's
sentences do not change when other cases are added.
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import numpy as np

from medseg.errors import DatasetError

GENERATOR_VERSION = "1"
SOURCE = f"generated:medseg.reports.generate v{GENERATOR_VERSION}"
COLUMNS = ("id", "case", "sentence", "suvmax", "image", "generated", "source")
SLICE_MODES = ("suvmax", "range")

# {lesion} a noun phrase ({noun} without "soft tissue"), {where} " in the left thigh" or "" (only from known facts), {avid} an
# adjective graded by SUVmax, {series} a PET series number (series:image notation).
TEMPLATES = (
    "Hypermetabolic {lesion}{where}, SUVmax {suv}, image {image}.",
    "FDG-avid {lesion}{where} (SUV max {suv}) on axial image #{image}.",
    "On image {image} there is a {avid} {lesion}{where} with maximum SUV of {suv}.",
    "{Lesion}{where} with SUVmax {suv} (series {series}, image {image}).",
    "{Lesion}{where} measuring SUV max {suv}, series {series} image {image}.",
    "{Uptake} FDG uptake in a {lesion}{where}, max SUV {suv} ({series}:{image}).",
    "Image {image}: hypermetabolic {lesion}{where}, SUVmax {suv}.",
    "SUVmax {suv} in the {lesion}{where} on image {image}.",
    "There is a {avid} {lesion}{where}, SUVmax {suv}, seen on image {image}.",
    "The {lesion}{where} demonstrates {uptake} FDG avidity with an SUVmax of {suv} (image {image}).",
    "Hypermetabolic soft tissue {noun}{where}, SUV max = {suv}, axial image {image}.",
    "{Avid} {lesion}{where}: SUVmax {suv}, image {series}:{image}.",
    "Focal {uptake} uptake{where} corresponding to a {lesion}, max SUV {suv}, image {image}.",
    "A {lesion}{where} with increased FDG uptake (SUVmax {suv}) is seen on image {image} of series {series}.",
    "Max SUV {suv} within a {avid} {lesion}{where} (axial {image}).",
    "Hypermetabolic {lesion}{where} (image {image}, SUVmax {suv}).",
    "On axial PET image {image}, the {lesion}{where} has an SUVmax of {suv}.",
    "FDG-avid {lesion}{where}; SUV max {suv}; image no. {image}.",
    "{Lesion}{where} is hypermetabolic with SUVmax of {suv} on series {series}, image {image}.",
    "Increased metabolic activity in the {lesion}{where} (SUVmax {suv}, im {image}).",
    "The dominant {lesion}{where} is {avid}, SUVmax {suv}, image #{image}.",
    "There is an FDG-avid {lesion}{where} on image {image} with an SUV max of {suv}.",
    "{Avid} soft tissue {noun}{where}, SUVmax {suv} (image {image}).",
    "Image {series}:{image} shows a {avid} {lesion}{where}, maximum SUV {suv}.",
    "SUV max of {suv} is measured in the {lesion}{where}, axial image {image}.",
    "{Lesion}{where}, SUVmax {suv}, image {image}.",
)
LESIONS = ("mass", "soft tissue mass", "lesion", "soft tissue lesion", "tumor")
SERIES = (3, 4, 5, 6)


def _grade(suv: float) -> tuple[str, str]:
    """(adjective phrase, uptake adjective) graded by SUVmax, so "intense" never meets an SUV of 3."""
    if suv < 4:
        return "mildly FDG-avid", "mild"
    if suv < 8:
        return "moderately FDG-avid", "moderate"
    return "intensely FDG-avid", "intense"


def _where(row: dict) -> str:
    """The phrase ' in the left thigh' from the facts row's ``laterality``/``site`` when known, else ''."""
    site = str(row.get("site") or "").strip()
    side = str(row.get("laterality") or "").strip().lower()
    if not site:
        return ""
    return f" in the {side} {site}" if side in ("left", "right") else f" in the {site}"


def _sentence(template: str, row: dict, image: int, rng: random.Random) -> str:
    avid, uptake = _grade(float(row["suvmax"]))
    lesion = rng.choice(LESIONS)
    fields = {
        "suv": f"{float(row['suvmax']):.1f}",
        "image": image,
        "series": rng.choice(SERIES),
        "where": _where(row),
        "lesion": lesion,
        "noun": lesion.split()[-1],
        "Lesion": lesion[0].upper() + lesion[1:],
        "avid": avid,
        "Avid": avid[0].upper() + avid[1:],
        "uptake": uptake,
        "Uptake": uptake[0].upper() + uptake[1:],
    }
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", template.format(**fields))  # "a intensely" -> "an ..."


def _image_for(row: dict, mode: str, rng: random.Random) -> int:
    if mode == "suvmax" or not row.get("image_range"):
        return int(row["image"])
    lo, hi = sorted(int(v) for v in row["image_range"])
    return rng.randint(lo, hi)


def generate_sentences(
    facts_rows: list[dict], *, per_lesion: int = 3, seed: int = 0, slice_mode: str = "suvmax"
) -> list[dict]:
    """``per_lesion`` generated sentences per facts row (``case``, ``suvmax``, ``image``; optional
    ``image_range`` [first, last] image numbers, ``laterality``, ``site``), each in a different
    phrasing. ``slice_mode='range'`` names a random image inside the lesion instead of the SUVmax
    voxel's. Rows: ``id, case, sentence, suvmax, image, generated, source``."""
    if slice_mode not in SLICE_MODES:
        raise ValueError(f"slice_mode must be one of {SLICE_MODES}, got {slice_mode!r}")
    if per_lesion < 1:
        raise ValueError(f"per_lesion must be >= 1, got {per_lesion}")
    out = []
    for row in facts_rows:
        rng = random.Random(f"{seed}:{row['case']}")
        picks = [rng.randrange(len(TEMPLATES)) for _ in range(per_lesion)]
        if per_lesion <= len(TEMPLATES):
            picks = rng.sample(range(len(TEMPLATES)), per_lesion)
        for n, k in enumerate(picks, start=1):
            image = _image_for(row, slice_mode, rng)
            suv = round(float(row["suvmax"]), 1)
            out.append(
                {
                    "id": f"{row['case']}_s{n:02d}",
                    "case": row["case"],
                    "sentence": _sentence(TEMPLATES[k], row, image, rng),
                    "suvmax": suv,
                    "image": image,
                    "generated": True,
                    "source": SOURCE,
                }
            )
    return out


# ---------------------------------------------------------------------------- facts from a dataset


def _pet_path(data_dir: Path, case: str, split: str) -> Path:
    folders = [split] if split else []
    folders += [p.name for p in sorted(data_dir.glob("images*")) if p.name not in folders]
    for folder in folders:
        path = data_dir / folder / f"{case}_0001.nii.gz"
        if path.is_file():
            return path
    raise DatasetError(data_dir, f"no PET (_0001) image for case {case} in {', '.join(folders) or 'images*/'}")


def _image_range(label_path: Path, affine: np.ndarray, row: dict, axis: int) -> list[int] | None:
    """First and last image number of the lesion: from its mask, else from ``lesion_slice_range_k``
    (voxel index k, array axis 0) when that is the axial axis."""
    from medseg.io.image import read_image
    from medseg.reports.weak_label import index_to_image

    if label_path.is_file():
        mask, _ = read_image(label_path)
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        if idx.size:
            shape = mask.shape
            return sorted(index_to_image(int(i), affine, shape) for i in (idx[0], idx[-1]))
    if row.get("lesion_slice_range_k") and axis == 0:
        lo, hi = json.loads(row["lesion_slice_range_k"])
        shape = json.loads(row["shape"])[::-1]
        return sorted(index_to_image(int(i), affine, shape) for i in (lo, hi))
    return None


def lesion_facts(data_dir: str | Path) -> list[dict]:
    """One facts row per lesion of ``DATA_DIR/lesions.csv`` (sts_fdg_petct layout): ``case``,
    ``suvmax`` (as measured), ``image`` (image number of the SUVmax voxel), ``image_range``
    (first and last image of the lesion), ``pet`` (path). ``suvmax_voxel_ijk`` is in ITK/NIfTI
    voxel order (i, j, k) = (x, y, z), the reverse of medseg's (z, y, x) arrays."""
    from medseg.io.image import read_image
    from medseg.reports.weak_label import axial_axis, index_to_image, meta_affine

    data_dir = Path(data_dir)
    table = data_dir / "lesions.csv"
    if not table.is_file():
        raise DatasetError(table, "not found (expected a lesions.csv with case, suvmax, suvmax_voxel_ijk)")
    with table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"case", "suvmax", "suvmax_voxel_ijk"} - set(rows[0] if rows else ())
    if not rows or missing:
        raise DatasetError(table, f"missing columns {', '.join(sorted(missing))}" if rows else "holds no rows")
    facts = []
    for row in rows:
        split = row.get("split", "")
        pet = _pet_path(data_dir, row["case"], split)
        arr, meta = read_image(pet)
        affine = meta_affine(meta)
        axis = axial_axis(affine)
        voxel = tuple(json.loads(row["suvmax_voxel_ijk"]))[::-1]
        label = data_dir / split.replace("images", "labels", 1) / f"{row['case']}.nii.gz"
        facts.append(
            {
                "case": row["case"],
                "suvmax": float(row["suvmax"]),
                "image": index_to_image(voxel[axis], affine, arr.shape),
                "image_range": _image_range(label, affine, row, axis),
                "pet": str(pet),
            }
        )
    return facts
