"""``medseg reports generate`` (report-style sentences from measured lesion facts, labelled as
generated) and ``medseg reports weak-label`` (SUV-threshold weak labels from SUVmax + image number),
registered on the ``reports`` group of :mod:`medseg.cli.report_commands`."""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import typer

from medseg.cli import OVERWRITE_HELP, _fail
from medseg.cli.report_commands import reports

IN_COLUMNS = ("id", "case", "suvmax", "image")
OUT_COLUMNS = ("id", "case", "status", "reason", "voxels", "ml", "suvmax_inside", "threshold")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def write_csv_atomic(rows: list[dict], columns: tuple[str, ...], path: Path) -> Path:
    """Write ``rows`` as CSV to a temporary file beside ``path``, then rename it into place."""
    from medseg.io.atomic import temp_file_beside

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file_beside(path)
    try:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@reports.command("generate")
def generate(
    input: Path = typer.Option(..., "-i", "--input", help="Dataset folder with lesions.csv (sts_fdg_petct layout)."),
    output: Path = typer.Option(..., "-o", "--output", help="CSV of generated sentences to write."),
    per_lesion: int = typer.Option(3, "--per-lesion", help="Sentences per lesion, each in another phrasing."),
    seed: int = typer.Option(0, "--seed", help="Random seed (the same seed gives the same sentences)."),
    slice_mode: str = typer.Option(
        "suvmax", "--slice", help="suvmax (the SUVmax voxel's image) | range (any image inside the lesion)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """Write GENERATED report-style sentences (not clinical text) from each lesion's measured SUVmax
    and image number."""
    from medseg.outputs import check_new_outputs
    from medseg.reports.generate import COLUMNS, SLICE_MODES, generate_sentences, lesion_facts

    if per_lesion < 1:
        _fail(f"--per-lesion must be >= 1, got {per_lesion}")
    if slice_mode not in SLICE_MODES:
        _fail(f"--slice: expected one of {', '.join(SLICE_MODES)}, got {slice_mode!r}")
    if not input.is_dir():
        _fail(f"{input}: not a folder")
    check_new_outputs([output], overwrite=overwrite)
    rows = generate_sentences(lesion_facts(input), per_lesion=per_lesion, seed=seed, slice_mode=slice_mode)
    write_csv_atomic(rows, COLUMNS, output)
    phrasings = len({r["sentence"] for r in rows})
    print(
        f"{len(rows)} generated sentences ({len({r['case'] for r in rows})} lesions, {phrasings} distinct) -> {output}"
    )
    print("note: generated text from measured facts (source column), not clinical reports")


# ---------------------------------------------------------------------------- weak-label


def _read_table(path: Path) -> list[dict]:
    """IN.csv rows; a one-line failure for file-level problems (missing, empty, columns, ids)."""
    if not path.is_file():
        _fail(f"{path}: file not found")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = reader.fieldnames or []
    if not header:
        _fail(f"{path}: empty CSV (expected a header {','.join(IN_COLUMNS)})")
    missing = [c for c in IN_COLUMNS if c not in header]
    if missing:
        _fail(f"{path}: missing column(s) {', '.join(missing)} (needs {','.join(IN_COLUMNS)})")
    if not rows:
        _fail(f"{path}: no rows")
    ids = [(r["id"] or "").strip() for r in rows]
    bad = next((i for i in ids if not SAFE_ID.match(i)), None)
    if bad is not None:
        _fail(f"{path}: id {bad!r} cannot name a file (letters, digits, '.', '_', '-')")
    dup = next((i for i, n in Counter(ids).items() if n > 1), None)
    if dup is not None:
        _fail(f"{path}: id {dup!r} appears more than once")
    return rows


class _Volumes:
    """PET volumes read once per case, with the per-case input problem (missing file, CT grid)."""

    def __init__(self, images: Path, channel: int):
        self.images, self.channel, self.cache = images, channel, {}

    def get(self, case: str):
        if case not in self.cache:
            self.cache[case] = self._load(case)
        return self.cache[case]

    def _load(self, case: str):
        from medseg.errors import ImageReadError
        from medseg.io.image import read_image
        from medseg.io.verify import geometry_problem

        if not SAFE_ID.match(case):
            return None, None, f"case {case!r} cannot name a file"
        path = self.images / f"{case}_{self.channel:04d}.nii.gz"
        if not path.is_file():
            return None, None, f"PET channel _{self.channel:04d} missing: {path}"
        try:
            pet, meta = read_image(path)
            ct_path = self.images / f"{case}_0000.nii.gz"
            if self.channel != 0 and ct_path.is_file():
                _, ct_meta = read_image(ct_path)
                problem = geometry_problem(ct_meta, meta, "the PET")
                if problem:
                    return None, None, f"CT _0000 is on another grid than the PET: {problem}"
        except ImageReadError as exc:
            return None, None, exc.one_line()
        return pet, meta, ""


def _label_row(row: dict, volumes: _Volumes):
    """(result row, mask or None) for one IN row."""
    from medseg.reports.weak_label import WeakLabel, weak_label

    case = (row["case"] or "").strip()
    try:
        suvmax, image = float(row["suvmax"]), int(str(row["image"]).strip())
    except (TypeError, ValueError):
        result = WeakLabel(None, "bad-input", f"suvmax {row['suvmax']!r} / image {row['image']!r} are not numbers")
        return _result_row(row, result), None, None
    pet, meta, problem = volumes.get(case)
    result = WeakLabel(None, "bad-input", problem) if problem else weak_label(pet, meta, suvmax, image)
    return _result_row(row, result), result.mask, meta


def _result_row(row: dict, result) -> dict:
    def num(v: float) -> str:
        return "" if v is None or math.isnan(v) else f"{v:.3f}"

    return {
        "id": row["id"].strip(),
        "case": (row["case"] or "").strip(),
        "status": result.status,
        "reason": result.reason,
        "voxels": result.voxels,
        "ml": num(result.ml) if result.ok else "",
        "suvmax_inside": num(result.suvmax_inside),
        "threshold": num(result.threshold),
    }


@reports.command("weak-label")
def weak_label_command(
    table: Path = typer.Argument(
        ..., metavar="IN.csv", help="CSV with id,case,suvmax,image (image: 1-based from the top)."
    ),
    images: Path = typer.Option(..., "--images", help="Folder of <case>_000<k>.nii.gz images."),
    pet_channel: int = typer.Option(1, "--pet-channel", help="Channel k of the PET in SUV (autoPET: 1)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder: <id>.nii.gz and weak_labels.csv."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """Weak labels from report facts: the PET threshold contour of the lesion with that SUVmax on that
    image (ConTEXTual Net 3D's labeller; masks only for matched rows)."""
    from medseg.io.atomic import temp_dir_beside
    from medseg.io.image import check_writable_dir, write_image
    from medseg.outputs import check_new_outputs

    if not 0 <= pet_channel <= 9999:
        _fail(f"--pet-channel must be 0-9999, got {pet_channel}")
    if not images.is_dir():
        _fail(f"{images}: not a folder")
    rows = _read_table(table)
    summary = output / "weak_labels.csv"
    masks = {r["id"].strip(): output / f"{r['id'].strip()}.nii.gz" for r in rows}
    check_writable_dir(output)
    check_new_outputs([summary, *masks.values()], overwrite=overwrite)
    output.mkdir(parents=True, exist_ok=True)
    staging = temp_dir_beside(summary)  # everything lands here first: an interrupted run leaves nothing
    try:
        volumes, results = _Volumes(images, pet_channel), []
        for row in rows:
            result, mask, meta = _label_row(row, volumes)
            results.append(result)
            if mask is not None:
                write_image(mask.astype("uint8"), meta, staging / masks[result["id"]].name)
        write_csv_atomic(results, OUT_COLUMNS, staging / summary.name)
        for result in results:
            ok = (staging / masks[result["id"]].name).is_file()
            if ok:
                os.replace(staging / masks[result["id"]].name, masks[result["id"]])
            else:
                masks[result["id"]].unlink(missing_ok=True)  # a mask of an earlier run (--overwrite)
        os.replace(staging / summary.name, summary)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    counts = Counter(r["status"] for r in results)
    written = sum(1 for result in results if masks[result["id"]].is_file())  # every status in MATCHED
    print(", ".join(f"{status} {n}" for status, n in sorted(counts.items())))
    print(f"{written} weak label(s) of {len(results)} row(s) -> {output} (+ {summary.name})")
