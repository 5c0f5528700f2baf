"""End to end through the real command line on 10 real hippocampus cases:
verify -> plan -> preprocess -> train (tiny) -> predict (folder, probabilities, overlays) -> evaluate."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medseg.io.image import read_image

TINY_NET = json.dumps({"features": [4, 8, 16, 32]})


def medseg(*args, cwd: Path, module: str = "medseg.cli", expect: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDSEG_WORKSPACE": str(cwd / "default_ws")}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == expect, (
        f"medseg {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def trained(hippo_dataset, tmp_path_factory):
    """verify -> plan -> preprocess -> train, through the CLI; returns (work dir, model folder)."""
    work = tmp_path_factory.mktemp("e2e")
    ws, model = work / "ws", work / "model"
    out = medseg("verify", hippo_dataset, cwd=work, module="medseg")  # `python -m medseg` works too
    assert "10 cases OK" in out.stdout
    medseg("plan", hippo_dataset, "-w", ws, cwd=work)
    assert list(ws.glob("preprocessed/*/plan.json"))
    medseg("preprocess", hippo_dataset, "-w", ws, "--workers", "1", cwd=work)
    assert len(list(ws.glob("preprocessed/*/data_*/*_seg.npy"))) == 10
    out = medseg(
        "train",
        hippo_dataset,
        "-w",
        ws,
        "-o",
        model,
        "--epochs",
        "2",
        "--iterations",
        "3",
        "--val-iterations",
        "1",
        "--threads",
        "1",
        "--model-kwargs",
        TINY_NET,
        cwd=work,
    )
    # a one-screen summary, not a JSON dump; the full summary is in the file it names
    assert not out.stdout.lstrip().startswith("{") and len(out.stdout.splitlines()) < 25
    assert f"-> {model / 'fold_0' / 'validation' / 'summary.json'}" in out.stdout
    assert "Anterior" in out.stdout and "Dice" in out.stdout and "cases; HD95" in out.stdout
    # epochs are counted from 1 on the console and in training_log.jsonl alike
    logged = [json.loads(line)["epoch"] for line in (model / "fold_0" / "training_log.jsonl").read_text().splitlines()]
    console = [int(m) for m in re.findall(r"^epoch (\d+)/2 ", out.stderr, re.M)]
    assert logged == console == [1, 2]
    return work, model


def test_training_outputs(trained, hippo_dataset):
    work, model = trained
    spec = json.loads((model / "model.json").read_text())
    assert spec["model"] == "unet" and spec["model_kwargs"]["features"] == [4, 8, 16, 32]
    assert spec["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    # the training range predict compares each case with (medseg.planning.ood)
    data = spec["training_data"]
    assert data["num_cases"] == 10 and data["spacing_mm"] == {"min": [1.0, 1.0, 1.0], "max": [1.0, 1.0, 1.0]}
    assert all(20 < e < 70 for e in data["extent_mm"]["min"] + data["extent_mm"]["max"])
    fold = model / "fold_0"
    assert (fold / "model.safetensors").is_file() and (fold / "checkpoint.json").is_file()
    assert [json.loads(line)["epoch"] for line in (fold / "training_log.jsonl").read_text().splitlines()] == [1, 2]
    # final validation: the fold's validation cases predicted in native space and evaluated
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    splits = json.loads(next((work / "ws").glob("preprocessed/*/splits_final.json")).read_text())
    assert sorted(summary["per_case"]) == sorted(splits[0]["val"])
    assert set(summary["mean"]) == {"Anterior", "Posterior"}
    assert (fold / "validation" / "summary.csv").is_file()
    for case in splits[0]["val"]:
        pred, pm = read_image(fold / "validation" / f"{case}.nii.gz")
        ref, rm = read_image(hippo_dataset / "labelsTr" / f"{case}.nii.gz")
        assert pred.shape == ref.shape
        np.testing.assert_allclose(pm.origin, rm.origin)
    assert not (work / "default_ws").exists(), "nothing written outside the given workspace"


def test_resume_of_a_finished_run_is_a_clean_no_op(trained, hippo_dataset):
    work, model = trained
    before = (model / "fold_0" / "model.safetensors").read_bytes()
    out = medseg(
        "train",
        hippo_dataset,
        "-w",
        work / "ws",
        "-o",
        model,
        "--epochs",
        "2",
        "--iterations",
        "3",
        "--val-iterations",
        "1",
        "--threads",
        "1",
        "--model-kwargs",
        TINY_NET,
        "--resume",
        cwd=work,
    )
    assert "already trained" in out.stderr
    assert (model / "fold_0" / "model.safetensors").read_bytes() == before
    assert "final validation" in out.stdout and "Anterior" in out.stdout  # the earlier validation summary


def test_bad_model_kwargs_is_a_one_line_error(trained, hippo_dataset):
    work, _ = trained
    out = medseg(
        "train", hippo_dataset, "-w", work / "ws", "--model-kwargs", "{features: 4", "--epochs", "1", cwd=work, expect=2
    )
    assert out.stderr.strip().startswith("medseg: error: --model-kwargs")
    assert len(out.stderr.strip().splitlines()) == 1


def test_predict_and_evaluate(trained, hippo_dataset):
    work, model = trained
    cases = ["hippocampus_003", "hippocampus_015"]
    inp, pred = work / "in", work / "pred"
    inp.mkdir()
    for c in cases:
        shutil.copyfile(hippo_dataset / "imagesTr" / f"{c}_0000.nii.gz", inp / f"{c}_0000.nii.gz")

    out = medseg("predict", "-m", model, "-i", inp, "-o", pred, "--probabilities", "--overlay", cwd=work)
    assert "2 predicted" in out.stdout
    assert "warning" not in out.stderr, "cases like the training data are not out of distribution"
    for c in cases:
        seg, sm = read_image(pred / f"{c}.nii.gz")
        img, im = read_image(inp / f"{c}_0000.nii.gz")
        assert seg.shape == img.shape, "label map in the input's native grid"
        np.testing.assert_allclose(sm.spacing, im.spacing)
        np.testing.assert_allclose(sm.origin, im.origin)
        np.testing.assert_allclose(sm.direction, im.direction)
        assert set(np.unique(seg)) <= {0, 1, 2}
        with np.load(pred / f"{c}_probabilities.npz") as z:
            probs = z["probabilities"].astype(np.float32)
        assert probs.shape == (3, *img.shape)
        assert np.array_equal(probs.argmax(0), seg) or (probs.argmax(0) != seg).mean() < 1e-3  # fp16 ties
        assert (pred / f"{c}_overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((pred / "volumes.csv").read_text().splitlines()))
    assert {(r["case"], r["structure"]) for r in rows} == {(c, s) for c in cases for s in ("Anterior", "Posterior")}
    for r in rows:
        seg, sm = read_image(pred / f"{r['case']}.nii.gz")
        voxels = int((seg == {"Anterior": 1, "Posterior": 2}[r["structure"]]).sum())
        assert int(r["voxels"]) == voxels
        assert float(r["volume_ml"]) == pytest.approx(voxels * np.prod(sm.spacing) / 1000, abs=1e-3)
    manifest = json.loads((pred / "manifest.json").read_text())
    assert manifest["folds"] == ["0"] and [c["skipped"] for c in manifest["cases"]] == [False, False]

    # a second run skips finished cases and leaves their files alone
    stamps = {c: (pred / f"{c}.nii.gz").stat().st_mtime_ns for c in cases}
    out = medseg("predict", "-m", model, "-i", inp, "-o", pred, cwd=work)
    assert "0 predicted, 2 already done" in out.stdout
    assert {c: (pred / f"{c}.nii.gz").stat().st_mtime_ns for c in cases} == stamps
    assert all(c["skipped"] for c in json.loads((pred / "manifest.json").read_text())["cases"])

    report = work / "eval" / "summary.json"
    out = medseg(
        "evaluate",
        "--pred",
        pred,
        "--ref",
        hippo_dataset / "labelsTr",
        "--labels",
        hippo_dataset / "dataset.json",
        "-o",
        report,
        cwd=work,
    )
    assert "Anterior" in out.stdout and "Posterior" in out.stdout
    summary = json.loads(report.read_text())
    undefined = sum(any(m["hd95"] is None for m in c.values()) for c in summary["per_case"].values())
    assert f"2 cases; HD95 undefined in {undefined} of them" in out.stdout or (
        undefined == 0 and "2 cases; HD95 defined for every case and class" in out.stdout
    )
    assert summary["num_cases"] == 2 and sorted(summary["per_case"]) == cases
    for m in summary["mean"].values():
        assert 0.0 <= m["dice"] <= 1.0
    table = list(csv.DictReader(report.with_suffix(".csv").read_text().splitlines()))
    assert len(table) == 4 and {r["class"] for r in table} == {"Anterior", "Posterior"}
