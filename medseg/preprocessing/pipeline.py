"""Preprocess one case (used identically by training and prediction) and a whole dataset.

The cache is one folder per configuration spacing, per case: ``CASE.npy`` (C, z, y, x float32),
``CASE_seg.npy`` (uint8, uint16 past 255 labels), ``CASE.json`` (geometry to undo the preprocessing) and
``CASE_fg.npz`` (sampled foreground coordinates per class, for oversampling); for a grounding dataset
also ``CASE_cond.npz`` (the sentence's embeddings and parsed facts, medseg.reports.dataset) and
``groups.json`` (case -> image case, so that folds keep the sentences of one image together).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from medseg.io.atomic import save_npy_atomic
from medseg.io.dataset import Case, list_cases, load_dataset_json
from medseg.io.image import ImageMeta, label_dtype
from medseg.io.jsonio import write_json
from medseg.planning.fingerprint import load_case
from medseg.planning.plan import Configuration, Plan
from medseg.preprocessing.cropping import crop_to_nonzero
from medseg.preprocessing.normalization import normalize
from medseg.preprocessing.orientation import reorient
from medseg.preprocessing.resampling import anisotropic_axis, full_target_spacing, resample_image, resample_label

FG_SAMPLES_PER_CLASS = 10_000


def preprocess_array(
    image: np.ndarray, meta: ImageMeta, plan: Plan, config: Configuration, label: np.ndarray | None = None
):
    """Reorient -> crop to non-zero -> normalise -> resample. Returns (data, seg, properties).

    With ``plan.orientation`` set, image and label are first brought to that voxel orientation
    (axis permutation and flips only); ``props["orientation"]`` records it so that export maps
    the prediction back onto the input's own grid, and every other geometry in ``props``
    (``meta``, ``original_shape``, ``bbox``, ...) is on the reoriented grid.
    """
    orientation = None
    if plan.orientation is not None:  # canonical voxel order first: crop, resampling and network see it
        if label is not None:
            label = reorient(label, meta, plan.orientation)[0]
        image, meta, orientation = reorient(image, meta, plan.orientation)
    original_shape = image.shape[1:]
    image, label, bbox, mask = crop_to_nonzero(image, label)
    data = normalize(image, plan.normalization, mask)
    spacing = meta.spacing
    target = full_target_spacing(spacing, config.spacing)  # a (y, x) target keeps z as it is
    axis = anisotropic_axis(spacing)  # thick slices in the input: never interpolate across them cubically
    if axis is None and config.separate_z:
        axis = config.anisotropic_axis
    data = resample_image(data, spacing, target, separate_z_axis=axis, clip=config.numerics == "nnunet")
    seg = None
    if label is not None:
        seg = resample_label(
            label, spacing, target, shape=data.shape[1:], num_classes=plan.num_classes, separate_z_axis=axis
        )
    props = {
        "meta": meta.to_json(),
        "original_shape": list(original_shape),
        "bbox": [list(b) for b in bbox],
        "shape_after_crop": list(image.shape[1:]),
        "shape_after_resampling": list(data.shape[1:]),
        "separate_z_axis": axis,
        "orientation": orientation,  # reorientation record (medseg.preprocessing.orientation), None: none
    }
    return data.astype(np.float32, copy=False), seg, props


def foreground_locations(seg: np.ndarray, num_classes: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for c in range(1, num_classes):
        idx = np.argwhere(seg == c)
        if len(idx) > FG_SAMPLES_PER_CLASS:
            idx = idx[rng.choice(len(idx), FG_SAMPLES_PER_CLASS, replace=False)]
        out[str(c)] = idx.astype(np.int32)
    return out


def _preprocess_one(args) -> str:
    case, plan, config, out_dir, seed, embeddings = args
    image, label, meta = load_case(case, len(plan.channel_names))
    data, seg, props = preprocess_array(image, meta, plan, config, label)
    if case.sentence is not None:
        from medseg.reports.dataset import sentence_conditions

        try:
            cond = sentence_conditions(case.sentence, embeddings, meta, image.shape[1:], props)
        except ValueError as exc:  # an image number outside the volume, slices not along z
            from medseg.errors import DatasetError

            raise DatasetError(case.label, f"sentence '{case.name}': {exc}") from None
        tmp = out_dir / f".{case.name}_cond.part.npz"
        np.savez(tmp, **cond)
        os.replace(tmp, out_dir / f"{case.name}_cond.npz")
    seg_dtype = label_dtype(plan.num_classes - 1)
    save_npy_atomic(out_dir / f"{case.name}.npy", data)
    save_npy_atomic(out_dir / f"{case.name}_seg.npy", seg.astype(seg_dtype))
    locs = foreground_locations(seg, plan.num_classes, seed)
    tmp = out_dir / f".{case.name}_fg.part.npz"
    np.savez(tmp, **locs)
    os.replace(tmp, out_dir / f"{case.name}_fg.npz")
    write_json(out_dir / f"{case.name}.json", props)  # written last: marks the case complete
    return case.name


def checked_record(preprocessed_dir: str | Path) -> Path:
    """Where the dataset's checked cases are recorded (medseg.io.verify.check_dataset)."""
    return Path(preprocessed_dir) / "checked_cases.json"


