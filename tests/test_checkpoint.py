"""Model folders: JSON spec, safetensors weights with sha256 records, the Predictor that loads
them (TTA, fold ensembles, no pickle) and transfer learning between label sets."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from medseg.errors import CheckpointError
from medseg.inference.predictor import Predictor
from medseg.io.checkpoint import ModelSpec, available_folds, load_spec, load_weights, save_spec, save_weights
from medseg.io.dataset import Case
from medseg.io.image import read_image
from medseg.planning.plan import Configuration, Normalization, Plan

torch.set_num_threads(1)

LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}
# hippocampus images are 35 x 51 x 35 at 1 mm: with this patch every axis gets two tiles placed
# symmetrically, so a mirrored input must give the mirrored prediction when TTA is on
PATCH = (24, 36, 24)


def tiny_kwargs(features=(4, 8, 16)) -> dict:
    n = len(features)
    return {
        "features": list(features),
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        "kernel_sizes": [[3, 3, 3]] * n,
        "spatial_dims": 3,
    }


def tiny_spec(labels=LABELS, features=(4, 8, 16)) -> ModelSpec:
    kw = tiny_kwargs(features)
    conf = Configuration(
        "3d_fullres",
        spacing=(1.0, 1.0, 1.0),
        median_shape=(36, 50, 35),
        patch_size=PATCH,
        batch_size=2,
        model="unet",
        model_kwargs=kw,
    )
    plan = Plan("Dataset004_Hippocampus", ("MRI",), dict(labels), (Normalization("zscore"),), {"3d_fullres": conf})
    return ModelSpec("unet", kw, 1, max(labels.values()) + 1, dict(labels), plan, "3d_fullres")


def random_weights(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return spec.build(deep_supervision=True).state_dict()


@pytest.fixture
def model_folder(tmp_path):
    """A 2-fold tiny model folder, as training writes it."""
    spec = tiny_spec()
    save_spec(tmp_path, spec)
    for fold, seed in (("0", 0), ("1", 1)):
        save_weights(tmp_path / f"fold_{fold}", random_weights(spec, seed), info={"epoch": 1, "fold": fold})
    return tmp_path


@pytest.fixture
def hippo_image(hippo_dataset):
    path = hippo_dataset / "imagesTr" / "hippocampus_001_0000.nii.gz"
    image, meta = read_image(path)
    return path, image, meta


# ---------------------------------------------------------------- spec
def test_model_spec_json_round_trip(tmp_path):
    spec = tiny_spec()
    again = ModelSpec.from_json(json.loads(json.dumps(spec.to_json())), tmp_path / "model.json")
    assert again == spec
    save_spec(tmp_path, spec)
    loaded = load_spec(tmp_path)
    assert loaded == spec
    assert loaded.plan.configuration("3d_fullres").patch_size == PATCH
    d = json.loads((tmp_path / "model.json").read_text())
    assert d["format"] == "medseg-model" and d["model"] == "unet" and d["labels"] == LABELS
    # the spec rebuilds the same architecture
    a, b = spec.build().state_dict(), loaded.build().state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_model_spec_rejects_foreign_or_newer_json(tmp_path):
    d = tiny_spec().to_json()
    with pytest.raises(CheckpointError, match="not a medseg model spec"):
        ModelSpec.from_json({**d, "format": "something-else"}, tmp_path)
    with pytest.raises(CheckpointError, match="newer medseg"):
        ModelSpec.from_json({**d, "format_version": 99}, tmp_path)
    with pytest.raises(CheckpointError, match="num_classes"):
        ModelSpec.from_json({k: v for k, v in d.items() if k != "num_classes"}, tmp_path)
    with pytest.raises(CheckpointError, match="model folder not found"):
        load_spec(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="missing model.json"):
        load_spec(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_spec(tmp_path)


# ---------------------------------------------------------------- weights
def test_save_and_load_weights(tmp_path):
    spec = tiny_spec()
    weights = random_weights(spec, 0)
    target = save_weights(tmp_path / "fold_0", weights, info={"epoch": 7, "fold": "0"})
    assert target.name == "model.safetensors"
    assert not list((tmp_path / "fold_0").glob("*.part*")), "atomic write leaves no temp files"
    record = json.loads((tmp_path / "fold_0" / "checkpoint.json").read_text())
    assert record["epoch"] == 7 and len(record["sha256"]) == 64
    loaded = load_weights(tmp_path / "fold_0")
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert available_folds(tmp_path) == ["0"]


def test_tampered_weights_are_refused(model_folder):
    weights = model_folder / "fold_0" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF  # flip one byte inside a tensor
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256 mismatch") as info:
        load_weights(model_folder / "fold_0")
    assert "fold_0" in str(info.value)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        Predictor.from_folder(model_folder, device="cpu")
    Predictor.from_folder(model_folder, folds=["1"], device="cpu")  # the intact fold still loads


def test_truncated_or_unrecorded_weights_are_refused(model_folder):
    fold = model_folder / "fold_0"
    weights = fold / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="sha256"):
        load_weights(fold)
    (fold / "checkpoint.json").write_text("{}")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_weights(fold)
    (fold / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="missing checkpoint.json"):
        load_weights(fold)


def test_weights_that_do_not_match_the_spec_are_refused(model_folder):
    other = tiny_spec(features=(4, 8, 16, 32))
    save_weights(model_folder / "fold_0", random_weights(other, 0))
    with pytest.raises(CheckpointError, match="do not match the model spec"):
        Predictor.from_folder(model_folder, folds=[0], device="cpu")


def test_empty_model_folder(tmp_path):
    save_spec(tmp_path, tiny_spec())
    with pytest.raises(CheckpointError, match="no fold"):
        Predictor.from_folder(tmp_path, device="cpu")


# ---------------------------------------------------------------- predictor
def test_loading_never_unpickles(model_folder, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle-based loading used while reading a model folder")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    predictor = Predictor.from_folder(model_folder, device="cpu")
    assert predictor.folds == ["0", "1"] and len(predictor.models) == 2


def test_predict_real_image_tta_and_ensemble(model_folder, hippo_image, tmp_path):
    path, image, meta = hippo_image
    flipped = np.ascontiguousarray(image[::-1, ::-1, ::-1])
    results = {}
    for tta in (True, False):
        predictor = Predictor.from_folder(model_folder, device="cpu", tta=tta)
        assert predictor.folds == ["0", "1"]
        seg, probs = predictor.predict_array(image[None], meta, return_probabilities=True)
        assert seg.shape == image.shape and probs.shape == (3, *image.shape)
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
        assert np.array_equal(seg, probs.argmax(0))
        _, probs_flipped = predictor.predict_array(flipped[None], meta, return_probabilities=True)
        results[tta] = (probs, np.abs(probs - probs_flipped[:, ::-1, ::-1, ::-1]).max())
    # mirror TTA averages all 8 flips, so the prediction is exactly mirror-equivariant
    assert results[True][1] < 1e-4
    assert results[False][1] > 1e-2, "an untrained net is not mirror-equivariant without TTA"
    assert not np.allclose(results[True][0], results[False][0])


def test_ensemble_averages_fold_logits(model_folder):
    both = Predictor.from_folder(model_folder, device="cpu", tta=False)
    f0 = Predictor.from_folder(model_folder, folds=[0], device="cpu", tta=False)
    f1 = Predictor.from_folder(model_folder, folds=["1"], device="cpu", tta=False)
    assert f0.folds == ["0"] and f1.folds == ["1"]
    x = torch.randn(1, 1, *PATCH)
    with torch.no_grad():
        a, b, ab = (p._predict_tiles(x)["logits"] for p in (f0, f1, both))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(ab, (a + b) / 2, atol=1e-5, rtol=1e-5)


def test_predict_cases_writes_native_geometry(model_folder, hippo_image, tmp_path):
    path, image, meta = hippo_image
    predictor = Predictor.from_folder(model_folder, device="cpu", tta=False)
    out = tmp_path / "pred"
    res = predictor.predict_cases(
        [Case("hippocampus_001", (path,), None)], out, save_probabilities=True, progress=False
    )
    assert res[0]["skipped"] is False
    seg, seg_meta = read_image(out / "hippocampus_001.nii.gz")
    assert seg.shape == image.shape
    np.testing.assert_allclose(seg_meta.spacing, meta.spacing)
    np.testing.assert_allclose(seg_meta.origin, meta.origin)
    np.testing.assert_allclose(seg_meta.direction, meta.direction)
    with np.load(out / "hippocampus_001_probabilities.npz") as z:
        assert z["probabilities"].shape == (3, *image.shape)
        assert list(z["labels"]) == ["background", "Anterior", "Posterior"]
    again = predictor.predict_cases([Case("hippocampus_001", (path,), None)], out, progress=False)
    assert again[0]["skipped"] is True
    assert not [p for p in out.iterdir() if ".part" in p.name]


# ---------------------------------------------------------------- transfer learning
def test_transfer_3_to_5_classes_loads_all_but_heads(tmp_path):
    from medseg.training.transfer import load_pretrained

    src_spec = tiny_spec()
    save_spec(tmp_path / "src", src_spec)
    src = random_weights(src_spec, 0)
    save_weights(tmp_path / "src" / "fold_0", src)

    labels5 = {"background": 0, "a": 1, "b": 2, "c": 3, "d": 4}
    torch.manual_seed(1)
    target = tiny_spec(labels=labels5).build(deep_supervision=True)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    heads = {k for k in fresh if k.startswith("heads.")}
    assert heads

    for source in (tmp_path / "src", tmp_path / "src" / "fold_0", tmp_path / "src" / "fold_0" / "model.safetensors"):
        report = load_pretrained(target, source)
        assert set(report["skipped"]) == heads
        assert report["loaded"] == len(fresh) - len(heads)
        state = target.state_dict()
        for k, v in state.items():
            if k in heads:
                assert torch.equal(v, fresh[k]), f"{k} keeps its fresh initialisation"
                assert v.shape[0] == 5
            else:
                assert torch.equal(v, src[k]), f"{k} copied from the pretrained model"


def test_transfer_refuses_pickled_checkpoints(tmp_path):
    from medseg.training.transfer import load_pretrained

    p = tmp_path / "model.pth"
    p.write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_pretrained(tiny_spec().build(), p)
