"""Training state: exact resume after an interruption, extending a finished run, fold 'all',
hand-edited splits, atomic checkpoints. Tiny network, a few iterations, real hippocampus data."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TrainingInterrupted, crash_training_at

from medseg import api
from medseg.errors import DatasetError, OutputError
from medseg.io.checkpoint import available_folds, load_weights
from medseg.planning.plan import Plan
from medseg.preprocessing.pipeline import cache_folder
from medseg.training.config import TrainingConfig
from medseg.training.trainer import STATE_FILE, Trainer
from medseg.workspace import Workspace

TINY = TrainingConfig(
    epochs=2,
    iterations_per_epoch=2,
    val_iterations=1,
    num_threads=1,
    final_validation=False,
    model_kwargs={"features": [4, 8, 16, 32]},
    checkpoint_every=10,
)


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def prepared(hippo_dataset, tmp_path_factory):
    """Planned + preprocessed workspace shared by this module (its splits file is left default)."""
    ws = Workspace(tmp_path_factory.mktemp("resume_ws"))
    api.plan(hippo_dataset, ws, progress=False)
    api.preprocess(hippo_dataset, ws, workers=1, progress=False)
    return hippo_dataset, ws


def train(prepared, out: Path, config: TrainingConfig, **kwargs) -> dict:
    dataset, ws = prepared
    return api.train(dataset, ws, config=config, output=out, log=quiet, **kwargs)


def log_records(fold_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (fold_dir / "training_log.jsonl").read_text().splitlines()]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_resume_is_exact(prepared, tmp_path, monkeypatch):
    cfg = replace(TINY, epochs=4, checkpoint_every=2)
    train(prepared, tmp_path / "straight", cfg)

    # same run, killed at the start of epoch 4 (index 3): the last checkpoint is after epoch 2,
    # so epoch 3 (index 2) was done and logged but must be replayed identically on resume
    restore = crash_training_at(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted):
        train(prepared, tmp_path / "resumed", cfg)
    fold = tmp_path / "resumed" / "fold_0"
    assert json.loads((fold / "checkpoint.json").read_text())["epoch"] == 2
    assert [r["epoch"] for r in log_records(fold)] == [1, 2, 3]  # counted from 1, as on the console
    restore()

    train(prepared, tmp_path / "resumed", cfg, resume=True)
    assert_same_weights(load_weights(tmp_path / "straight" / "fold_0"), load_weights(fold))
    straight, resumed = log_records(tmp_path / "straight" / "fold_0"), log_records(fold)
    assert [r["epoch"] for r in resumed] == [1, 2, 3, 4], "replayed epoch is logged once"
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in straight]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]
    assert json.loads((fold / "checkpoint.json").read_text())["epoch"] == 4


def test_checkpoint_is_atomic_and_pickle_free(prepared, tmp_path):
    train(prepared, tmp_path / "m", TINY)
    fold = tmp_path / "m" / "fold_0"
    names = sorted(p.name for p in fold.iterdir())
    assert not [n for n in names if n.endswith(".part") or ".part." in n or n.startswith(".")], names
    assert {"model.safetensors", "checkpoint.json", STATE_FILE, "training_log.jsonl"} <= set(names)
    state = torch.load(fold / STATE_FILE, weights_only=True)  # plain tensors/containers only
    assert state["epoch"] == 2 and len(json.loads(state["history"])) == 2
    assert_same_weights(load_weights(fold), {k: v for k, v in state["model"].items()})
    assert (tmp_path / "m" / "model.json").is_file()


def test_extend_a_finished_run(prepared, tmp_path):
    out = tmp_path / "m"
    train(prepared, out, TINY)
    fold = out / "fold_0"
    after2 = load_weights(fold)

    # resuming with the same epoch count does nothing and returns cleanly
    assert train(prepared, out, TINY, resume=True) == {}
    assert_same_weights(after2, load_weights(fold))

    train(prepared, out, replace(TINY, epochs=3), resume=True)
    assert [r["epoch"] for r in log_records(fold)] == [1, 2, 3]
    assert json.loads((fold / "checkpoint.json").read_text())["epoch"] == 3
    after3 = load_weights(fold)
    assert any(not torch.equal(after2[k], after3[k]) for k in after2), "the extra epoch trained"

    # without --resume the run starts over (and its log with it)
    train(prepared, out, replace(TINY, epochs=1))
    assert [r["epoch"] for r in log_records(fold)] == [1]


def test_a_trained_fold_is_refused_without_resume_or_overwrite(prepared, tmp_path):
    """The CLI's rule (overwrite=False): a fold with a checkpoint is neither silently restarted nor
    touched; --resume continues it, --overwrite restarts it."""
    out = tmp_path / "m"
    train(prepared, out, TINY)
    before = load_weights(out / "fold_0")
    log = (out / "fold_0" / "training_log.jsonl").read_bytes()
    with pytest.raises(OutputError, match="holds a trained fold; pass --resume to continue it, --overwrite"):
        train(prepared, out, TINY, overwrite=False)
    assert_same_weights(before, load_weights(out / "fold_0"))
    assert (out / "fold_0" / "training_log.jsonl").read_bytes() == log
    assert train(prepared, out, TINY, overwrite=False, resume=True) == {}  # already done: a clean no-op


def test_fold_all_trains_without_validation(prepared, tmp_path):
    out = tmp_path / "m"
    summary = train(prepared, out, replace(TINY, epochs=1, final_validation=True), fold="all")
    assert summary == {}
    fold = out / "fold_all"
    assert (fold / "model.safetensors").is_file()
    assert not (fold / "validation").exists()
    (rec,) = log_records(fold)
    assert rec["val_loss"] is None and rec["pseudo_dice"] == []
    assert available_folds(out) == ["all"]
    from medseg.inference.predictor import Predictor

    assert Predictor.from_folder(out, device="cpu").folds == ["all"]


def _trainer(dataset, ws: Workspace, out: Path, fold, config=TINY) -> Trainer:
    from medseg.io.dataset import load_dataset_json

    name = load_dataset_json(dataset).name
    plan = Plan.load(ws.plan_path(name))
    pre = ws.preprocessed(name)
    return Trainer(
        plan,
        "3d_fullres",
        cache_folder(pre, plan.configuration("3d_fullres")),
        pre,
        out,
        fold,
        config,
        log=quiet,
    )


def test_custom_splits_are_honoured(prepared, tmp_path):
    dataset, ws = prepared
    own = Workspace(tmp_path / "ws")
    shutil.copytree(ws.root, own.root)
    name = next(p.name for p in (own.root / "preprocessed").iterdir())
    pre = own.preprocessed(name)
    (pre / "splits_final.json").unlink(missing_ok=True)

    default = _trainer(dataset, own, tmp_path / "d", 0)
    assert (pre / "splits_final.json").is_file(), "the default split is written once"
    assert len(default.train_names) == 8 and len(default.val_names) == 2

    cases = sorted(json.loads(p.read_text()) for p in pre.glob("data_*/cases.json"))[0]
    custom = [{"train": cases[:3], "val": cases[7:]}, {"train": cases[3:6], "val": cases[:2]}]
    assert custom[0]["val"] != default.val_names
    (pre / "splits_final.json").write_text(json.dumps(custom))
    t0 = _trainer(dataset, own, tmp_path / "c", 0)
    assert (t0.train_names, t0.val_names) == (cases[:3], cases[7:])
    t1 = _trainer(dataset, own, tmp_path / "c", "1")
    assert (t1.train_names, t1.val_names) == (cases[3:6], cases[:2])

    # the final validation predicts exactly the split's validation cases
    t1.cfg = replace(t1.cfg, epochs=1, final_validation=True)
    t1.fit()
    summary = api.final_validation(t1, dataset)
    assert sorted(summary["per_case"]) == cases[:2]
    assert sorted(p.name for p in (tmp_path / "c" / "fold_1" / "validation").glob("*.nii.gz")) == [
        f"{c}.nii.gz" for c in cases[:2]
    ]

    with pytest.raises(DatasetError, match="2 folds"):
        _trainer(dataset, own, tmp_path / "c", 3)
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["nope_001"], "val": cases[:1]}]))
    with pytest.raises(DatasetError, match="nope_001"):
        _trainer(dataset, own, tmp_path / "c", 0)


def _slow_epochs(monkeypatch, seconds: float) -> None:
    """Every epoch takes at least ``seconds`` (so the time budget's arithmetic is predictable)."""
    import time

    original = Trainer.train_epoch

    def slow(self, epoch, sampler):
        time.sleep(seconds)
        return original(self, epoch, sampler)

    monkeypatch.setattr(Trainer, "train_epoch", slow)


def test_time_budget_fits_epochs_and_schedule(prepared, tmp_path, monkeypatch):
    _slow_epochs(monkeypatch, 0.5)
    cfg = replace(TINY, epochs=1000, time_budget_minutes=0.1)  # 6 s
    train(prepared, tmp_path / "m", cfg)
    records = log_records(tmp_path / "m" / "fold_0")
    first = records[0]["seconds"]
    assert len(records) == max(1, int(6 // first)) and 1 < len(records) <= 12
    assert sum(r["seconds"] for r in records) < 6 + first  # the budget, up to one epoch's rounding
    assert records[-1]["lr"] < 0.5 * 1e-2  # the poly schedule ran to (near) its end (segmentation: lr 1e-2)


def test_time_budget_survives_resume(prepared, tmp_path, monkeypatch):
    _slow_epochs(monkeypatch, 0.5)
    cfg = replace(TINY, epochs=1000, time_budget_minutes=0.1, checkpoint_every=1)
    restore = crash_training_at(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        train(prepared, tmp_path / "m", cfg)
    restore()
    train(prepared, tmp_path / "m", cfg, resume=True)  # --epochs 1000 again: the budget decides, as before
    records = log_records(tmp_path / "m" / "fold_0")
    assert [r["epoch"] for r in records] == list(range(1, len(records) + 1))
    assert len(records) == max(1, int(6 // records[0]["seconds"]))