def cache_folder(preprocessed_dir: Path, config: Configuration) -> Path:
    """2d and 3d_fullres share data at the same spacing; lowres has its own."""
    return preprocessed_dir / ("data_" + "x".join(f"{s:.4g}" for s in config.spacing))


def preprocess_dataset(
    dataset_folder: str | Path,
    plan: Plan,
    config_name: str,
    preprocessed_dir: str | Path,
    *,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    from medseg.io.verify import check_dataset
    from medseg.utils import default_workers, track

    folder = Path(dataset_folder)
    check_dataset(folder, record=checked_record(preprocessed_dir), workers=workers, progress=progress)
    info = load_dataset_json(folder)
    cases: list[Case] = list_cases(folder, info)
    config = plan.configuration(config_name)
    out = cache_folder(Path(preprocessed_dir), config)
    out.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cases if overwrite or not (out / f"{c.name}.json").is_file()]
    embeddings = _sentence_embeddings(todo, info, Path(preprocessed_dir))
    jobs = [(c, plan, config, out, i, _for_case(embeddings, c)) for i, c in enumerate(todo)]
    workers = min(workers or default_workers(), max(len(jobs), 1))
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            for _ in track(
                pool.map(_preprocess_one, jobs, chunksize=2),
                total=len(jobs),
                description=f"preprocess {config_name}",
                enabled=progress,
            ):
                pass
    else:
        for job in track(jobs, description=f"preprocess {config_name}", enabled=progress):
            _preprocess_one(job)
    if any(c.group is not None for c in cases):
        write_json(Path(preprocessed_dir) / "groups.json", {c.name: c.group for c in cases})
    write_json(out / "cases.json", sorted(c.name for c in cases))
    return out


def _sentence_embeddings(cases: list[Case], info, preprocessed_dir: Path) -> dict:
    """Token embeddings of the grounding cases' sentences (one encoder load; {} for other datasets)."""
    sentences = [c.sentence for c in cases if c.sentence is not None]
    if not sentences:
        return {}
    from medseg.reports.dataset import encode_sentences

    return encode_sentences(sentences, info.text_encoder, preprocessed_dir / "text_cache")


def _for_case(embeddings: dict, case: Case) -> dict:
    if case.sentence is None:
        return {}
    from medseg.reports.dataset import strip_numbers

    return {s: embeddings[s] for s in (case.sentence, strip_numbers(case.sentence))}


def load_properties(cache: Path, case: str) -> dict:
    return json.loads((cache / f"{case}.json").read_text())
