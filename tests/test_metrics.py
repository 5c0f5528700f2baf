"""Unit tests for evaluation metrics, checked against hand-computed values and an independent
brute-force surface-distance implementation (all pairs of surface voxels, in mm)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from medseg.errors import DatasetError
from medseg.evaluation.metrics import binary_metrics, evaluate_case, evaluate_folder, summarise, to_csv
from medseg.io.image import ImageMeta, write_image


# ----------------------------------------------------------------------------- reference implementation
def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one face neighbour outside the mask (or outside the array)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = np.ones_like(mask)
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis=axis)[tuple(slice(1, -1) for _ in range(mask.ndim))]
    return mask & ~inner


def brute_distances(pred, ref, spacing):
    ps = np.argwhere(brute_surface(pred)) * np.asarray(spacing)
    rs = np.argwhere(brute_surface(ref)) * np.asarray(spacing)
    d = cdist(ps, rs)
    return d.min(1), d.min(0)


def brute_hd95(pred, ref, spacing):
    a, b = brute_distances(pred, ref, spacing)
    return max(np.percentile(a, 95), np.percentile(b, 95))


def brute_nsd(pred, ref, spacing, tol):
    a, b = brute_distances(pred, ref, spacing)
    return ((a <= tol).sum() + (b <= tol).sum()) / (len(a) + len(b))


def blob(rng, shape=(14, 16, 15), threshold=0.55, sigma=2.0):
    noise = ndimage.gaussian_filter(rng.random(shape), sigma)
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    return noise > threshold


# ----------------------------------------------------------------------------- overlap metrics
def test_dice_iou_hand_computed():
    pred = np.zeros((4, 4, 4), bool)
    ref = np.zeros((4, 4, 4), bool)
    pred[0, 0, :3] = True  # 3 voxels
    ref[0, 0, 1:] = True  # 3 voxels, 2 shared
    m = binary_metrics(pred, ref, (1, 1, 1))
    assert (m["tp"], m["fp"], m["fn"], m["n_pred"], m["n_ref"]) == (2, 1, 1, 3, 3)
    assert m["dice"] == pytest.approx(2 * 2 / 6)
    assert m["iou"] == pytest.approx(2 / 4)
    same = binary_metrics(ref, ref, (1, 1, 1))
    assert same["dice"] == 1.0 and same["iou"] == 1.0 and same["hd95"] == 0.0 and same["nsd"] == 1.0


def test_empty_conventions():
    empty = np.zeros((5, 5, 5), bool)
    obj = empty.copy()
    obj[1:3, 1:3, 1:3] = True
    m = binary_metrics(empty, empty, (1, 1, 1))
    assert (m["dice"], m["iou"], m["hd95"], m["nsd"]) == (1.0, 1.0, 0.0, 1.0)
    for p, r in [(empty, obj), (obj, empty)]:
        m = binary_metrics(p, r, (1, 1, 1))
        assert (m["dice"], m["iou"], m["hd95"], m["nsd"]) == (0.0, 0.0, None, 0.0)


def test_hd95_hand_computed_shift_with_anisotropic_spacing():
    """A cube shifted by 2 voxels along z (3 mm spacing): every surface distance is 0 or 6 mm..."""
    ref = np.zeros((12, 8, 8), bool)
    ref[2:6, 2:6, 2:6] = True
    pred = np.roll(ref, 2, axis=0)
    m = binary_metrics(pred, ref, (3.0, 0.5, 0.5), nsd_tolerance_mm=1.0)
    assert m["hd95"] == pytest.approx(brute_hd95(pred, ref, (3.0, 0.5, 0.5)))
    assert m["hd95"] == pytest.approx(6.0)
    # ...and along x (0.5 mm spacing) the same shift is only 1 mm: within the 1 mm tolerance
    pred_x = np.roll(ref, 2, axis=2)
    mx = binary_metrics(pred_x, ref, (3.0, 0.5, 0.5), nsd_tolerance_mm=1.0)
    assert mx["hd95"] == pytest.approx(1.0)
    assert mx["nsd"] == pytest.approx(1.0)
    assert m["nsd"] < 1.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.7, 1.1)])
def test_hd95_and_nsd_match_brute_force(seed, spacing):
    rng = np.random.default_rng(seed)
    pred, ref = blob(rng), blob(rng)
    if not pred.any() or not ref.any():
        pytest.skip("empty blob")
    m = binary_metrics(pred, ref, spacing, nsd_tolerance_mm=1.5)
    assert m["hd95"] == pytest.approx(brute_hd95(pred, ref, spacing), rel=1e-6)
    assert m["nsd"] == pytest.approx(brute_nsd(pred, ref, spacing, 1.5), rel=1e-6)
    inter = (pred & ref).sum()
    assert m["dice"] == pytest.approx(2 * inter / (pred.sum() + ref.sum()))
    assert m["iou"] == pytest.approx(inter / (pred | ref).sum())


def test_objects_touching_the_border_match_brute_force():
    ref = np.zeros((10, 10, 10), bool)
    ref[0:5, 0:6, 3:10] = True  # touches three faces of the array
    pred = np.zeros_like(ref)
    pred[0:4, 1:7, 4:10] = True
    spacing = (1.5, 1.0, 0.8)
    m = binary_metrics(pred, ref, spacing, nsd_tolerance_mm=1.0)
    assert m["hd95"] == pytest.approx(brute_hd95(pred, ref, spacing))
    assert m["nsd"] == pytest.approx(brute_nsd(pred, ref, spacing, 1.0))


def test_evaluate_case_and_summarise():
    ref = np.zeros((8, 8, 8), np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    ref[5:7, 5:7, 5:7] = 2
    pred = ref.copy()
    pred[5:7, 5:7, 5:7] = 0  # class 2 missed entirely
    labels = {"background": 0, "a": 1, "b": 2, "c": 3}
    res = evaluate_case(pred, ref, (1, 1, 1), labels)
    assert set(res) == {"a", "b", "c"}  # background not evaluated
    assert res["a"]["dice"] == 1.0
    assert res["b"]["dice"] == 0.0 and res["b"]["hd95"] is None
    assert res["c"]["dice"] == 1.0 and res["c"]["hd95"] == 0.0  # absent in both
    res2 = evaluate_case(ref, ref, (1, 1, 1), labels)
    s = summarise({"x": res, "y": res2})
    assert s["num_cases"] == 2
    assert s["mean"]["b"]["dice"] == pytest.approx(0.5)
    assert s["mean"]["b"]["hd95"] == 0.0 and s["mean"]["b"]["n_undefined_hd95"] == 1
    assert s["foreground_mean"]["dice"] == pytest.approx((1 + 0.5 + 1) / 3)
    rows = list(csv.reader(io.StringIO(to_csv({"x": res}))))
    assert rows[0][:3] == ["case", "class", "dice"] and len(rows) == 4
    row_b = next(r for r in rows if r[1] == "b")
    assert row_b[4] == "" and float(row_b[2]) == 0.0


def test_summary_lines_say_how_many_cases_had_an_undefined_hd95():
    from medseg.evaluation.report import metrics_summary_lines

    ref = np.zeros((8, 8, 8), np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    ref[5:7, 5:7, 5:7] = 2
    missed = ref.copy()
    missed[5:7, 5:7, 5:7] = 0  # class b missed: no surface to measure a distance to
    labels = {"background": 0, "a": 1, "b": 2}
    cases = {n: evaluate_case(p, ref, (1, 1, 1), labels) for n, p in (("x", missed), ("y", ref), ("z", missed))}
    lines = metrics_summary_lines(summarise(cases))
    (line_b,) = [line for line in lines if line.startswith("b ")]
    assert "HD95 undefined in 2 of 3 cases" in line_b
    assert "undefined" not in next(line for line in lines if line.startswith("a "))
    assert lines[-1].startswith("3 cases; HD95 undefined in 2 of them")
    whole = metrics_summary_lines(summarise({"y": cases["y"]}))
    assert whole[-1] == "1 case; HD95 defined for every case and class"
    many = summarise({"y": {f"c{i}": cases["y"]["a"] for i in range(30)}})
    assert len(metrics_summary_lines(many)) < 25  # one screen, whatever the class count


# ----------------------------------------------------------------------------- folders
def _write(path, arr, spacing):
    write_image(arr.astype(np.uint8), ImageMeta(spacing=spacing, shape=arr.shape), path)


def test_evaluate_folder_writes_json_and_csv(tmp_path):
    rng = np.random.default_rng(7)
    spacing = (2.0, 0.8, 0.9)
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    labels = {"background": 0, "left": 1, "right": 2}
    expected = {}
    for i in range(3):
        ref = np.zeros((10, 16, 14), np.uint8)
        ref[blob(rng, (10, 16, 14))] = 1
        ref[2:5, 9:14, 2:6] = 2
        pred = ref.copy()
        pred[blob(rng, (10, 16, 14), threshold=0.7)] = 1
        _write(ref_dir / f"case_{i}.nii.gz", ref, spacing)
        _write(pred_dir / f"case_{i}.nii.gz", pred, spacing)
        expected[f"case_{i}"] = evaluate_case(pred, ref, spacing, labels)
    out = tmp_path / "eval" / "summary.json"
    summary = evaluate_folder(pred_dir, ref_dir, labels, output=out)
    assert summary["num_cases"] == 3
    on_disk = json.loads(out.read_text())
    assert on_disk["num_cases"] == 3 and on_disk["nsd_tolerance_mm"] == 1.0
    for case, classes in expected.items():
        for c, m in classes.items():
            got = on_disk["per_case"][case][c]
            assert got["dice"] == pytest.approx(m["dice"])
            assert got["hd95"] == pytest.approx(m["hd95"])  # spacing was read back from the files
            assert got["nsd"] == pytest.approx(m["nsd"])
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert len(rows) == 3 * 2
    assert {r["case"] for r in rows} == set(expected)
    r0 = next(r for r in rows if r["case"] == "case_0" and r["class"] == "left")
    assert float(r0["dice"]) == pytest.approx(expected["case_0"]["left"]["dice"], abs=1e-6)


def test_evaluate_folder_errors(tmp_path):
    labels = {"background": 0, "a": 1}
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError):
        evaluate_folder(tmp_path / "empty", tmp_path, labels)
    arr = np.zeros((4, 5, 6), np.uint8)
    _write(tmp_path / "pred" / "c1.nii.gz", arr, (1, 1, 1))
    with pytest.raises(DatasetError, match="reference"):
        evaluate_folder(tmp_path / "pred", tmp_path / "ref", labels)
    _write(tmp_path / "ref" / "c1.nii.gz", np.zeros((4, 5, 7), np.uint8), (1, 1, 1))
    with pytest.raises(DatasetError, match="shape"):
        evaluate_folder(tmp_path / "pred", tmp_path / "ref", labels)
