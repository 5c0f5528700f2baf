"""The SUV-threshold weak labeller (medseg/reports/weak_label.py) and ``medseg reports weak-label``:
the image-number convention on flipped/permuted geometry, the threshold formula on a synthetic
sphere, every status (matched-unrefined: the refinement aborts and the located contour is kept),
real FDG-PET sarcoma crops (a hotter distractor, a merged lesion that needs a split, a spike SUVmax
whose refinement aborts) and the CLI's bad inputs and written masks."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import SHARED_DATA, require, run_main

import medseg.reports.weak_label as wl
from medseg.io.image import ImageMeta, read_image, write_image
from medseg.reports.weak_label import (
    MATCHED,
    STATUSES,
    axial_axis,
    first_threshold,
    image_to_index,
    index_to_image,
    itm_threshold,
    meta_affine,
    shell,
    weak_label,
)

STS = SHARED_DATA / "sts_fdg_petct"


# ---------------------------------------------------------------------------- image numbers


def _affine(columns, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = np.asarray(columns, float)
    a[:3, 3] = origin
    return a


@pytest.mark.parametrize(
    ("columns", "axis", "image1_index"),
    [
        (np.diag([3.0, 2.0, 2.0])[[2, 1, 0]], 0, 9),  # array axis 0 runs superior: image 1 = last index
        (np.diag([-3.0, 2.0, 2.0])[[2, 1, 0]], 0, 0),  # flipped: image 1 = index 0
        (np.diag([2.0, 2.0, 3.0]), 2, 5),  # permuted: array axis 2 is S-I
        (np.diag([2.0, 2.0, -3.0]), 2, 0),
        ([[0, 2.0, 0], [0, 0, 2.0], [-3.0, 0, 0]], 0, 0),
        ([[0.2, 0, 2.0], [0, 2.0, 0], [2.9, 0, -0.3]], 0, 9),  # oblique: the nearest axis wins
    ],
)
def test_image_number_convention(columns, axis, image1_index):
    affine, shape = _affine(columns), (10, 7, 6)
    assert axial_axis(affine) == axis
    assert image_to_index(1, affine, shape) == image1_index
    n = shape[axis]
    for image in range(1, n + 1):
        assert index_to_image(image_to_index(image, affine, shape), affine, shape) == image
    assert sorted(image_to_index(i, affine, shape) for i in range(1, n + 1)) == list(range(n))
    for bad in (0, n + 1):
        with pytest.raises(ValueError, match="outside the volume"):
            image_to_index(bad, affine, shape)


def test_image_number_follows_the_patient_not_the_array(tmp_path):
    """The same patient stored head-up and flipped: image 1 is the same physical (most superior) slice."""
    arr = np.zeros((8, 4, 5), np.float32)
    arr[-1] = 5.0  # the most superior slice (z grows superior with an identity direction)
    up = ImageMeta(spacing=(3.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), shape=arr.shape)
    down = ImageMeta(
        spacing=(3.0, 2.0, 2.0),
        origin=(21.0, 0.0, 0.0),
        shape=arr.shape,
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    )
    for meta, array, name in ((up, arr, "up"), (down, arr[::-1].copy(), "down")):
        read, m = read_image(write_image(array, meta, tmp_path / f"{name}.nii.gz"))
        affine = meta_affine(m)
        assert read[image_to_index(1, affine, read.shape)].max() == 5.0
        assert read[image_to_index(8, affine, read.shape)].max() == 0.0


def test_meta_affine_matches_sitk_world_coordinates():
    import SimpleITK as sitk

    meta = ImageMeta(
        spacing=(3.0, 2.0, 1.5), origin=(7.0, -4.0, 2.0), direction=(0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0)
    )
    img = sitk.Image(6, 5, 4, sitk.sitkFloat32)  # x, y, z sizes
    img.SetSpacing(meta.spacing[::-1])
    img.SetOrigin(meta.origin[::-1])
    img.SetDirection(meta.direction)
    zyx = (3, 2, 5)
    world = img.TransformIndexToPhysicalPoint(zyx[::-1])
    assert np.allclose((meta_affine(meta) @ [*zyx, 1])[:3], world)


# ---------------------------------------------------------------------------- synthetic volumes


META = ImageMeta(spacing=(2.0, 2.0, 2.0), shape=(40, 40, 40))


def _ball(center, radius, shape=(40, 40, 40)) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius**2


def _image(z: int) -> int:
    return index_to_image(z, meta_affine(META), META.shape)


def test_threshold_formula_on_a_sphere():
    ball = _ball((20, 20, 20), 5)
    pet = np.where(ball, 10.0, 1.0).astype(np.float32)
    w = weak_label(pet, META, 10.0, _image(20))
    assert w.status == "matched" and w.reason == ""
    assert np.array_equal(w.mask, ball)
    ml = ball.sum() * 8 / 1000
    assert w.ml == pytest.approx(ml)
    assert w.threshold == pytest.approx(itm_threshold(ml, 1.0, 10.0))  # the shell sees background 1.0
    assert w.threshold == pytest.approx((0.078 / ml + 0.617 * 1.0 / 10.0 + 0.316) * 10.0)
    assert first_threshold(10.0) == pytest.approx(0.617 + 3.16)
    assert w.suvmax_inside == 10.0 and w.voxels == ball.sum()


def test_shell_is_one_voxel_thick_three_voxels_out():
    mask = np.zeros((11, 11, 11), bool)
    mask[5, 5, 5] = True
    ring = shell(mask)
    assert ring.sum() == 7**3 - 5**3
    assert not ring[5, 5, 7] and ring[5, 5, 8] and ring[2, 2, 2]


def test_merged_lesion_is_split_from_hotter_uptake():
    """Two touching blobs (peaks 8 and 12, saddle ~5): the first threshold (3.1) joins them, the
    report's SUVmax 8.0 matches no component, so the 12 peak's basin is split off."""
    grid = np.indices((40, 40, 40)).astype(float)
    blob = lambda c, s: np.exp(-sum((g - v) ** 2 for g, v in zip(grid, c)) / (2 * s**2))  # noqa: E731
    pet = (0.8 + 7.2 * blob((20, 20, 14), 3) + 11.2 * blob((20, 20, 24), 3)).astype(np.float32)
    w = weak_label(pet, META, round(float(pet[20, 20, 14]), 1), _image(20))
    assert w.status == "matched-split", w.reason
    assert w.mask[20, 20, 14] and not w.mask[20, 20, 24]
    assert abs(w.suvmax_inside - pet[20, 20, 14]) < 0.1


def test_ambiguous_and_laterality():
    pet = np.where(_ball((20, 20, 8), 4) | _ball((20, 20, 31), 4), 9.0, 1.0).astype(np.float32)
    w = weak_label(pet, META, 9.0, _image(20))
    assert w.status == "ambiguous" and w.mask is None
    left = weak_label(pet, META, 9.0, _image(20), laterality="left", midline_x_mm=40.0)  # LPS: +x is left
    assert left.status == "matched" and left.mask[20, 20, 31] and not left.mask[20, 20, 8]
    with pytest.raises(ValueError, match="laterality"):
        weak_label(pet, META, 9.0, _image(20), laterality="up")


def test_no_component_and_bad_input():
    pet = np.where(_ball((20, 20, 20), 5), 10.0, 1.0).astype(np.float32)
    assert weak_label(pet, META, 14.0, _image(20)).status == "no-component"  # no voxel reaches it
    assert weak_label(pet, META, 10.0, _image(2)).status == "no-component"  # nothing on that image
    assert weak_label(pet, META, 6.0, _image(20)).status == "no-component"  # a hotter 10, not splittable
    for image in (0, 41):
        w = weak_label(pet, META, 10.0, image)
        assert w.status == "bad-input" and "outside the volume" in w.reason
    assert weak_label(pet, META, float("nan"), _image(20)).status == "bad-input"


def test_single_hot_voxel_keeps_the_first_threshold_contour():
    """One voxel of 10 in a background of 1: at the first step 0.078 / V (V = 0.008 mL) pushes T
    past 0.9 x SUVmax; the matched first-threshold component (the voxel) is kept, not dropped."""
    spike = np.ones((40, 40, 40), np.float32)
    spike[20, 20, 20] = 10.0
    w = weak_label(spike, META, 10.0, _image(20))
    assert w.status == "matched-unrefined" and w.ok and "matched-unrefined" in MATCHED and w.status in STATUSES
    assert w.reason.startswith("refinement aborted at T/SUVmax ") and "> 0.9" in w.reason
    assert w.reason.endswith("first-threshold contour kept")
    t_over_suv = float(w.reason.split("T/SUVmax ")[1].split()[0])
    assert t_over_suv == pytest.approx(0.078 / 0.008 + 0.617 * 1.0 / 10.0 + 0.316, abs=0.01)
    assert w.mask.sum() == 1 and w.mask[20, 20, 20] and w.voxels == 1 and w.ml == pytest.approx(0.008)
    assert w.threshold == pytest.approx(first_threshold(10.0)) and w.suvmax_inside == 10.0


def _gauss(sigma: float) -> np.ndarray:
    grid = np.indices((40, 40, 40)).astype(float)
    return (1.0 + 9.0 * np.exp(-sum((g - 20) ** 2 for g in grid) / (2 * sigma**2))).astype(np.float32)


def test_abort_after_some_steps_keeps_the_last_contour_below_the_abort():
    """A narrow peak: T / SUVmax climbs 0.55 -> 0.74 -> 1.77 as the contour shrinks; the contour of
    step 2 (T 7.39, the last one <= 0.9 x SUVmax) is kept."""
    pet = _gauss(1.5)
    w = weak_label(pet, META, 10.0, _image(20))
    assert w.status == "matched-unrefined", w.reason
    assert w.reason.startswith("refinement aborted at T/SUVmax 1.7") and "contour of step 2 (T 7.39) kept" in w.reason
    assert w.threshold == pytest.approx(7.39, abs=0.01) and w.threshold <= 0.9 * 10.0
    assert np.array_equal(w.mask, pet > w.threshold) and w.mask[20, 20, 20]


def test_unsettled_threshold_keeps_the_last_contour(monkeypatch):
    monkeypatch.setattr(wl, "MAX_ITERATIONS", 1)
    w = weak_label(_gauss(2.0), META, 10.0, _image(20))
    assert w.status == "matched-unrefined"
    assert w.reason == "threshold did not settle in 1 iterations; contour of step 1 (T 4.60) kept"
    assert w.mask[20, 20, 20] and w.threshold == pytest.approx(4.60, abs=0.005)


def test_refined_contour_joining_hotter_uptake():
    """Background 0.2 (so the refined T, ~2.7, is below the first threshold 3.15): the lesion (8)
    joins a hotter 12 through a bridge of 3.0; it is split off during refinement, and when it cannot
    be split (the guard) the label is aborted: no contour is kept."""
    pet = np.full((40, 40, 40), 0.2, np.float32)
    pet[_ball((20, 20, 12), 4)] = 8.0
    pet[_ball((20, 20, 28), 4)] = 12.0
    pet[19:22, 19:22, 15:26] = np.maximum(pet[19:22, 19:22, 15:26], 3.0)
    w = weak_label(pet, META, 8.0, _image(20))
    assert w.status == "matched-split" and "during refinement (1x)" in w.reason
    assert w.mask[20, 20, 12] and not w.mask[20, 20, 28] and w.suvmax_inside == 8.0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wl, "_split", lambda *args: None)
        w = weak_label(pet, META, 8.0, _image(20))
    assert w.status == "aborted" and "cannot be split off" in w.reason and w.mask is None and not w.ok


# ---------------------------------------------------------------------------- real FDG-PET crops


def _case(case: str):
    require(STS / "lesions.csv")
    folder = "imagesTr" if (STS / "imagesTr" / f"{case}_0001.nii.gz").exists() else "imagesTs_petonly"
    pet, meta = read_image(require(STS / folder / f"{case}_0001.nii.gz"))
    gtv, _ = read_image(STS / folder.replace("images", "labels") / f"{case}.nii.gz")
    with (STS / "lesions.csv").open() as f:
        row = next(r for r in csv.DictReader(f) if r["case"] == case)
    voxel = tuple(json.loads(row["suvmax_voxel_ijk"]))[::-1]  # (i, j, k) -> (z, y, x)
    image = index_to_image(voxel[0], meta_affine(meta), pet.shape)
    return pet, meta, gtv > 0, round(float(row["suvmax"]), 1), image, voxel


def test_real_lesion_beside_a_hotter_distractor():
    """sts_001: the crop's hottest uptake (SUV 25.4) is not the tumour (SUVmax 7.9)."""
    pet, meta, gtv, suv, image, voxel = _case("sts_001")
    hottest = np.unravel_index(np.argmax(pet), pet.shape)
    assert pet[hottest] > 3 * suv and not gtv[hottest]
    w = weak_label(pet, meta, suv, image)
    assert w.status == "matched"
    assert w.mask[voxel] and not w.mask[hottest] and (w.mask & gtv).sum() > 0.5 * w.voxels
    assert abs(w.suvmax_inside - suv) <= 0.1 and w.threshold < 0.9 * suv


