"""``medseg crossval``: the folds' validation predictions evaluated as one set (real hippocampus
cases, the shipped model's weights standing in for two folds), overlap and missing-prediction
errors, and the largest-component choice."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.conftest import HIPPO_CASES, run_main

FOLD0, FOLD1 = HIPPO_CASES[:2], HIPPO_CASES[2:4]


@pytest.fixture
def cli(monkeypatch, capsys):
    return lambda *args: run_main(monkeypatch, capsys, *args)


def _two_fold_model(root):
    from medseg.io.checkpoint import resolve_model

    src = resolve_model("hippocampus")
    root.mkdir()
    shutil.copyfile(src / "model.json", root / "model.json")
    for fold in ("0", "1"):
        shutil.copytree(src / "fold_0", root / f"fold_{fold}")
        ck = json.loads((root / f"fold_{fold}" / "checkpoint.json").read_text())
        (root / f"fold_{fold}" / "checkpoint.json").write_text(json.dumps({**ck, "fold": fold}))
    return root


def _splits(path, fold0, fold1):
    path.write_text(json.dumps([{"train": fold1, "val": fold0}, {"train": fold0, "val": fold1}]))
    return path


@pytest.fixture(scope="module")
def crossvalidated(tmp_path_factory, hippo_dataset):
    from medseg.evaluation.crossval import cross_validate

    tmp = tmp_path_factory.mktemp("cv")
    model = _two_fold_model(tmp / "model")
    summary = cross_validate(model, hippo_dataset, splits=_splits(tmp / "splits.json", FOLD0, FOLD1), progress=False)
    return model, summary


def test_every_case_is_scored_by_the_fold_that_held_it_out(crossvalidated, hippo_dataset):
    from medseg.evaluation.metrics import evaluate_folder
    from medseg.io.checkpoint import load_spec

    model, s = crossvalidated
    assert s["num_cases"] == 4 and s["folds"] == {"0": 2, "1": 2}
    assert s["fold_of"] == {**dict.fromkeys(FOLD0, "0"), **dict.fromkeys(FOLD1, "1")}
    assert s["missing_cases"] == sorted(HIPPO_CASES[4:])  # in labelsTr, in no fold's validation
    assert s["foreground_mean"]["dice"] > 0.8 and s["mean"]["Posterior"]["hd95"] < 3
    labels = load_spec(model).labels
    direct = evaluate_folder(model / "fold_1" / "validation", hippo_dataset / "labelsTr", labels, names=FOLD1)
    for case in FOLD1:
        assert s["per_case"][case] == direct["per_case"][case]
    written = json.loads((model / "crossval" / "summary.json").read_text())
    assert written["foreground_mean"] == pytest.approx(s["foreground_mean"])
    assert (model / "crossval" / "postprocessing.json").is_file()


def test_cli_reads_existing_validations_and_refuses_to_overwrite(crossvalidated, hippo_dataset, cli):
    model, s = crossvalidated
    code, _, err = cli("crossval", "-m", model, hippo_dataset)
    assert code != 0 and "summary.json" in err
    code, out, _ = cli("crossval", "-m", model, hippo_dataset, "--overwrite", "--no-postprocessing")
    assert code == 0, out
    assert "cross-validation of 4 cases (fold 0: 2, fold 1: 2)" in out
    assert f"Dice {s['foreground_mean']['dice']:.4f}" in out
    assert "6 reference case(s) in no fold's validation" in out


def test_overlapping_validation_sets_are_refused(tmp_path, hippo_dataset, cli):
    model = _two_fold_model(tmp_path / "model")
    splits = _splits(tmp_path / "splits.json", FOLD0, [FOLD0[0]])
    code, _, err = cli("crossval", "-m", model, hippo_dataset, "--splits", splits)
    assert code == 2 and "overlap" in err and f"{FOLD0[0]}.nii.gz" in err
    assert not (model / "crossval").exists()


def test_a_fold_without_validation_needs_splits(tmp_path, hippo_dataset, cli):
    model = _two_fold_model(tmp_path / "model")
    code, _, err = cli("crossval", "-m", model, hippo_dataset)
    assert code == 2 and "fold_0/validation" in err and "--splits" in err
    assert len(err.strip().splitlines()) == 1


def test_largest_component_is_kept_only_where_it_raises_dice(tmp_path, hippo_dataset):
    from medseg.evaluation.crossval import choose_postprocessing
    from medseg.evaluation.metrics import evaluate_case
    from medseg.io.image import read_image, write_image

    labels = {"background": 0, "Anterior": 1, "Posterior": 2}
    per_case, paths = {}, {}
    for case in FOLD0:
        ref, meta = read_image(hippo_dataset / "labelsTr" / f"{case}.nii.gz")
        pred = ref.copy()
        pred[:2, :2, :2] = 1  # a stray anterior blob in a corner, away from the structure
        paths[case] = write_image(pred.astype(np.uint8), meta, tmp_path / f"{case}.nii.gz")
        per_case[case] = evaluate_case(pred, ref, meta.spacing, labels)
    choice, after = choose_postprocessing(
        per_case, paths, hippo_dataset / "labelsTr", labels, ending=".nii.gz", nsd=1.0, progress=False
    )
    assert choice["largest_component"] == [1]
    assert choice["per_label"]["Anterior"]["dice_largest_component"] > choice["per_label"]["Anterior"]["dice"]
    assert not choice["per_label"]["Posterior"]["keep_largest"]  # already one component: nothing changes
    assert all(after[c]["Anterior"]["dice"] == pytest.approx(1.0) for c in FOLD0)
