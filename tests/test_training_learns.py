"""Training learns: 250 steps on two of real hippocampus cases fit them.

The end-to-end tests only check that the pipeline runs (0 <= Dice <= 1); this one fails if the loop,
the loss, the optimiser or the schedule stop actually fitting data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import copy_hippo_cases

from medseg import api
from medseg.training.config import TrainingConfig

CASES = ["hippocampus_001", "hippocampus_003"]


@pytest.mark.realdata
def test_a_few_hundred_steps_fit_the_training_cases(tmp_path):
    from medseg.inference.predictor import Predictor
    from medseg.io.dataset import list_cases
    from medseg.io.image import read_image

    data = copy_hippo_cases(tmp_path / "Dataset004_Hippocampus", CASES)
    ws = tmp_path / "ws"
    api.plan(data, workspace=ws, progress=False)
    api.preprocess(data, workspace=ws, workers=1, progress=False)
    cfg = TrainingConfig(epochs=5, iterations_per_epoch=50, val_iterations=0, augmentation="none",
                         final_validation=False, checkpoint_every=5, seed=0)  # fmt: skip
    out = tmp_path / "model"
    api.train(data, workspace=ws, fold="all", config=cfg, output=out, log=lambda *a, **k: None)
    lines = (out / "fold_all" / "training_log.jsonl").read_text().splitlines()
    log = [json.loads(line)["train_loss"] for line in lines]
    assert log[-1] < -0.45 < log[0], f"Dice + CE should fall well below zero: {log}"
    predictor = Predictor.from_folder(out, tta=False)
    results = predictor.predict_cases(list_cases(data), tmp_path / "pred", progress=False)
    for res in results:
        pred, _ = read_image(res["output"])
        ref, _ = read_image(data / "labelsTr" / f"{res['case']}.nii.gz")
        # the whole hippocampus; telling anterior from posterior takes longer than 250 steps
        dice = 2 * np.sum((pred > 0) & (ref > 0)) / (np.sum(pred > 0) + np.sum(ref > 0))
        assert dice > 0.8, f"{res['case']}: whole-hippocampus training Dice after 250 steps {dice:.3f}"