def test_real_lesion_merged_with_hotter_uptake_is_split():
    """sts_006: at the first threshold the tumour (SUVmax 26.6) joins uptake of 27.8."""
    pet, meta, gtv, suv, image, voxel = _case("sts_006")
    w = weak_label(pet, meta, suv, image)
    assert w.status == "matched-split", w.reason
    assert w.mask[voxel] and (w.mask & gtv).any() and abs(w.suvmax_inside - suv) <= 0.1
    assert pet[w.mask].max() < pet.max()


@pytest.mark.parametrize("case", ["sts_026", "sts_043", "sts_045"])
def test_real_spike_keeps_the_first_threshold_contour_on_the_gtv(case):
    """sts_045: SUVmax 10.6 is one voxel amid SUV < 3 (sts_026: one voxel, sts_043: three): the
    refinement aborts at once, and the matched first-threshold contour is kept, on the GTV."""
    pet, meta, gtv, suv, image, voxel = _case(case)
    w = weak_label(pet, meta, suv, image)
    assert w.status == "matched-unrefined" and w.reason.endswith("first-threshold contour kept"), w.reason
    assert w.mask[voxel] and (w.mask & gtv).any() and w.voxels <= 3
    assert w.threshold == pytest.approx(first_threshold(suv)) and abs(w.suvmax_inside - suv) <= 0.1


