"""OOD localisation metrics (medseg.evaluation.ood) against their brute-force definitions, the
folder evaluation on small synthetic NIfTI volumes, and ``medseg evaluate --ood``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_main

from medseg.errors import DatasetError
from medseg.evaluation.ood import (
    auroc,
    average_precision,
    evaluate_ood,
    fpr_at_tpr,
    pixel_metrics,
    read_ood_cases,
    summary_lines,
)
from medseg.io.image import ImageMeta, write_image

# ---------------------------------------------------------------- brute-force definitions


def _brute_auroc(s: np.ndarray, y: np.ndarray) -> float:
    """The fraction of (positive, negative) pairs ordered correctly, a tie counting one half."""
    diff = s[y][:, None] - s[~y][None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def _brute_rates(s: np.ndarray, y: np.ndarray):
    """(TPR, FPR, precision) of "score >= t" for each distinct score t, highest first."""
    for t in sorted(set(s.tolist()), reverse=True):
        flagged = s >= t
        tp, fp = int((flagged & y).sum()), int((flagged & ~y).sum())
        yield tp / y.sum(), fp / (~y).sum(), tp / (tp + fp)


def _brute_ap(s: np.ndarray, y: np.ndarray) -> float:
    ap, previous = 0.0, 0.0
    for recall, _, precision in _brute_rates(s, y):
        ap += (recall - previous) * precision
        previous = recall
    return ap


def _brute_fpr(s: np.ndarray, y: np.ndarray, tpr: float = 0.95) -> float:
    return next(fpr for recall, fpr, _ in _brute_rates(s, y) if recall >= tpr)


@pytest.mark.parametrize("seed", range(8))
def test_metrics_match_brute_force_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    y = rng.random(n) < rng.uniform(0.05, 0.6)
    y[:2] = [True, False]  # both classes present
    levels = int(rng.integers(2, 12))  # few distinct scores: ties everywhere
    s = (rng.integers(0, levels, n) + 2.0 * y * rng.random(n)).round(1).astype(np.float32)
    assert auroc(s, y) == pytest.approx(_brute_auroc(s, y), abs=1e-12)
    assert average_precision(s, y) == pytest.approx(_brute_ap(s, y), abs=1e-12)
    for tpr in (0.95, 0.5, 1.0):
        assert fpr_at_tpr(s, y, tpr) == pytest.approx(_brute_fpr(s, y, tpr), abs=1e-12)
    both = pixel_metrics(s, y)
    assert both == {"auroc": auroc(s, y), "aupr": average_precision(s, y), "fpr95": fpr_at_tpr(s, y)}


def test_perfect_inverted_and_constant_scores():
    y = np.array([0, 0, 0, 1, 1, 0, 1, 0], bool)
    perfect = y.astype(float) + 0.1 * np.arange(8)
    assert (auroc(perfect, y), average_precision(perfect, y), fpr_at_tpr(perfect, y)) == (1.0, 1.0, 0.0)
    inverted = -perfect
    assert auroc(inverted, y) == 0.0 and fpr_at_tpr(inverted, y) == 1.0
    assert average_precision(inverted, y) == pytest.approx(_brute_ap(inverted, y))
    constant = np.full(8, 0.3)  # one threshold: everything flagged at once
    assert auroc(constant, y) == 0.5 and fpr_at_tpr(constant, y) == 1.0
    assert average_precision(constant, y) == pytest.approx(3 / 8)  # the prevalence
    ints = [3, 1, 2, 2]  # integer scores and plain lists are accepted
    assert auroc(ints, [1, 0, 1, 0]) == pytest.approx(0.875)


@pytest.mark.parametrize("fn", [auroc, average_precision, fpr_at_tpr])
def test_one_class_only_is_an_error(fn):
    with pytest.raises(ValueError, match="^no positives: ") as exc:
        fn(np.arange(5.0), np.zeros(5, bool))
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="^no negatives: "):
        fn(np.arange(5.0), np.ones(5, bool))
    with pytest.raises(ValueError, match="NaN"):
        fn(np.array([0.1, np.nan, 0.3]), np.array([1, 0, 1]))
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        fn(np.arange(3.0), [1, 0])


def test_fpr_at_tpr_checks_its_rate_and_infinite_scores_tie():
    with pytest.raises(ValueError, match=r"tpr must be in \(0, 1\]"):
        fpr_at_tpr([0.1, 0.2], [0, 1], tpr=0.0)
    s = np.array([np.inf, np.inf, 1.0, 0.0])
    y = np.array([True, False, True, False])
    assert fpr_at_tpr(s, y, 0.5) == 0.5  # the two inf scores are one threshold
    assert average_precision(s, y) == pytest.approx(_brute_ap(s, y))


def test_millions_of_tied_scores_against_counts():
    """Two million voxels on 10 score levels: exact against the per-level count formula."""
    rng = np.random.default_rng(3)
    n = 2_000_000
    y = rng.random(n) < 0.01
    s = np.where(y, rng.integers(3, 10, n), rng.integers(0, 7, n)).astype(np.float32)
    pos = np.bincount(s[y].astype(int), minlength=10).astype(float)
    neg = np.bincount(s[~y].astype(int), minlength=10).astype(float)
    below = np.cumsum(neg) - neg
    expected_auroc = float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))
    tp, fp = np.cumsum(pos[::-1]), np.cumsum(neg[::-1])  # thresholds 9, 8, ..., 0
    expected_ap = float((np.diff(tp / tp[-1], prepend=0.0) * tp / np.maximum(tp + fp, 1)).sum())
    expected_fpr = float(fp[np.argmax(tp / tp[-1] >= 0.95)] / fp[-1])
    m = pixel_metrics(s, y)
    assert m["auroc"] == pytest.approx(expected_auroc, abs=1e-12)
    assert m["aupr"] == pytest.approx(expected_ap, abs=1e-12)
    assert m["fpr95"] == pytest.approx(expected_fpr, abs=1e-12)


# ---------------------------------------------------------------- folders of synthetic volumes

SHAPE = (6, 10, 10)
META = ImageMeta((2.0, 1.0, 1.0), shape=SHAPE)
LESION = (slice(2, 4), slice(3, 6), slice(3, 6))  # 18 voxels
# case: (group or None, lesion score range, score of one hot background voxel)
CASES = {
    "ood_a": ("ggo", (0.96, 1.0), None),  # above every other voxel; max 1.0
    "ood_b": ("solid", (0.3, 0.9), None),  # overlaps the background's 0-0.5
    "in_c": (None, (0.2, 0.4), 0.95),  # an inlier with one hot voxel: above ood_b at case level
    "in_d": (None, (0.1, 0.3), None),  # max below 0.5 (the background's)
}


def _volumes(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for case, (_, (lo, hi), hot) in CASES.items():
        ref = np.zeros(SHAPE, np.uint8)
        ref[LESION] = 1
        score = (0.5 * rng.random(SHAPE)).round(2).astype(np.float32)  # rounded: ties
        score[LESION] = rng.uniform(lo, hi, ref[LESION].shape).round(2)
        score.flat[np.argmax(score)] = hi if hot is None else hot
        out[case] = ref, score
    return out


@pytest.fixture
def folders(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    for case, (label, score) in _volumes().items():
        write_image(label, META, ref / f"{case}.nii.gz")
        write_image(label, META, pred / f"{case}.nii.gz")  # the predicted label map
        write_image(score, META, pred / f"{case}_ood.nii.gz")
    (pred / "ood_a_ood.png").write_bytes(b"an overlay picture, never read")  # predict --overlay
    (pred / "ood_a_overlay.png").write_bytes(b"never read either")
    (pred / "volumes.csv").write_text("case\n")
    return pred, ref


GROUPS = {c: g for c, (g, _, _) in CASES.items() if g}


def _expected(groups: dict[str, str], keep_group: str | None = None) -> dict:
    """Pixel metrics from the arrays: a group's lesions positive; other OOD groups' lesions left out."""
    scores, positive = [], []
    for case, (label, score) in _volumes().items():
        lesion = label.ravel() > 0
        group = groups.get(case)
        keep = ~lesion | (group is None) | (keep_group is None) | (group == keep_group)
        scores.append(score.ravel()[keep])
        positive.append((lesion & (group is not None))[keep])
    return pixel_metrics(np.concatenate(scores), np.concatenate(positive))


def test_evaluate_ood_overall_groups_and_case_level(folders):
    pred, ref = folders
    before = sorted(p.name for p in pred.iterdir())
    r = evaluate_ood(pred, ref, GROUPS)
    assert sorted(p.name for p in pred.iterdir()) == before  # writes nothing
    assert (r["n_cases"], r["n_ood_cases"], r["positives"], r["negatives"]) == (4, 2, 36, 4 * 600 - 36)
    assert {k: r[k] for k in ("auroc", "aupr", "fpr95")} == pytest.approx(_expected(GROUPS))
    # case level, the maximum per volume: ood_a 1.0, ood_b 0.9, in_c 0.95, in_d < 0.5
    assert r["case_auroc"] == 0.75
    assert set(r["groups"]) == {"ggo", "solid"}
    for name, g in r["groups"].items():
        assert {k: g[k] for k in ("auroc", "aupr", "fpr95")} == pytest.approx(_expected(GROUPS, name))
        assert g["positives"] == 18 and g["n_cases"] == 1
    assert r["groups"]["ggo"]["auroc"] == 1.0 and r["groups"]["ggo"]["case_auroc"] == 1.0
    assert r["groups"]["solid"]["auroc"] < 1.0 and r["groups"]["solid"]["case_auroc"] == 0.5
    assert r["per_case"]["in_c"] == {"group": None, "max_score": pytest.approx(0.95), "lesion_voxels": 18}
    assert r["ood_cases_not_evaluated"] == [] and json.dumps(r)  # JSON-ready
    lines = summary_lines(r)
    assert lines[0] == "4 cases (2 OOD): 36 OOD lesion voxels, 2364 others"
    assert [line.split()[0] for line in lines[1:]] == ["all", "ggo", "solid"]
    assert "case AUROC 0.7500" in lines[1]


def test_a_case_list_is_one_group_and_cases_select(folders):
    pred, ref = folders
    r = evaluate_ood(pred, ref, {"ood_a", "ood_b"})
    assert set(r["groups"]) == {"ood"}
    assert {k: r["groups"]["ood"][k] for k in ("auroc", "aupr", "fpr95")} == {k: r[k] for k in ("auroc", "aupr", "fpr95")}  # fmt: skip
    assert len(summary_lines(r)) == 2  # one group: no second line that repeats "all"
    sub = evaluate_ood(pred, ref, GROUPS, cases=["ood_a", "in_d"])
    assert (sub["n_cases"], sub["ood_cases_not_evaluated"]) == (2, ["ood_b"])
    assert sub["groups"]["solid"]["auroc"] is None and sub["groups"]["solid"]["positives"] == 0
    only_ood = evaluate_ood(pred, ref, GROUPS, cases=["ood_a", "ood_b"])
    assert only_ood["case_auroc"] is None and only_ood["case_auroc_reason"] == "no inlier cases evaluated"


def test_evaluate_ood_errors(folders, tmp_path):
    pred, ref = folders
    with pytest.raises(ValueError, match="^no OOD lesion voxels: none of the 4 evaluated cases"):
        evaluate_ood(pred, ref, ["not_a_case"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no OOD score maps"):
        evaluate_ood(tmp_path / "empty", ref, GROUPS)
    with pytest.raises(ValueError, match="got one string"):
        evaluate_ood(pred, ref, "ood_a")
    write_image(np.zeros((6, 10, 9), np.float32), META, pred / "in_d_ood.nii.gz")
    with pytest.raises(DatasetError) as exc:
        evaluate_ood(pred, ref, GROUPS)
    assert exc.value.path == str(pred / "in_d_ood.nii.gz") and "shape (6, 10, 9) differs from reference" in exc.value.reason  # fmt: skip
    (pred / "in_d_ood.nii.gz").unlink()
    (pred / "ood_b_ood.nii.gz").unlink()
    with pytest.raises(DatasetError) as exc:
        evaluate_ood(pred, ref, GROUPS)
    assert exc.value.one_line() == f"{pred / 'in_d_ood.nii.gz'}: OOD score map missing (2 of 4 cases have none)"
    (ref / "ood_a.nii.gz").unlink()
    with pytest.raises(DatasetError, match="ood_a.nii.gz: reference label map missing"):
        evaluate_ood(pred, ref, GROUPS, cases=["ood_a"])


def test_read_ood_cases(tmp_path):
    plain = tmp_path / "ood.txt"
    plain.write_text("# OOD cases of the split\nlidc_0012_n01\n\n  lidc_0040_n02  # solid\n")
    assert read_ood_cases(plain) == {"lidc_0012_n01": "ood", "lidc_0040_n02": "ood"}
    table = tmp_path / "ood.csv"
    table.write_text("# split v2\nsource,case,group\nlidc,lidc_0012_n01,ggo\nlidc,lidc_0040_n02, solid\n")
    assert read_ood_cases(table) == {"lidc_0012_n01": "ggo", "lidc_0040_n02": "solid"}

    def error(text: str) -> str:
        plain.write_text(text)
        with pytest.raises(DatasetError) as exc:
            read_ood_cases(plain)
        return exc.value.one_line()

    assert error("a\nb c\n") == f"{plain}: line 2: expected one case id, got 'b c'"
    assert error("case,label\na,1\n") == f"{plain}: line 1: a CSV header needs 'case' and 'group' columns, got 'case,label'"  # fmt: skip
    assert error("case,group\na,ggo\n\nb\n") == f"{plain}: line 4: 1 fields, the header has 2"
    assert error("case,group\na,ggo\na,solid\n") == f"{plain}: line 3: case a is already in group ggo"
    assert error("# nothing\n\n").endswith("OOD case list holds no case ids (one a line, or CSV with case,group columns)")  # fmt: skip
    assert error("case,group\n") == f"{plain}: no cases below the CSV header"
    with pytest.raises(DatasetError, match="missing.txt: OOD case list not found"):
        read_ood_cases(tmp_path / "missing.txt")


# ---------------------------------------------------------------- medseg evaluate --ood


def test_cli_evaluate_ood(folders, tmp_path, monkeypatch, capsys):
    pred, ref = folders
    cases = tmp_path / "ood.csv"
    cases.write_text("case,group\nood_a,ggo\nood_b,solid\nood_z,solid\n")
    args = ["evaluate", "-i", pred, "-r", ref, "--ood", "--ood-cases", cases]
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "medseg: warning: 1 OOD case(s) of" in err and "ood_z" in err
    summary = json.loads((pred / "ood_summary.json").read_text())
    assert summary["auroc"] == pytest.approx(evaluate_ood(pred, ref, GROUPS)["auroc"])
    assert out.splitlines() == [*summary_lines(summary), f"written {pred / 'ood_summary.json'}"]
    code, _, err = run_main(monkeypatch, capsys, *args)  # the existing-output rule
    assert code == 2 and "ood_summary.json: already exists" in err and "--overwrite" in err
    assert run_main(monkeypatch, capsys, *args, "--overwrite")[0] == 0
    assert run_main(monkeypatch, capsys, *args, "-o", tmp_path / "o" / "x.json")[0] == 0
    assert (tmp_path / "o" / "x.json").is_file()


def _one_line_error(result) -> str:
    code, out, err = result
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("medseg: error: ")
    return err.strip()[len("medseg: error: ") :]


def test_cli_evaluate_ood_errors(folders, tmp_path, monkeypatch, capsys):
    pred, ref = folders
    cases = tmp_path / "ood.txt"
    cases.write_text("ood_a\nood_b\n")
    base = ["evaluate", "-i", pred, "-r", ref]

    def fails(*args) -> str:
        return _one_line_error(run_main(monkeypatch, capsys, *base, *args))

    assert fails() == "--labels is required"
    assert fails("--ood-cases", cases) == "--ood-cases needs --ood"
    assert fails("--ood") == "--ood needs --ood-cases FILE (the OOD case ids)"
    assert fails("--ood", "--ood-cases", cases, "-l", tmp_path / "dataset.json").startswith("--labels and --roi-masks")
    assert fails("--ood", "--ood-cases", tmp_path / "none.txt") == f"{tmp_path / 'none.txt'}: OOD case list not found"
    (tmp_path / "others.txt").write_text("lidc_0012_n01\n")  # OOD cases of another split
    assert fails("--ood", "--ood-cases", tmp_path / "others.txt").startswith("no OOD lesion voxels: none of the 4")
    (pred / "in_c_ood.nii.gz").unlink()
    msg = fails("--ood", "--ood-cases", cases)
    assert msg == f"{pred / 'in_c_ood.nii.gz'}: OOD score map missing (1 of 4 cases have none)"
    assert not (pred / "ood_summary.json").exists()


def test_cli_evaluate_without_ood_is_unchanged(folders, tmp_path, monkeypatch, capsys):
    """--labels stays required for label maps, and evaluate reads them as before."""
    _, ref = folders
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}}))  # fmt: skip
    code, out, err = run_main(monkeypatch, capsys, "evaluate", "-i", ref, "-r", ref, "-l", tmp_path / "ds" / "dataset.json")  # fmt: skip
    assert code == 0, err
    assert (ref / "summary.json").is_file() and f"written {ref / 'summary.json'}" in out
    assert json.loads((ref / "summary.json").read_text())["mean"]["lesion"]["dice"] == 1.0
