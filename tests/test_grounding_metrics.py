"""The published grounding F1 (medseg.evaluation.grounding): component rule, pooling, real crops."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.evaluation.grounding import match_components, pooled_f1
from tests.conftest import SHARED_DATA, require

STS = SHARED_DATA / "sts_fdg_petct"


def _scene():
    """A PET with a lesion (SUVmax 6.0) and a hotter blob (9.0) apart from it."""
    pet = np.ones((12, 12, 12), np.float32)
    pet[2:5, 2:5, 2:5] = 5.0
    pet[3, 3, 3] = 6.0
    pet[8:11, 8:11, 8:11] = 9.0
    label = np.zeros(pet.shape, np.uint8)
    label[2:5, 2:5, 2:5] = 1
    return pet, label


def test_the_lesion_itself_is_a_true_positive():
    pet, label = _scene()
    m = match_components(label, label, pet)
    assert (m["tp"], m["fp"], m["fn"], m["components"]) == (1, 0, 0, 1)
    assert m["dice"] == 1.0 and m["hit"] and m["suvmax_label"] == 6.0


def test_the_hotter_distractor_is_a_false_positive_and_a_miss():
    pet, label = _scene()
    pred = (pet == 9.0).astype(np.uint8)
    m = match_components(pred, label, pet)
    assert (m["tp"], m["fp"], m["fn"]) == (0, 1, 1)
    assert m["dice"] == 0.0 and not m["hit"] and m["suvmax_pred"] == 9.0


def test_overlap_without_the_lesion_suvmax_is_not_a_match():
    pet, label = _scene()
    pred = np.zeros_like(label)
    pred[4, 4, 4] = 1  # inside the lesion, SUV 5.0 vs the lesion's 6.0
    m = match_components(pred, label, pet)
    assert (m["tp"], m["fp"], m["fn"]) == (0, 1, 1) and m["hit"]
    pet[3, 3, 3] = 5.08  # now within 0.1 of every voxel of the lesion part
    assert match_components(pred, label, pet)["tp"] == 1


def test_extra_components_count_as_false_positives_not_against_the_match():
    pet, label = _scene()
    pred = label.copy()
    pred[8:11, 8:11, 8:11] = 1
    m = match_components(pred, label, pet)
    assert (m["tp"], m["fp"], m["fn"], m["components"]) == (1, 1, 0, 2)
    empty = match_components(np.zeros_like(label), label, pet)
    assert (empty["tp"], empty["fp"], empty["fn"], empty["suvmax_pred"]) == (0, 0, 1, None)


def test_pooled_f1_and_bad_input():
    assert pooled_f1(3, 1, 1) == pytest.approx(0.75)
    assert pooled_f1(0, 0, 0) is None
    pet, label = _scene()
    with pytest.raises(ValueError, match="label is empty"):
        match_components(label, np.zeros_like(label), pet)
    with pytest.raises(ValueError, match="shapes differ"):
        match_components(label[:-1], label, pet)


def test_real_crop_gtv_matches_and_hottest_uptake_does_not():
    """sts crops with uptake hotter than the lesion: the GTV is a true positive, the hottest
    component above 50 % of the crop's maximum (what 'segment the hottest thing' gives) is not."""
    import csv

    from medseg.io.image import read_image

    with open(require(STS / "lesions.csv")) as fh:
        rows = [r for r in csv.DictReader(fh) if float(r["suvmax_whole_crop"]) > float(r["suvmax"]) + 1]
    checked = 0
    for r in rows[:3]:
        folder = "imagesTr" if (STS / "imagesTr" / f"{r['case']}_0001.nii.gz").exists() else "imagesTs_petonly"
        pet, _ = read_image(STS / folder / f"{r['case']}_0001.nii.gz")
        gtv = read_image(STS / folder.replace("images", "labels") / f"{r['case']}.nii.gz")[0] > 0
        m = match_components(gtv, gtv, pet)
        assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 0)
        assert m["suvmax_label"] == pytest.approx(float(r["suvmax"]), abs=0.01)
        hot = match_components(pet > 0.5 * pet.max(), gtv, pet)
        assert hot["fp"] >= 1 and hot["suvmax_pred"] > m["suvmax_label"] + 1
        checked += 1
    assert checked == 3


def test_facts_filter_drops_hotter_uptake_and_components_off_the_named_image():
    """medseg ground's facts rule on a real crop with uptake hotter than the lesion: a prediction that
    takes the lesion and the hotter uptake keeps the lesion's hottest voxel, loses every voxel above
    the reported SUVmax, and is left with the lesion alone (no false positive)."""
    import csv

    from medseg.apps.ground import facts_filter
    from medseg.io.image import read_image
    from medseg.reports.weak_label import image_to_index, index_to_image, meta_affine

    with open(require(STS / "lesions.csv")) as fh:
        row = next(r for r in csv.DictReader(fh) if float(r["suvmax_whole_crop"]) > float(r["suvmax"]) + 1)
    folder = "imagesTr" if (STS / "imagesTr" / f"{row['case']}_0001.nii.gz").exists() else "imagesTs_petonly"
    pet, meta = read_image(STS / folder / f"{row['case']}_0001.nii.gz")
    gtv = read_image(STS / folder.replace("images", "labels") / f"{row['case']}.nii.gz")[0] > 0
    peak = np.unravel_index(np.argmax(np.where(gtv, pet, -np.inf)), pet.shape)
    suv = round(float(pet[peak]), 1)
    seg = (gtv | (pet > 0.8 * pet.max())).astype(np.uint8)
    image = index_to_image(int(peak[0]), meta_affine(meta), pet.shape)
    cond = {"suvmax": np.array([suv], np.float32), "points": np.array([[image_to_index(image, meta_affine(meta), pet.shape), 0, 0]], float)}  # fmt: skip
    kept = facts_filter(seg, pet, cond)
    assert kept[peak] and not (kept & ~(seg > 0)).any()
    assert float(pet[kept].max()) <= suv + 0.1 + 1e-6
    raw, filtered = match_components(seg, gtv, pet), match_components(kept, gtv, pet)
    assert raw["fp"] >= 1 and (filtered["tp"], filtered["fp"], filtered["fn"]) == (1, 0, 0)
    assert np.array_equal(facts_filter(seg, pet, {"suvmax": np.array([np.nan], np.float32)}), seg > 0)