def test_real_unsplittable_is_no_component():
    pet, meta, _, suv, image, _ = _case("sts_050")  # the GTV's 12.6 touches a 13.8 voxel outside it
    w = weak_label(pet, meta, suv, image)
    assert w.status == "no-component" and "split" in w.reason


# ---------------------------------------------------------------------------- CLI


def _write_csv(path, rows, columns=("id", "case", "suvmax", "image")):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _read_csv(path):
    with path.open(newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def test_cli_writes_masks_for_matched_rows_only(monkeypatch, capsys, tmp_path):
    require(STS / "imagesTr" / "sts_003_0001.nii.gz")
    rows = [
        {"id": "a", "case": "sts_003", "suvmax": 10.3, "image": _case("sts_003")[4]},
        {"id": "b", "case": "sts_006", "suvmax": 26.6, "image": _case("sts_006")[4]},
        {"id": "c", "case": "sts_045", "suvmax": 10.6, "image": _case("sts_045")[4]},  # PET-only: not in imagesTr
        {"id": "d", "case": "sts_003", "suvmax": 10.3, "image": 999},
        {"id": "e", "case": "sts_003", "suvmax": "ten", "image": 3},
    ]
    table = _write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out"
    code, stdout, err = run_main(
        monkeypatch, capsys, "reports", "weak-label", table, "--images", STS / "imagesTr", "-o", out
    )
    assert code == 0, err
    result = _read_csv(out / "weak_labels.csv")
    assert [result[k]["status"] for k in "abcde"] == ["matched", "matched-split", "bad-input", "bad-input", "bad-input"]
    assert "PET channel _0001 missing" in result["c"]["reason"] and "outside the volume" in result["d"]["reason"]
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz", "weak_labels.csv"]
    mask, meta = read_image(out / "a.nii.gz")
    pet, pet_meta = read_image(STS / "imagesTr" / "sts_003_0001.nii.gz")
    assert mask.dtype == np.uint8 and meta == pet_meta and mask.sum() == int(result["a"]["voxels"])
    assert "2 weak label(s) of 5 row(s)" in stdout

    code, _, err = run_main(
        monkeypatch, capsys, "reports", "weak-label", table, "--images", STS / "imagesTr", "-o", out
    )
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_main(
        monkeypatch,
        capsys,
        "reports",
        "weak-label",
        table,
        "--images",
        STS / "imagesTr",
        "-o",
        out,
        "--pet-channel",
        "2",
        "--overwrite",
    )
    assert code == 0, err
    result = _read_csv(out / "weak_labels.csv")
    assert result["a"]["status"] == "bad-input" and "_0002 missing" in result["a"]["reason"]
    assert sorted(p.name for p in out.iterdir()) == ["weak_labels.csv"]  # the earlier masks went with --overwrite


def test_cli_writes_matched_unrefined_masks(monkeypatch, capsys, tmp_path):
    spike = np.ones((40, 40, 40), np.float32)
    spike[20, 20, 20] = 10.0
    write_image(spike, META, tmp_path / "images" / "spike_0001.nii.gz")
    rows = [{"id": "s", "case": "spike", "suvmax": 10.0, "image": _image(20)}]
    table = _write_csv(tmp_path / "in.csv", rows)
    out = tmp_path / "out"
    code, stdout, err = run_main(
        monkeypatch, capsys, "reports", "weak-label", table, "--images", tmp_path / "images", "-o", out
    )
    assert code == 0, err
    row = _read_csv(out / "weak_labels.csv")["s"]
    assert row["status"] == "matched-unrefined" and "first-threshold contour kept" in row["reason"]
    assert row["voxels"] == "1" and row["ml"] == "0.008"
    mask, _ = read_image(out / "s.nii.gz")
    assert mask.sum() == 1 and mask[20, 20, 20] == 1
    assert "matched-unrefined 1" in stdout and "1 weak label(s) of 1 row(s)" in stdout


def test_cli_ct_on_another_grid(monkeypatch, capsys, tmp_path):
    images = tmp_path / "images"
    pet, meta = read_image(require(STS / "imagesTr" / "sts_003_0001.nii.gz"))
    ct, ct_meta = read_image(STS / "imagesTr" / "sts_003_0000.nii.gz")
    write_image(pet, meta, images / "sts_003_0001.nii.gz")
    shifted = ImageMeta(
        ct_meta.spacing, (ct_meta.origin[0] + 10.0, *ct_meta.origin[1:]), ct_meta.direction, ct_meta.shape
    )
    write_image(ct, shifted, images / "sts_003_0000.nii.gz")
    table = _write_csv(tmp_path / "in.csv", [{"id": "a", "case": "sts_003", "suvmax": 10.3, "image": 32}])
    code, _, err = run_main(
        monkeypatch, capsys, "reports", "weak-label", table, "--images", images, "-o", tmp_path / "o"
    )
    assert code == 0, err
    row = _read_csv(tmp_path / "o" / "weak_labels.csv")["a"]
    assert row["status"] == "bad-input" and "CT _0000 is on another grid" in row["reason"] and "origin" in row["reason"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty CSV"),
        ("id,case,suvmax\na,sts_003,10.3\n", "missing column(s) image"),
        ("id,case,suvmax,image\n", "no rows"),
        ("id,case,suvmax,image\na,sts_003,10.3,32\na,sts_003,10.3,33\n", "appears more than once"),
        ("id,case,suvmax,image\n../x,sts_003,10.3,32\n", "cannot name a file"),
    ],
)
def test_cli_file_level_errors_are_one_line_and_write_nothing(monkeypatch, capsys, tmp_path, content, message):
    table = tmp_path / "in.csv"
    table.write_text(content)
    out = tmp_path / "out"
    code, _, err = run_main(monkeypatch, capsys, "reports", "weak-label", table, "--images", tmp_path, "-o", out)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("medseg: error:")
    assert not out.exists()


def test_cli_missing_table_and_images(monkeypatch, capsys, tmp_path):
    code, _, err = run_main(
        monkeypatch, capsys, "reports", "weak-label", tmp_path / "no.csv", "--images", tmp_path, "-o", tmp_path / "o"
    )
    assert code == 2 and "file not found" in err and not (tmp_path / "o").exists()
    table = _write_csv(tmp_path / "in.csv", [{"id": "a", "case": "x", "suvmax": 1, "image": 1}])
    code, _, err = run_main(
        monkeypatch, capsys, "reports", "weak-label", table, "--images", tmp_path / "nope", "-o", tmp_path / "o"
    )
    assert code == 2 and "not a folder" in err and not (tmp_path / "o").exists()
