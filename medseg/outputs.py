"""Where a command's outputs go, and the one rule for outputs that already exist.

**Side outputs** (statistics, previews, a DICOM-SEG next to a label map) are named after the main
output: ``-o seg.nii.gz`` gives ``seg_statistics.json`` and ``seg_preview.png`` beside it, so two
runs into one folder never write the same fixed name (``statistics.json``) over each other. An
output that is a folder holds its side outputs under plain names (``OUT/statistics.json``).

**Existing outputs** are never replaced silently. Commands that fill a folder case by case
(``predict``, ``cohort``) skip the cases already done, so an interrupted run resumes; commands
that write named files or folders (``ct``, ``ct-stats``, ``dicom-seg``, ``evaluate``,
``export-model``, ``import-nnunet``, ``convert-msd``, ``cohort-analyse``) refuse when one exists;
``train`` refuses a fold that has a checkpoint unless ``--resume``. ``--overwrite``
redoes or replaces them in both cases. The check runs before any work, so a refusal costs nothing
and writes nothing.
"""

from __future__ import annotations

from pathlib import Path

from medseg.errors import OutputError

IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm")


def stem(path: str | Path) -> str:
    """``seg.nii.gz`` -> ``seg`` (double endings of images removed whole)."""
    name = Path(path).name
    for ending in IMAGE_ENDINGS:
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return Path(name).stem


def side_output(output: str | Path, name: str, *, into_folder: bool) -> Path:
    """The path of side output ``name`` (e.g. ``statistics.json``) of ``output``: inside it when
    the output is a folder, else beside it as ``<stem>_<name>`` (``seg_statistics.json``)."""
    output = Path(output)
    if into_folder:
        return output / name
    return output.with_name(f"{stem(output)}_{name}")


def check_new_outputs(paths, *, overwrite: bool) -> None:
    """Refuse (OutputError naming the first) if any of ``paths`` exists, unless ``overwrite``."""
    if overwrite:
        return
    existing = [Path(p) for p in paths if Path(p).exists()]
    if existing:
        more = f" (and {len(existing) - 1} more of this run's outputs)" if len(existing) > 1 else ""
        raise OutputError(existing[0], f"already exists{more}; pass --overwrite to replace it or choose another output")
