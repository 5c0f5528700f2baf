"""Mask-transformer U-Net (MaxQuery): the cluster-assignment algebra, the QD loss, the OOD scores, and
`medseg predict --ood-map` on real LIDC nodule VOIs (tests/fixtures), with its bad-input errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_main

from medseg.inference.ood import OOD_SCORES, check_ood_score, ood_score_map
from medseg.models import create_model
from medseg.tasks import get_task
from medseg.tasks.base import Batch
from medseg.training.config import TrainingConfig
from medseg.training.losses import LOSSES, dice_ce_loss, query_distribution_loss

LIDC = REPO / "tests" / "fixtures" / "lidc_2"
TINY = {"features": [4, 8, 16], "num_queries": 5, "embed_dim": 8, "num_layers": 2, "num_heads": 2}


def _model(dims: int = 3, **kw):
    torch.manual_seed(0)
    return create_model("maskformer_unet", 1, 3, spatial_dims=dims, **{**TINY, **kw})


@pytest.mark.parametrize("dims", [2, 3])
def test_semantic_logits_are_the_soft_cluster_assignment(dims):
    """softmax_k(logits) = sum_i softmax_i(mask logits) softmax_k(class logits): MaxQuery's two stages."""
    shape = (16,) * dims
    out = _model(dims)(torch.randn(2, 1, *shape))
    assign = torch.softmax(out["mask_logits"], 1)  # (B, N, *)
    classes = torch.softmax(out["class_logits"], -1)  # (B, N, K)
    expected = torch.einsum("bn...,bnk->bk...", assign, classes)
    assert torch.allclose(torch.softmax(out["logits"], 1), expected, atol=1e-5)
    assert out["max_affinity"].shape == (2, 1, *shape)
    assert float(out["max_affinity"].detach().abs().max()) <= 1 + 1e-5  # a cosine
    assert len(out["aux_logits"]) == TINY["num_layers"] - 1


def test_inference_model_gives_only_the_maps_and_keeps_the_weights():
    a, b = _model(), _model(deep_supervision=False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    a.eval(), b.eval()
    with torch.no_grad():
        full, maps = a(x), b(x)
    assert set(maps) == {"logits", "max_affinity"}
    assert torch.allclose(full["logits"], maps["logits"], atol=1e-5)


def test_transposed_axis_order_is_undone():
    m = _model(transpose=[0, 2, 1])
    out = m(torch.randn(1, 1, 16, 8, 16))
    assert out["logits"].shape == (1, 3, 16, 8, 16) and out["mask_logits"].shape == (1, 5, 16, 8, 16)


def test_qd_loss_formula_and_gradient_reaches_only_the_assignment():
    torch.manual_seed(1)
    masks = torch.randn(1, 4, 6, 6, requires_grad=True)
    classes = torch.tensor([[[3.0, 0.0], [0.0, 2.0], [1.0, 0.5], [0.0, 1.0]]], requires_grad=True)
    target = (torch.rand(1, 1, 6, 6) > 0.5).long()
    loss = query_distribution_loss(masks, classes, target)
    assign = torch.softmax(masks, 1)
    share = torch.stack([assign[:, [0, 2]].sum(1), assign[:, [1, 3]].sum(1)], 1)  # queries 0, 2 -> class 0
    assert torch.allclose(loss, dice_ce_loss(torch.log(share), target), atol=1e-6)
    loss.backward()
    assert masks.grad.abs().sum() > 0 and (classes.grad is None or classes.grad.abs().sum() == 0)


def test_qd_loss_is_low_when_queries_own_their_class():
    target = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    target[..., :2] = 1
    classes = torch.tensor([[[5.0, 0.0], [0.0, 5.0]]])
    clean = torch.stack([1 - target[:, 0].float(), target[:, 0].float()], 1) * 20  # fg voxels on the fg query
    mixed = torch.zeros_like(clean)
    assert query_distribution_loss(clean, classes, target) < query_distribution_loss(mixed, classes, target) - 0.5


def test_mask_losses_are_registered_and_qd_adds_a_term():
    out = _model()(torch.randn(2, 1, 16, 16, 16))
    batch = Batch(torch.zeros(1), (torch.rand(2, 1, 16, 16, 16) > 0.7).long())
    cfg = TrainingConfig()
    plain, qd = LOSSES.get("mask_dice_ce")(out, batch, cfg), LOSSES.get("mask_dice_ce_qd")(out, batch, cfg)
    assert torch.isfinite(plain) and qd > plain
    assert get_task("mask_segmentation", 3).loss_name == "mask_dice_ce"  # QD measured worse for OOD


def test_ood_scores_by_formula():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])[:, :, None, None]  # (K=2, 2 voxels, 1, 1)
    p = torch.softmax(logits, 0)
    assert torch.allclose(ood_score_map("msp", logits, {})[0], 1 - p.amax(0))
    assert torch.allclose(ood_score_map("maxlogit", logits, {})[0, :, 0, 0], torch.tensor([-2.0, 0.0]))
    ent = ood_score_map("entropy", logits, {})[0, :, 0, 0]
    assert ent[1] == pytest.approx(1.0) and 0 < ent[0] < 1  # uniform = 1 after dividing by log K
    aux = {"max_affinity": torch.full((1, 2, 1, 1), 0.25)}
    assert torch.allclose(ood_score_map("maxquery", logits, aux), torch.full((1, 2, 1, 1), 0.75))
    assert set(OOD_SCORES.names()) >= {"msp", "maxlogit", "entropy", "maxquery"}


