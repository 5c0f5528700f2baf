"""``medseg ground``: the lesion a report sentence names, as a 3D mask (ConTEXTual Net 3D).

For each sentence the model's conditions are built as in training (:mod:`medseg.reports.dataset`):
the sentence's token embeddings and those of its number-free version from the model's frozen
encoder, and the parsed facts (SUVmax; the named image's position, mapped through the affine and
the preprocessing like any point). The Predictor returns class probabilities; as in the paper, of
the predicted components only the one with the highest mean lesion probability is kept. Outputs:
``OUT/<id>.nii.gz`` (the input's geometry, written atomically), ``OUT/<id>_overlay.png`` (the PET's
maximum-intensity projection with the mask) and ``OUT/grounding.csv`` (id, sentence, the parsed
facts, voxels, mL, SUVmax inside, mean probability).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError


def keep_most_probable_component(seg: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, float]:
    """The 6-connected component of ``seg`` > 0 with the highest mean ``prob`` (and that mean)."""
    import cc3d

    cc, n = cc3d.connected_components(seg > 0, connectivity=6, return_N=True)
    if n == 0:
        return np.zeros_like(seg, dtype=np.uint8), 0.0
    sums = np.bincount(cc.ravel(), weights=prob.ravel(), minlength=n + 1)
    sizes = np.bincount(cc.ravel(), minlength=n + 1)
    means = sums[1:] / np.maximum(sizes[1:], 1)
    best = int(np.argmax(means)) + 1
    return (cc == best).astype(np.uint8), float(means[best - 1])


def sentence_inputs(sentence: str, encoder, image: np.ndarray, meta) -> dict:
    """The model's conditions for one sentence on ``image`` (C, z, y, x) as read."""
    from medseg.reports.dataset import image_point, sentence_facts, strip_numbers

    suvmax, number = sentence_facts(sentence)
    try:
        point = image_point(number, meta, image.shape[1:])
    except ValueError as exc:
        raise MedsegError(None, f"sentence {sentence!r}: {exc}") from None
    stripped = strip_numbers(sentence)
    tokens, masks = encoder.encode([sentence, stripped])
    cond = {"text": tokens[0][None], "text_mask": masks[0][None], "text_nonum": tokens[1][None],
            "text_nonum_mask": masks[1][None], "suvmax": np.array([suvmax], np.float32)}  # fmt: skip
    if np.isfinite(point).all():
        cond["points"] = point
    return cond


def coronal_mip(volume: np.ndarray, meta) -> np.ndarray:
    """Maximum-intensity projection along the patient's anterior-posterior axis, as a viewer shows a
    coronal MIP: superior at the top, the patient's right on the image's left (radiological), whatever
    the voxel order of ``volume`` ((z, y, x) as read, geometry ``meta``)."""
    from medseg.reports.weak_label import axial_axis, meta_affine

    affine = meta_affine(meta)
    si = axial_axis(affine)
    rest = [a for a in range(3) if a != si]
    ap = max(rest, key=lambda a: abs(affine[1, a]))
    lr = next(a for a in rest if a != ap)
    mip = np.moveaxis(volume.max(axis=ap), (si - (si > ap), lr - (lr > ap)), (0, 1))
    if affine[2, si] > 0:  # index grows towards the head (LPS z = superior): flip so the head is on top
        mip = mip[::-1]
    if affine[0, lr] < 0:  # index grows towards the patient's right: flip so the right is on the left
        mip = mip[:, ::-1]
    return mip


def _mip_overlay(pet: np.ndarray, mask: np.ndarray, meta, path: Path) -> Path:
    """Coronal maximum-intensity projection of the PET (inverted grey, as PET is read) with the mask."""
    from PIL import Image

    mip = coronal_mip(pet, meta)
    hi = float(np.percentile(mip, 99.5)) or 1.0
    grey = 255 - np.clip(mip / hi * 255, 0, 255)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    m = coronal_mip(mask, meta) > 0
    rgb[m] = 0.5 * rgb[m] + 0.5 * np.array([230, 40, 40])
    im = Image.fromarray(np.ascontiguousarray(rgb).astype(np.uint8)).resize(
        (mip.shape[1] * 4, mip.shape[0] * 4), Image.NEAREST
    )
    tmp = path.with_name(f".{path.name}.part.png")
    im.save(tmp)
    tmp.replace(path)
    return path


