"""Misuse that used to lose data or print a traceback (issue 17, first items): each is refused in one
line naming the problem, with a non-zero exit, and nothing is written over an input."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
from conftest import REPO, run_main

EXAMPLES = REPO / "examples" / "hippocampus"


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("medseg: error: "), err
    return lines[0]


def _scans(tmp_path):
    src = sorted((EXAMPLES / "images").glob("*.nii.gz"))[0]
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copyfile(src, scans / src.name)
    return scans, scans / src.name


@pytest.mark.parametrize("where", ["same", "inside", "contains", "single_file_folder"])
def test_predict_never_writes_over_or_among_its_inputs(tmp_path, monkeypatch, capsys, where):
    scans, image = _scans(tmp_path)
    before = image.read_bytes()
    inp, out = {
        "same": (scans, scans),
        "inside": (scans, scans / "out"),
        "contains": (scans, tmp_path),
        "single_file_folder": (image, scans),
    }[where]
    code, _, err = run_main(monkeypatch, capsys, "predict", "-m", "hippocampus", "-i", inp, "-o", out, "--overwrite")
    assert code == 2 and "apart from the input" in one_line_error(err)
    assert image.read_bytes() == before and sorted(p.name for p in scans.iterdir()) == [image.name]


def test_duplicate_label_values_are_refused(tmp_path):
    from medseg.errors import DatasetError
    from medseg.io.dataset import load_dataset_json

    (tmp_path / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "Posterior": 2, "Tail": 2}})
    )
    with pytest.raises(DatasetError, match="'Posterior' and 'Tail' have the same value 2"):
        load_dataset_json(tmp_path)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--step", "0"], "--step must be in (0, 1]"),
        (["--step", "1.5"], "--step must be in (0, 1]"),
        (["-f", "3"], "has no fold 3 (folds: 0)"),
        (["--device", "cuda"], "has no CUDA device"),
        (["--device", "tpu7"], "unknown device 'tpu7'"),
    ],
)
def test_predict_options_out_of_range(tmp_path, monkeypatch, capsys, args, needle):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    scans, _ = _scans(tmp_path)
    code, _, err = run_main(
        monkeypatch, capsys, "predict", "-m", "hippocampus", "-i", scans, "-o", tmp_path / "o", *args
    )
    assert code == 2 and needle in one_line_error(err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--time-budget", "-1"], "--time-budget must be a positive"),
        (["--optimizer", "lion"], "unknown optimizer 'lion'"),
        (["--ema-decay", "1.5"], "--ema-decay must be between 0 and 1"),
    ],
)
def test_train_options_out_of_range(tmp_path, monkeypatch, capsys, args, needle):
    code, _, err = run_main(monkeypatch, capsys, "train", REPO / "tests/fixtures/busi_4", "-w", tmp_path / "ws", *args)
    assert code == 2 and needle in one_line_error(err)


def test_plan_budget_and_single_case_fold(tmp_path, monkeypatch, capsys):
    data = REPO / "tests" / "fixtures" / "busi_4"
    code, _, err = run_main(monkeypatch, capsys, "plan", data, "-w", tmp_path / "ws", "--budget", "foo")
    assert code == 2 and "--budget: unknown 'foo' (choose from cpu, gpu)" in one_line_error(err)

    one = tmp_path / "one"
    shutil.copytree(data, one)
    for f in sorted((one / "imagesTr").iterdir())[1:]:
        f.unlink()
        (one / "labelsTr" / f.name.replace("_0000", "")).unlink()
    ws = tmp_path / "ws1"
    assert run_main(monkeypatch, capsys, "plan", one, "-w", ws)[0] == 0
    assert run_main(monkeypatch, capsys, "preprocess", one, "-w", ws, "--workers", "1")[0] == 0
    code, _, err = run_main(monkeypatch, capsys, "train", one, "-w", ws, "-f", "0", "--epochs", "1")
    assert code == 2 and "fold 0 has no training case (1 case(s) in all); use -f all" in one_line_error(err)


def test_written_files_follow_the_umask(tmp_path):
    from medseg.io.checkpoint import save_weights
    from medseg.io.image import ImageMeta, write_image
    from medseg.io.jsonio import write_json

    old = os.umask(0o022)
    try:
        import numpy as np
        import torch

        write_json(tmp_path / "a.json", {"x": 1})
        save_weights(tmp_path / "fold_0", {"w": torch.zeros(2)})
        write_image(np.zeros((2, 3, 4), np.uint8), ImageMeta((1.0, 1.0, 1.0)), tmp_path / "seg.nii.gz")
        write_image(np.zeros((1, 3, 4), np.uint8), ImageMeta((1.0, 1.0, 1.0)), tmp_path / "seg.png")
    finally:
        os.umask(old)
    for f in ("a.json", "fold_0/model.safetensors", "fold_0/checkpoint.json", "seg.nii.gz", "seg.png"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o644, f


def test_version(monkeypatch, capsys):
    from medseg import __version__

    code, out, _ = run_main(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"medseg {__version__}"


@pytest.mark.parametrize("keep", [120, 300, 600])
def test_a_nifti_cut_in_its_first_bytes_is_unreadable_everywhere(tmp_path, monkeypatch, capsys, keep):
    from medseg.errors import ImageReadError
    from medseg.io.image import read_image

    src = sorted((EXAMPLES / "images").glob("*.nii.gz"))[0]
    cut = tmp_path / "in" / src.name
    cut.parent.mkdir()
    cut.write_bytes(src.read_bytes()[:keep])
    with pytest.raises(ImageReadError, match="truncated|corrupt|not an image"):
        read_image(cut)
    code, _, err = run_main(monkeypatch, capsys, "predict", "-m", "hippocampus", "-i", cut, "-o", tmp_path / "out")
    assert code == 2 and src.name in one_line_error(err)
    assert not (tmp_path / "out").exists(), "a failed single-file predict leaves no empty folder"


def test_resuming_into_a_folder_of_another_models_predictions_is_refused(tmp_path, monkeypatch, capsys):
    scans, _ = _scans(tmp_path)
    out = tmp_path / "out"
    base = ["predict", "-m", "hippocampus", "-i", scans, "-o", out, "--no-tta"]
    assert run_main(monkeypatch, capsys, *base)[0] == 0
    code, stdout, _ = run_main(monkeypatch, capsys, *base)  # same model, same options: resumes (skips)
    assert code == 0 and "1 already done" in stdout
    merged = tmp_path / "merged.json"
    merged.write_text(json.dumps({"Anterior": "hippocampus", "Posterior": "hippocampus"}))
    for other in (["--label-map", merged], ["--step", "0.25"]):
        code, _, err = run_main(monkeypatch, capsys, *base, *other)
        assert code == 2 and "holds predictions made with another" in one_line_error(err)
    code, stdout, _ = run_main(monkeypatch, capsys, *base, "--label-map", merged, "--overwrite")
    assert code == 0 and "1 predicted" in stdout
    (out / ".medseg_predictions.json").unlink()  # outputs of an unknown run (e.g. an older medseg)
    code, _, err = run_main(monkeypatch, capsys, *base)
    assert code == 2 and "unknown run" in one_line_error(err)
