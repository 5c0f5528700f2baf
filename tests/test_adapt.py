"""medseg adapt: few-shot domain adaptation from MSD hippocampus (anterior/posterior, 1 mm, R-A-S) to
IXI crops (whole hippocampus, 2 mm, P-S-R) on real cases: subjects never straddle the shots and the
test set, labels are mapped, heads start from the classes they merge, the joint step mixes the
source dataset in, inputs stay untouched and bad requests are one-line errors with nothing written."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import HIPPO_CASES, SHARED_DATA, copy_cases, copy_hippo_cases, run_main

from medseg.apps.adapt import AdaptConfig, draw_shots, head_classes, label_lut, subjects_of
from medseg.errors import MedsegError
from medseg.training.transfer import head_rows_from_classes

IXI = SHARED_DATA / "ixi_hippocampus_target"
IXI_SUBJECTS = ["IXI048-HH-1326", "IXI049-HH-1358", "IXI051-HH-1328"]
PATTERN = "^(ixi_[^_]+)_"
NAMES = [f"ixi_{s}_{side}" for s in IXI_SUBJECTS for side in "LR"]
MSD_LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}
IXI_LABELS = {"background": 0, "hippocampus": 1}
MERGE = {"Anterior": "hippocampus", "Posterior": "hippocampus"}


def test_subjects_and_shots_keep_subjects_together():
    subjects = subjects_of(NAMES, PATTERN)
    assert subjects["ixi_IXI048-HH-1326_R"] == "ixi_IXI048-HH-1326"
    test = NAMES[:2]
    shots = draw_shots(NAMES, subjects, AdaptConfig(shots=1, seed=3, test_cases=test))
    assert len(shots) == 2 and subjects[shots[0]] == subjects[shots[1]] and not set(shots) & set(test)
    assert shots == draw_shots(NAMES, subjects, AdaptConfig(shots=1, seed=3, test_cases=test))  # seeded
    with pytest.raises(MedsegError, match="--shots 3: the pool has 2 subject"):
        draw_shots(NAMES, subjects, AdaptConfig(shots=3, test_cases=test))
    with pytest.raises(MedsegError, match="both the pool and the test set"):
        draw_shots(NAMES, subjects, AdaptConfig(shots=1, test_cases=NAMES[:1], test_source="test.txt"))
    with pytest.raises(MedsegError, match="does not name a subject"):
        subjects_of(["other_case"], PATTERN)


def test_label_lut_and_head_rows():
    lut = label_lut(MSD_LABELS, IXI_LABELS, AdaptConfig(shots=1, label_map=MERGE))
    assert lut.tolist() == [0, 1, 1]
    assert head_classes(lut, 2) == {"0": [0], "1": [1, 2]}
    with pytest.raises(MedsegError, match="hippocampus cannot be mapped"):
        label_lut(MSD_LABELS, IXI_LABELS, AdaptConfig(shots=1))  # no map, no common name
    with pytest.raises(MedsegError, match="lm.json.*unknown target label 'hippo'"):
        label_lut(
            MSD_LABELS, IXI_LABELS, AdaptConfig(shots=1, label_map={"Anterior": "hippo"}, label_map_source="lm.json")
        )
    # a merged class's head row: mean weights, bias + log 2, so its logit ~ log-sum-exp of its sources
    w = torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 4.0]])
    b = torch.tensor([0.5, 1.0, 3.0])
    rows = head_rows_from_classes(w, torch.zeros(2, 2), {"0": [0], "1": [1, 2]}, False)
    bias = head_rows_from_classes(b, torch.zeros(2), {"0": [0], "1": [1, 2]}, True)
    torch.testing.assert_close(rows, torch.tensor([[1.0, 0.0], [1.0, 3.0]]))
    torch.testing.assert_close(bias, torch.tensor([0.5, 2.0 + float(np.log(2))]))


def _digest(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def source_model(tmp_path_factory):
    """A small 2D U-Net trained briefly on three real MSD cases: a real source model folder."""
    from medseg import api
    from medseg.training.config import TrainingConfig

    root = tmp_path_factory.mktemp("source")
    data = copy_hippo_cases(root / "Dataset004_Hippocampus", HIPPO_CASES[:3])
    api.plan(data, root / "ws", progress=False)
    api.preprocess(data, root / "ws", configurations=("2d",), progress=False)
    cfg = TrainingConfig(epochs=1, iterations_per_epoch=3, val_iterations=0, final_validation=False, device="cpu")
    api.train(data, root / "ws", configuration="2d", fold="all", config=cfg, output=root / "model", log=lambda *a: None)
    return root / "model", data


def test_adapt_end_to_end_on_real_cases(tmp_path, monkeypatch, capsys, source_model):
    model, source = source_model
    target = copy_cases(IXI, tmp_path / "ixi", NAMES[:4])
    before = _digest(target), _digest(source)
    (tmp_path / "test.txt").write_text("# held out\nixi_IXI048-HH-1326_L\nixi_IXI048-HH-1326_R\n")
    (tmp_path / "lm.json").write_text(json.dumps(MERGE))

    def cli(shots="1", label_map=tmp_path / "lm.json", out=tmp_path / "adapted"):
        return ["adapt", "-m", model, "--target", target, "--shots", shots, "--subject-pattern", PATTERN,
                "--test-cases", tmp_path / "test.txt", "--label-map", label_map, "--source", source,
                "-w", tmp_path / "ws", "--epochs", "1", "--joint-epochs", "1", "--iterations", "2",
                "-o", out, "--device", "cpu"]  # fmt: skip

    args = cli()
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "loaded" in err and "re-initialised 0" in err  # heads from the merged classes
    assert "joint training: 3 cases of" in err
    record = json.loads((tmp_path / "adapted" / "adaptation.json").read_text())
    assert record["shots"] == ["ixi_IXI049-HH-1358_L", "ixi_IXI049-HH-1358_R"] and record["label_lut"] == [0, 1, 1]
    spec = json.loads((tmp_path / "adapted" / "model.json").read_text())
    assert spec["labels"] == IXI_LABELS and "extra_data" in spec["training"]
    summary = json.loads((tmp_path / "adapted" / "adaptation" / "summary.json").read_text())
    assert "hippocampus" in summary["mean"]
    preds = sorted(p.name for p in (tmp_path / "adapted" / "adaptation" / "test_predictions").glob("*.nii.gz"))
    assert preds == ["ixi_IXI048-HH-1326_L.nii.gz", "ixi_IXI048-HH-1326_R.nii.gz"]
    assert (tmp_path / "adapted" / "adaptation" / "fewshot" / "summary.json").is_file()
    assert "hippocampus" in out and "Dice" in out
    (shots_plan,) = (tmp_path / "ws" / "preprocessed").glob("*_shots_*/plan.json")  # the source's own plan
    src_plan = json.loads((model / "model.json").read_text())["plan"]
    assert json.loads(shots_plan.read_text())["configurations"] == src_plan["configurations"]
    assert (_digest(target), _digest(source)) == before  # the inputs are only read
    assert not list((tmp_path / "adapted").rglob("training_state.pt"))

    # bad requests: one line, exit 2, nothing written
    (tmp_path / "bad.json").write_text(json.dumps({"Anterior": "amygdala"}))
    for bad, message in (
        (cli(shots="5", out=tmp_path / "never"), "--shots 5: the pool has 1 subject"),
        (cli(label_map=tmp_path / "bad.json", out=tmp_path / "never"), "bad.json"),
        (cli(), "already exists"),
    ):
        code, _, err = run_main(monkeypatch, capsys, *bad)
        errors = [line for line in err.splitlines() if line.startswith("medseg: error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], err
        assert not (tmp_path / "never").exists()


def test_joint_cases_are_mapped_and_weighted():
    from medseg.data.cache import CachedCase
    from medseg.data.joint import check_extra_data, map_case, sampling_weights
    from medseg.data.sampler import PatchSampler

    seg = np.zeros((4, 8, 8), np.uint8)
    seg[1, 2:4, 2:4], seg[2, 2:4, 2:4] = 1, 2
    fg = {1: np.argwhere(seg == 1), 2: np.argwhere(seg == 2)}
    case = CachedCase("src", np.zeros((1, 4, 8, 8), np.float32), seg, fg)
    mapped = map_case(case, {"1": 1, "2": 1})
    assert set(np.unique(mapped.seg)) == {0, 1} and len(mapped.fg[1]) == 8 and 2 not in mapped.fg
    assert case.seg.max() == 2  # the cached case itself is untouched
    p = sampling_weights(2, [(8, 0.5)])
    np.testing.assert_allclose(p, [0.25, 0.25] + [1 / 16] * 8)
    target = CachedCase("tgt", np.ones((1, 4, 8, 8), np.float32), seg.copy(), fg)
    sampler = PatchSampler([target] + [mapped] * 8, (4, 8, 8), 400, weights=sampling_weights(1, [(8, 0.25)]), seed=0)
    images = sampler.sample()["image"]
    share = float((images.reshape(400, -1).max(1) > 0).mean())  # only the target case has non-zero images
    assert 0.68 < share < 0.82
    for bad in (
        [{"cache": "x", "share": 1.2}],
        [{"cache": "x", "share": 0.6}, {"cache": "y", "share": 0.5}],
        [{"share": 0.5}],
    ):
        with pytest.raises(ValueError):
            check_extra_data(bad)


def test_shipped_ixi_model_segments_held_out_ixi_subjects(tmp_path, monkeypatch, capsys):
    """`medseg predict -m hippocampus-ixi` on real IXI crops of subjects that were never its shots (its
    adaptation record lists them): label 1 = whole hippocampus, at the adapted level (BENCHMARKS.md)."""
    from medseg.evaluation.metrics import evaluate_folder
    from medseg.io.checkpoint import resolve_model

    if not IXI.is_dir():
        pytest.skip("needs ../shared/data/ixi_hippocampus_target")
    model = resolve_model("hippocampus-ixi")
    record = json.loads((model / "adaptation.json").read_text())
    assert record["subjects"] <= 10 and json.loads((model / "model.json").read_text())["labels"] == IXI_LABELS
    held_out = record["config"]["test_cases"][:4]  # the benchmark's test subjects, never shots
    shot_subjects = set(subjects_of(record["shots"], PATTERN).values())
    assert len(held_out) == 4 and not shot_subjects & set(subjects_of(held_out, PATTERN).values())
    data = copy_cases(IXI, tmp_path / "ixi", held_out)
    code, _, err = run_main(monkeypatch, capsys, "predict", "-m", "hippocampus-ixi", "-i", data / "imagesTr",
                            "-o", tmp_path / "pred", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    summary = evaluate_folder(tmp_path / "pred", data / "labelsTr", IXI_LABELS, names=held_out)
    assert summary["mean"]["hippocampus"]["dice"] > 0.80, summary["mean"]  # the source model alone: ~0.69