def ground_sentences(predictor, encoder, image: np.ndarray, meta, sentences: list[dict], *, use_facts=True):
    """For each ``{"sentence"}`` on ``image`` ((C, z, y, x) as read, geometry ``meta``): the mask of the
    most probable predicted component (uint8, the input's grid), its mean probability and the
    conditions used. ``use_facts``: first drop what the sentence's numbers rule out (:func:`facts_filter`).
    Every sentence's conditions are built (and checked) before the first prediction."""
    conds = [sentence_inputs(r["sentence"], encoder, image, meta) for r in sentences]
    return (_ground_one(predictor, image, meta, cond, use_facts) for cond in conds)


def facts_filter(seg: np.ndarray, pet: np.ndarray, cond: dict, tol: float = 0.1) -> np.ndarray:
    """The predicted lesion voxels the sentence's facts allow: none hotter than the reported SUVmax
    (+ ``tol``; it is the lesion's maximum, so hotter voxels belong to other uptake) and, when an image
    is named and some remaining component reaches it, only the components that do. Without the
    numbers, the prediction unchanged."""
    keep = seg > 0
    suvmax = float(cond["suvmax"][0])
    if np.isfinite(suvmax):
        keep &= pet <= suvmax + tol
    if "points" in cond:
        import cc3d

        cc = cc3d.connected_components(keep, connectivity=6)
        on_image = np.unique(cc[int(round(float(cond["points"][0, 0])))])
        on_image = on_image[on_image > 0]
        if on_image.size:
            keep = np.isin(cc, on_image)
    return keep


def _ground_one(predictor, image: np.ndarray, meta, cond: dict, use_facts: bool) -> tuple[np.ndarray, float, dict]:
    seg, probs = predictor.predict_array(image, meta, return_probabilities=True, **cond)
    if use_facts:
        seg = facts_filter(seg, image[int(predictor.spec.model_kwargs.get("pet_channel", 1))], cond)
    return (*keep_most_probable_component(seg, probs[1]), cond)


def ground(model, images: list[Path], sentences: list[dict], output: Path, *, overwrite=False, tta=True,
           device="auto", use_facts=True, echo=print) -> list[dict]:  # fmt: skip
    """Segment, for each ``{"id", "sentence"}``, the lesion it names on the case ``images`` (channel files)."""
    from medseg.inference.predictor import Predictor
    from medseg.io.image import read_image, write_image
    from medseg.io.jsonio import write_text_atomic
    from medseg.outputs import check_new_outputs
    from medseg.text.encoder import SentenceEncoder

    output = Path(output)
    check_new_outputs([output / f"{r['id']}.nii.gz" for r in sentences] + [output / "grounding.csv"],
                      overwrite=overwrite)  # fmt: skip
    predictor = Predictor.from_folder(model, device=device, tta=tta)
    if predictor.task.name != "grounding":
        raise MedsegError(model, f"is a {predictor.task.name} model, not a grounding model (contextual_unet)")
    encoder = SentenceEncoder(predictor.spec.model_kwargs.get("text_encoder", "minilm"))
    arrays = [read_image(p) for p in images]
    image = np.stack([a for a, _ in arrays]).astype(np.float32)
    meta = arrays[0][1]
    pet = image[int(predictor.spec.model_kwargs.get("pet_channel", 1))]
    grounded = ground_sentences(
        predictor, encoder, image, meta, sentences, use_facts=use_facts
    )  # every error before output
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for r, (mask, mean_p, cond) in zip(sentences, grounded):
        write_image(mask, meta, output / f"{r['id']}.nii.gz")
        _mip_overlay(pet, mask, meta, output / f"{r['id']}_overlay.png")
        voxel_ml = float(np.prod(meta.spacing)) / 1000
        rows.append({"id": r["id"], "sentence": r["sentence"], "suvmax_reported": cond["suvmax"][0],
                     "voxels": int(mask.sum()), "ml": round(int(mask.sum()) * voxel_ml, 3),
                     "suvmax_inside": round(float(pet[mask > 0].max()), 2) if mask.any() else "",
                     "mean_probability": round(mean_p, 4)})  # fmt: skip
        echo(f"{r['id']}: {rows[-1]['voxels']} voxels ({rows[-1]['ml']} mL), SUVmax inside {rows[-1]['suvmax_inside']}")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(output / "grounding.csv", buf.getvalue())
    return rows
