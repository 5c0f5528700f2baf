"""Transfer learning: fine-tuning adopts the pretrained architecture (heads re-initialised for the
target's classes), fine-tuning schedule (warm-up, frozen encoder, exact resume), metadata, and
direct inference with a label map. Real hippocampus data, the shipped model, a few iterations."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HIPPO_CASES, REPO, TrainingInterrupted, copy_hippo_cases, crash_training_at

from medseg import api
from medseg.errors import CheckpointError, DatasetError
from medseg.inference.label_map import apply_label_mapping, build_label_mapping, load_label_mapping
from medseg.inference.predictor import Predictor
from medseg.io.checkpoint import PRETRAINED_DIR, load_spec, load_weights
from medseg.io.dataset import Case
from medseg.io.image import read_image, write_image
from medseg.planning.plan import Plan
from medseg.preprocessing.pipeline import cache_folder
from medseg.training.config import TrainingConfig
from medseg.training.trainer import Trainer, poly_lr
from medseg.training.transfer import fit_patch, patch_divisor
from medseg.workspace import Workspace

SHIPPED = PRETRAINED_DIR / "hippocampus"
EXAMPLE = REPO / "examples" / "hippocampus" / "images" / "hippocampus_001.nii.gz"
HIPPO_LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}
MERGE = {"Anterior": "hippocampus", "Posterior": "hippocampus"}

TINY = TrainingConfig(
    epochs=2,
    iterations_per_epoch=1,
    val_iterations=0,
    batch_size=1,
    num_threads=1,
    final_validation=False,
    checkpoint_every=10,
    augmentation="none",
)


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    """Real hippocampus cases with both labels merged into one (a label set the shipped model lacks);
    the plan is edited to a small 3-stage net and a patch the pretrained net cannot tile."""
    root = tmp_path_factory.mktemp("binary")
    dataset = copy_hippo_cases(root / "HippoWhole", HIPPO_CASES[:4])
    for f in (dataset / "labelsTr").iterdir():
        seg, meta = read_image(f)
        write_image((seg > 0).astype(np.uint8), meta, f)
    info = json.loads((dataset / "dataset.json").read_text())
    info.update(name="HippoWhole", labels={"background": 0, "hippocampus": 1})
    (dataset / "dataset.json").write_text(json.dumps(info))
    ws = Workspace(root / "ws")
    api.plan(dataset, ws, progress=False)
    plan_path = ws.plan_path("HippoWhole")
    plan = json.loads(plan_path.read_text())
    conf = plan["configurations"]["3d_fullres"]
    conf["patch_size"] = [36, 52, 36]  # a multiple of 4 (the planned net below), not of 8 (the pretrained)
    conf["model_kwargs"] = {
        "features": [4, 8, 16],
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "kernel_sizes": [[3, 3, 3]] * 3,
        "n_conv_per_stage": 2,
        "spatial_dims": 3,
    }
    plan_path.write_text(json.dumps(plan))
    api.preprocess(dataset, ws, workers=1, progress=False)
    return dataset, ws


def make_trainer(binary, out: Path, config: TrainingConfig, log=quiet) -> Trainer:
    dataset, ws = binary
    plan = Plan.load(ws.plan_path("HippoWhole"))
    pre = ws.preprocessed("HippoWhole")
    conf = plan.configuration("3d_fullres")
    return Trainer(plan, "3d_fullres", cache_folder(pre, conf), pre, out, 0, config, log=log)


# ---------------------------------------------------------------- architecture adoption
def test_finetune_adopts_the_pretrained_network(binary, tmp_path):
    messages = []
    t = make_trainer(binary, tmp_path / "m", replace(TINY, pretrained="hippocampus"), log=messages.append)
    shipped = load_spec(SHIPPED)
    assert t.spec.model == shipped.model
    assert t.spec.model_kwargs == shipped.model_kwargs, "the pretrained network, not the planned 3-stage one"
    assert t.spec.num_classes == 2 and t.spec.labels == {"background": 0, "hippocampus": 1}
    # the target plan keeps its spacing/normalisation; the patch is rounded up to tile the pretrained net
    assert tuple(t.conf.patch_size) == (40, 56, 40)
    assert tuple(t.spec.plan.configuration("3d_fullres").patch_size) == (40, 56, 40)
    assert t.spec.plan.dataset_name == "HippoWhole"

    src = load_weights(SHIPPED / "fold_0")
    state = t.model.state_dict()
    heads = {k for k in state if k.startswith("heads.")}
    assert heads and all(state[k].shape[0] == 2 for k in heads if k.endswith(".weight"))
    torch.manual_seed(TINY.seed)
    fresh = t.spec.build(deep_supervision=True).state_dict()
    for k, v in state.items():
        if k in heads:
            assert torch.equal(v, fresh[k]), f"{k} re-initialised"
        else:
            assert torch.equal(v, src[k]), f"{k} copied from the pretrained model"
    text = "\n".join(messages)
    assert f"loaded {len(state) - len(heads)} of {len(state)} tensors, re-initialised {len(heads)} (heads)" in text
    assert "using patch [40, 56, 40]" in text


def test_explicit_model_kwargs_override_the_pretrained_ones(binary, tmp_path):
    cfg = replace(TINY, pretrained=str(SHIPPED), model_kwargs={"n_conv_per_stage_decoder": 1})
    t = make_trainer(binary, tmp_path / "m", cfg)
    assert t.spec.model_kwargs == {**load_spec(SHIPPED).model_kwargs, "n_conv_per_stage_decoder": 1}
    assert all(len(stage) == 1 for stage in t.model.decoder)
    # nothing left to transfer (other widths) is an error, not a silent training from scratch
    with pytest.raises(CheckpointError, match="no tensor matches"):
        make_trainer(binary, tmp_path / "m", replace(cfg, model_kwargs={"features": [8, 16, 32, 64]}))


def test_in_channels_mismatch_is_one_clear_error(binary, tmp_path):
    import shutil

    other = tmp_path / "two_channel_model"
    shutil.copytree(SHIPPED, other)
    spec = json.loads((other / "model.json").read_text())
    spec["in_channels"] = 2
    (other / "model.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="2 input channel") as exc:
        make_trainer(binary, tmp_path / "m", replace(TINY, pretrained=str(other)))
    line = exc.value.one_line()
    assert str(other / "model.json") in line and "\n" not in line and "has 1" in line


def test_patch_divisor_and_rounding():
    kw = load_spec(SHIPPED).model_kwargs
    assert patch_divisor(kw, 3) == (8, 8, 8)
    assert fit_patch((36, 52, 40), (8, 8, 8)) == (40, 56, 40)
    aniso = {"strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]], "transpose": [2, 0, 1]}
    # network axis i is the caller's axis transpose[i]: network (2, 4, 4) -> caller (4, 4, 2)
    assert patch_divisor(aniso, 3) == (4, 4, 2)
    assert patch_divisor({"features": [4]}, 3) is None


# ---------------------------------------------------------------- schedule, metadata, resume
def test_warmup_lr_values():
    assert [poly_lr(0.01, s, 100, 0.9, warmup=4) for s in range(4)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert poly_lr(0.01, 4, 100, 0.9, warmup=4) == pytest.approx(0.01 * (1 - 4 / 100) ** 0.9)
    assert poly_lr(0.01, 0, 100, 0.9) == 0.01


def test_finetune_schedule_metadata_and_exact_resume(binary, tmp_path, monkeypatch):
    cfg = replace(
        TINY, epochs=4, iterations_per_epoch=2, checkpoint_every=2, warmup_epochs=2, freeze_encoder_epochs=1,
        pretrained="hippocampus", initial_lr=1e-3,
    )  # fmt: skip
    t = make_trainer(binary, tmp_path / "straight", cfg)
    encoder_before = {k: v.clone() for k, v in t.model.state_dict().items() if k.startswith("encoder.")}
    original = Trainer.train_epoch
    after_epoch0 = {}

    def spy(self, epoch, sampler):
        loss = original(self, epoch, sampler)
        if epoch == 0 and self.fold_dir.parent.name == "straight":
            after_epoch0.update({k: v.clone() for k, v in self.model.state_dict().items()})
        return loss

    monkeypatch.setattr(Trainer, "train_epoch", spy)
    t.fit()
    monkeypatch.setattr(Trainer, "train_epoch", original)
    for k, v in encoder_before.items():
        assert torch.equal(after_epoch0[k], v), f"{k} frozen during epoch 0"
    final = load_weights(tmp_path / "straight" / "fold_0")
    assert any(not torch.equal(final[k], v) for k, v in encoder_before.items()), "encoder trained once unfrozen"

    log = [json.loads(x) for x in (tmp_path / "straight" / "fold_0" / "training_log.jsonl").read_text().splitlines()]
    # warm-up over 2 epochs x 2 iterations: the last step of epoch 0 is step 1 -> lr * 2/4, of epoch 1 -> lr
    assert [r["lr"] for r in log[:2]] == pytest.approx([5e-4, 1e-3])
    assert log[2]["lr"] == pytest.approx(poly_lr(1e-3, 5, 8, 0.9, warmup=4))

    sha = json.loads((SHIPPED / "fold_0" / "checkpoint.json").read_text())["sha256"]
    record = json.loads((tmp_path / "straight" / "fold_0" / "checkpoint.json").read_text())["pretrained"]
    assert record["sha256"] == sha and record["source"] == "hippocampus"
    assert load_spec(tmp_path / "straight").pretrained["sha256"] == sha
    assert Predictor.from_folder(tmp_path / "straight", device="cpu").tile == (40, 56, 40)

    restore = crash_training_at(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted):
        make_trainer(binary, tmp_path / "resumed", cfg).fit()
    restore()
    make_trainer(binary, tmp_path / "resumed", cfg).fit(resume=True)
    resumed = load_weights(tmp_path / "resumed" / "fold_0")
    assert final.keys() == resumed.keys()
    for k in final:
        assert torch.equal(final[k], resumed[k]), f"{k} differs after resume"


# ---------------------------------------------------------------- direct inference with a label map
def test_label_map_merge_is_the_union_of_the_unmapped_prediction(tmp_path):
    case = Case("hippocampus_001", (EXAMPLE,), None)
    plain = Predictor.from_folder("hippocampus", device="cpu", tta=False)
    merged = Predictor.from_folder("hippocampus", device="cpu", tta=False, label_map=MERGE)
    assert merged.labels == {"background": 0, "hippocampus": 1}
    plain.predict_cases([case], tmp_path / "plain", progress=False)
    merged.predict_cases([case], tmp_path / "merged", progress=False)
    a, _ = read_image(tmp_path / "plain" / "hippocampus_001.nii.gz")
    b, _ = read_image(tmp_path / "merged" / "hippocampus_001.nii.gz")
    assert set(np.unique(a)) == {0, 1, 2}
    assert np.array_equal(b, (a > 0).astype(b.dtype))

    only_posterior = Predictor.from_folder("hippocampus", device="cpu", tta=False, label_map={"2": "posterior"})
    seg, probs = only_posterior.predict_array(*only_posterior.read_case(case), return_probabilities=True)
    assert np.array_equal(seg, (a == 2).astype(seg.dtype)), "unmapped classes become background"
    assert probs.shape[0] == 2 and np.allclose(probs.sum(0), 1.0, atol=1e-4)


def test_label_map_cli_writes_target_names(tmp_path):
    from typer.testing import CliRunner

    from medseg.cli import app

    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"labels": {"background": 0, "hippocampus": 1}, "map": MERGE}))
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app, ["predict", "-m", "hippocampus", "-i", str(EXAMPLE), "-o", str(out), "--no-tta", "--device", "cpu",
              "--label-map", str(mapping)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = [line.split(",") for line in (out / "volumes.csv").read_text().splitlines()[1:]]
    assert [r[1] for r in rows] == ["hippocampus"], "volumes of the target labels only"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["label_map"]["labels"] == {"background": 0, "hippocampus": 1}
    seg, _ = read_image(out / "hippocampus_001.nii.gz")
    assert set(np.unique(seg)) == {0, 1}


def test_label_map_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetError, match=r"unknown model label 'Hippocampus' \(the model's labels: background"):
        build_label_mapping({"Hippocampus": "x"}, HIPPO_LABELS)
    with pytest.raises(DatasetError, match="unknown model label '7'"):
        build_label_mapping({"7": "x"}, HIPPO_LABELS)
    with pytest.raises(DatasetError, match="unknown target label 'hippo'"):
        build_label_mapping({"labels": {"background": 0, "hippocampus": 1}, "map": {"Anterior": "hippo"}}, HIPPO_LABELS)
    with pytest.raises(DatasetError, match="needs a 'labels' table"):
        build_label_mapping({"Anterior": 1}, HIPPO_LABELS)
    with pytest.raises(DatasetError, match="background"):
        build_label_mapping({"background": "hippocampus"}, HIPPO_LABELS)
    bad = tmp_path / "map.json"
    bad.write_text(json.dumps({"Anterior": "a", "Middle": "b"}))
    with pytest.raises(DatasetError) as exc:
        load_label_mapping(bad, HIPPO_LABELS)
    assert exc.value.one_line().startswith(f"{bad}: unknown model label 'Middle'")
    with pytest.raises(DatasetError, match="not found"):
        load_label_mapping(tmp_path / "missing.json", HIPPO_LABELS)


def test_label_mapping_values_and_order():
    m = build_label_mapping({"Posterior": "post", "1": "ant", "background": None}, HIPPO_LABELS)
    assert m.labels == {"background": 0, "post": 1, "ant": 2}  # flat form: order of first appearance
    seg = np.array([[0, 1, 2, 2]], dtype=np.uint8)
    assert apply_label_mapping(seg, m).tolist() == [[0, 2, 1, 1]]
    fixed = build_label_mapping({"labels": {"background": 0, "hippocampus": 3}, "map": {"Anterior": 3}}, HIPPO_LABELS)
    assert apply_label_mapping(seg, fixed).tolist() == [[0, 3, 0, 0]]
