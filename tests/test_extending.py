"""The worked example of docs/extending.md runs: a new task + conditioned model + loss, registered
from outside medseg, trains through the one Trainer (AdamW, warm-up + cosine, EMA, exact resume) and
predicts through the one Predictor with a click."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import REPO, copy_hippo_cases

from medseg import api
from medseg.training.config import TrainingConfig


def _load_example():
    spec = importlib.util.spec_from_file_location(
        "click_segmentation", REPO / "examples/extending/click_segmentation.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.realdata
def test_click_segmentation_example_trains_resumes_and_predicts(tmp_path, isolated_registries):
    example = _load_example()
    data = copy_hippo_cases(tmp_path / "Dataset004_Hippocampus", ["hippocampus_001", "hippocampus_003"])
    ws = tmp_path / "ws"
    api.plan(data, workspace=ws, progress=False)
    api.preprocess(data, workspace=ws, workers=1, progress=False)
    cfg = TrainingConfig(
        epochs=2, iterations_per_epoch=3, val_iterations=1, model="click_unet", model_kwargs={"features": [4, 8, 16, 32]},
        loss="dice_ce_heavy_fg", optimizer="adamw", initial_lr=3e-4, schedule="warmup_cosine", warmup_epochs=1,
        ema_decay=0.9, final_validation=False, checkpoint_every=1, amp=False, num_threads=1,
    )  # fmt: skip
    cfg.check()
    full, part = tmp_path / "full", tmp_path / "part"
    api.train(data, workspace=ws, fold="all", config=cfg, output=full, log=lambda *a, **k: None)
    api.train(data, workspace=ws, fold="all", config=replace(cfg, epochs=1), output=part, log=lambda *a, **k: None)
    api.train(data, workspace=ws, fold="all", config=cfg, output=part, resume=True, log=lambda *a, **k: None)

    from medseg.io.checkpoint import load_spec, load_weights

    spec = load_spec(full)
    assert spec.task == "click_segmentation"
    assert spec.training["optimizer"] == "adamw" and spec.training["loss"] == "dice_ce_heavy_fg"
    assert json.loads((full / "fold_all" / "checkpoint.json").read_text())["ema_decay"] == 0.9
    a, b = load_weights(full / "fold_all"), load_weights(part / "fold_all")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run = uninterrupted run (EMA weights exported)"

    from medseg.inference.predictor import Predictor
    from medseg.io.dataset import list_cases

    predictor = Predictor.from_folder(full, tta=True, amp=False)
    assert type(predictor.task).__name__ == "ClickSegmentation"
    case = list_cases(data)[0]
    image, meta = predictor.read_case(case)
    seg, _ = predictor.predict_array(image, meta, points=[[17.0, 25.0, 15.0]])
    assert seg.shape == image.shape[1:] and seg.dtype == np.uint8
    with pytest.raises(TypeError):  # the model needs its click
        predictor.predict_array(image, meta)

    # the same through `medseg predict`: one click for every case, and a per-case file overriding it
    from typer.testing import CliRunner

    from medseg.cli import app
    from medseg.io.image import read_image

    clicks = tmp_path / "clicks.json"
    clicks.write_text(json.dumps({case.name: {"points": [[17, 25, 15]]}}))
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / case.images[0].name).write_bytes(case.images[0].read_bytes())
    args = ["predict", "-m", str(full), "-i", str(tmp_path / "scans"), "-o", str(tmp_path / "cli"), "--fp32"]
    res = CliRunner().invoke(app, [*args, "--condition", "points=[[1, 2, 3]]", "--conditions", str(clicks)])
    assert res.exit_code == 0, res.output
    cli_seg, _ = read_image(tmp_path / "cli" / f"{case.name}.nii.gz")
    assert np.array_equal(cli_seg, seg), "the per-case click won, as in the API call"
    bad = CliRunner().invoke(app, [*args, "--condition", "points[[1,2,3]]"])
    assert bad.exit_code == 2 and "NAME=JSON" in bad.output
    from medseg.errors import MedsegError

    with pytest.raises(MedsegError, match=r"'boxes' must be \(N, 6\)"):
        predictor.predict_array(image, meta, points=[[17.0, 25.0, 15.0]], boxes=[[1, 2, 3, 4]])
    del example
