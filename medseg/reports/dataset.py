"""Grounding datasets: the raw layout plus ``sentences.csv``, one training case per sentence.

    DATASET/dataset.json              (as any dataset; optional "text_encoder": "minilm" or a folder)
    DATASET/imagesTr/<case>_000k.*    (PET and CT channels of each image case)
    DATASET/sentences.csv             (id,case,sentence: one row per finding)
    DATASET/labelsTr/<id>.*           (the mask of the lesion that sentence names)

:func:`grounding_cases` turns it into :class:`~medseg.io.dataset.Case` s named by sentence id, each
with its image case's channels, its own label, its sentence and its group (the image case: folds
never split the sentences of one image). Preprocessing then writes, beside each case,
``<id>_cond.npz`` (:func:`sentence_conditions`): the sentence's token embeddings (``text``,
``text_mask``), those of the sentence with its numbers removed (``text_nonum``, the paper's input),
and the parsed facts: ``suvmax`` and ``points``, the named image's position in the preprocessed
array (NaN when the sentence lacks the number).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from medseg.errors import DatasetError

SENTENCES = "sentences.csv"
_NUMBER = re.compile(r"(?<![A-Za-z\d-])[#(]?\d+(?:[.,:/]\d+)*\)?")


def is_grounding_dataset(folder: str | Path) -> bool:
    return (Path(folder) / SENTENCES).is_file()


def read_sentences(folder: str | Path) -> list[dict[str, str]]:
    """The rows of ``sentences.csv`` (id, case, sentence), checked: columns, unique ids, no empty text."""
    from medseg.reports.parse import read_table

    path = Path(folder) / SENTENCES
    rows = read_table(path)  # one-line errors for empty files, bad headers, duplicate ids
    for i, row in enumerate(rows, start=2):
        for key in ("case", "sentence"):
            if not (row.get(key) or "").strip():
                raise DatasetError(path, f"line {i}: empty or missing '{key}'")
    return rows


def grounding_cases(folder: Path, info, image_groups: dict[str, dict[int, Path]], strict: bool = True) -> list:
    """One :class:`Case` per sentence: its image case's channels, ``labelsTr/<id>``, sentence, group."""
    from medseg.io.dataset import Case

    cases = []
    for row in read_sentences(folder):
        chans = image_groups.get(row["case"])
        if chans is None:
            raise DatasetError(folder / SENTENCES, f"sentence '{row['id']}' names image case '{row['case']}', "
                               "which has no images in imagesTr")  # fmt: skip
        label = folder / "labelsTr" / f"{row['id']}{info.file_ending}"
        if not label.is_file():
            if strict:
                raise DatasetError(label, f"missing label file of sentence '{row['id']}'")
            label = None
        missing = [i for i in range(info.num_channels) if i not in chans]
        if missing and strict:
            raise DatasetError(folder / "imagesTr" / f"{row['case']}_{missing[0]:04d}{info.file_ending}",
                               "missing channel file")  # fmt: skip
        images = tuple(chans[i] for i in sorted(chans))
        cases.append(Case(row["id"], images, label, sentence=row["sentence"], group=row["case"]))
    return cases


def strip_numbers(sentence: str) -> str:
    """The sentence without its numbers (SUV values, image and series numbers), as the paper encodes it."""
    return re.sub(r"\s+", " ", _NUMBER.sub("", sentence)).strip()


def sentence_facts(sentence: str) -> tuple[float, int | None]:
    """(SUVmax or NaN, image number or None) as the report parser reads them (dropped sentences too)."""
    from medseg.reports.parse import parse_sentence

    facts = parse_sentence(sentence)
    return (float("nan") if facts.suvmax is None else float(facts.suvmax)), facts.image


def image_point(image_number: int | None, meta, shape) -> np.ndarray:
    """(1, 3) input voxel coordinates (z, y, x) of the named image: its index along the axial axis, the
    volume's centre on the others; NaN without an image number. ValueError outside the volume."""
    from medseg.reports.weak_label import axial_axis, image_to_index, meta_affine

    point = (np.asarray(shape, dtype=np.float64) - 1) / 2
    if image_number is None:
        return np.full((1, 3), np.nan)
    affine = meta_affine(meta)
    axis = axial_axis(affine)
    if axis != 0:
        raise ValueError("grounding needs the axial slices along the first voxel axis (z); this image has them "
                         f"along axis {axis}: give the plan an orientation")  # fmt: skip
    point[axis] = image_to_index(image_number, affine, shape)
    return point[None]


def sentence_conditions(sentence: str, embeddings: dict, meta, shape, props: dict) -> dict[str, np.ndarray]:
    """The arrays of ``<id>_cond.npz``; ``embeddings`` maps a sentence to (tokens (L, D), mask (L,))."""
    from medseg.inference.conditions import points_to_preprocessed

    suvmax, image = sentence_facts(sentence)
    point = image_point(image, meta, shape)
    text, text_mask = embeddings[sentence]
    text_nonum, text_nonum_mask = embeddings[strip_numbers(sentence)]
    return {
        "text": text.astype(np.float32), "text_mask": text_mask.astype(bool),
        "text_nonum": text_nonum.astype(np.float32), "text_nonum_mask": text_nonum_mask.astype(bool),
        "suvmax": np.float32(suvmax),
        "points": points_to_preprocessed(point, props).astype(np.float32) if np.isfinite(point).all() else point,
    }  # fmt: skip


def encode_sentences(sentences: list[str], encoder: str, cache_dir: Path) -> dict:
    """Token embeddings of every sentence and of its number-free version, from one encoder load."""
    from medseg.text.encoder import SentenceEncoder

    texts = list(dict.fromkeys([*sentences, *(strip_numbers(s) for s in sentences)]))
    enc = SentenceEncoder(encoder, cache_dir=cache_dir)
    tokens, masks = enc.encode(texts)
    return {t: (tokens[i], masks[i]) for i, t in enumerate(texts)}