def test_maxquery_needs_queries_and_unknown_scores_are_named():
    unet = get_task("segmentation", 2)
    with pytest.raises(ValueError, match="needs a model with queries.*available: entropy, maxlogit, msp"):
        check_ood_score("maxquery", unet, "unet")
    with pytest.raises(ValueError, match="unknown OOD score 'nope'"):
        check_ood_score("nope", unet, "unet")
    assert check_ood_score("maxquery", get_task("mask_segmentation", 2), "maskformer_unet") == "maxquery"


# --------------------------------------------------------------------------- end to end, real VOIs
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A mask transformer and a U-Net trained for a few steps on the two real LIDC VOIs (CT window)."""
    from medseg import api

    root = tmp_path_factory.mktemp("maskformer")
    data = root / "lidc"
    shutil.copytree(LIDC, data)
    (data / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0,
                                       "nodule": 1}, "numTraining": 2, "file_ending": ".nii.gz"}))  # fmt: skip
    ws = root / "ws"
    api.plan(data, workspace=ws, normalization={0: "range:-1000,1000"}, progress=False)
    api.preprocess(data, workspace=ws, workers=1, progress=False)
    models = {}
    for arch in ("maskformer_unet", "unet"):
        cfg = TrainingConfig(epochs=1, iterations_per_epoch=2, val_iterations=0, model=arch, final_validation=False,
                             model_kwargs={"features": [4, 8, 16, 32]})  # fmt: skip
        models[arch] = root / arch
        api.train(data, ws, fold="all", config=cfg, output=models[arch], log=lambda *_: None)
    return {"data": data, **models}


def test_predict_writes_ood_maps_and_overlays_on_real_vois(trained, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pred"
    code, _, err = run_main(monkeypatch, capsys, "predict", "-m", trained["maskformer_unet"], "-i",
                            trained["data"] / "imagesTr", "-o", out, "--ood-map", "--overlay", "--no-tta")  # fmt: skip
    assert code == 0, err
    from medseg.io.image import read_image

    for case in ("lidc_0001_n01", "lidc_0003_n02"):
        score, meta = read_image(out / f"{case}_ood.nii.gz")
        image, ref_meta = read_image(trained["data"] / "imagesTr" / f"{case}_0000.nii.gz")
        assert score.dtype == np.float32 and score.shape == image.shape  # native geometry
        assert np.allclose(meta.spacing, ref_meta.spacing) and np.isfinite(score).all()
        assert 0 <= score.min() and score.max() <= 2  # 1 - cosine
        assert (out / f"{case}_ood.png").stat().st_size > 1000
    assert json.loads((out / "manifest.json").read_text())["ood_map"] == ["maxquery"]
    # the score maps are side outputs: a plain evaluation of the folder ignores them
    code, stdout, err = run_main(monkeypatch, capsys, "evaluate", "-i", out, "-r", trained["data"] / "labelsTr",
                                 "-l", trained["data"] / "dataset.json")  # fmt: skip
    assert code == 0, err
    assert "2 cases" in stdout


def test_baseline_scores_from_a_plain_unet_and_maxquery_refused(trained, tmp_path, monkeypatch, capsys):
    args = ["predict", "-m", trained["unet"], "-i", trained["data"] / "imagesTr", "--no-tta", "--ood-map"]
    code, _, err = run_main(monkeypatch, capsys, *args, "-o", tmp_path / "a", "--ood-score", "maxquery")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "needs a model with queries" in err
    assert not (tmp_path / "a").exists()  # nothing half written
    code, _, err = run_main(monkeypatch, capsys, *args, "-o", tmp_path / "b")
    assert code == 0, err
    from medseg.io.image import read_image

    msp = read_image(tmp_path / "b" / "lidc_0001_n01_ood.nii.gz")[0]
    assert 0 <= msp.min() and msp.max() <= 0.5 + 1e-6  # two classes: 1 - max p <= 1/2
    code, _, err = run_main(monkeypatch, capsys, "predict", "-m", trained["unet"], "-i", trained["data"] / "imagesTr",
                            "-o", tmp_path / "c", "--ood-score", "msp")  # fmt: skip
    assert code != 0 and "--ood-score needs --ood-map" in err


def test_several_scores_from_one_pass(trained, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pred"
    code, _, err = run_main(monkeypatch, capsys, "predict", "-m", trained["maskformer_unet"], "-i",
                            trained["data"] / "imagesTr", "-o", out, "--ood-map", "--no-tta", "--ood-score",
                            "entropy", "--ood-score", "maxquery", "--ood-score", "msp")  # fmt: skip
    assert code == 0, err
    from medseg.io.image import read_image

    names = sorted(p.name for p in out.glob("lidc_0001_n01_ood*"))
    assert names == ["lidc_0001_n01_ood.nii.gz", "lidc_0001_n01_ood_maxquery.nii.gz", "lidc_0001_n01_ood_msp.nii.gz"]
    entropy, msp = (read_image(out / n)[0] for n in (names[0], names[2]))
    assert np.corrcoef(entropy.ravel(), msp.ravel())[0, 1] > 0.9  # both peak where the classes are confused
    code, stdout, err = run_main(monkeypatch, capsys, "evaluate", "-i", out, "-r", trained["data"] / "labelsTr",
                                 "-l", trained["data"] / "dataset.json")  # fmt: skip
    assert code == 0 and "2 cases" in stdout, err


def test_vois_smaller_than_the_patch_are_padded(trained, tmp_path):
    """A 2-slice VOI (the plan's patch has more) is predicted whole, maps in its own geometry."""
    from medseg.inference.predictor import Predictor
    from medseg.io.image import read_image

    image, meta = read_image(trained["data"] / "imagesTr" / "lidc_0003_n02_0000.nii.gz")
    small = image[:2]  # (z, y, x): two slices
    predictor = Predictor.from_folder(trained["maskformer_unet"], tta=False, ood_map="maxquery")
    maps = predictor.predict_maps(small[None].astype(np.float32), meta)
    assert maps["labels"].shape == small.shape and maps["ood"].shape == (1, *small.shape)
    assert math.isfinite(float(maps["ood"].mean()))


# --------------------------------------------------------------------------- the shipped model
OOD_VOIS = REPO / "tests" / "fixtures" / "lidc_ood_2"  # a ground-glass and a calcified nodule, never trained on


def test_shipped_lidc_model_segments_nodules_and_maps_ood(tmp_path, monkeypatch, capsys):
    from medseg.evaluation.metrics import evaluate_folder
    from medseg.io.image import read_image

    out = tmp_path / "pred"
    for folder in (LIDC, OOD_VOIS):
        code, _, err = run_main(monkeypatch, capsys, "predict", "-m", "lidc-nodule", "-i", folder / "imagesTr",
                                "-o", out, "--ood-map", "--no-tta")  # fmt: skip
        assert code == 0, err
    refs = tmp_path / "refs"
    refs.mkdir()
    for folder in (LIDC, OOD_VOIS):
        for f in (folder / "labelsTr").iterdir():
            shutil.copy(f, refs / f.name)
    dice = evaluate_folder(out, refs, {"background": 0, "nodule": 1}, progress=False)["per_case"]
    # lidc_0001_n01: solid (a training case); lidc_0003_n02: part-solid, never trained on
    assert dice["lidc_0001_n01"]["nodule"]["dice"] > 0.8 and dice["lidc_0003_n02"]["nodule"]["dice"] > 0.6
    for case in ("lidc_0001_n01", "lidc_0048_n03", "lidc_0021_n03"):
        score = read_image(out / f"{case}_ood.nii.gz")[0]
        assert score.dtype == np.float32 and 0 <= score.min() and score.max() <= 2
