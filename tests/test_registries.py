"""The registries of the general training loop: every entry is reachable by name, unknown names
are one clear error, and each entry computes what it says."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medseg.augment.presets import AUGMENTATIONS, register_augmentation
from medseg.planning.plan import Normalization
from medseg.preprocessing.normalization import NORMALIZATIONS, imagenet_normalization, normalize, register_normalization
from medseg.tasks import TASKS, Batch, get_task
from medseg.training.config import TrainingConfig
from medseg.training.losses import LOSSES, dice_ce_loss, masked_regression
from medseg.training.optim import OPTIMIZERS, WeightEMA, build_optimizer, parameter_groups, set_learning_rate
from medseg.training.schedules import SCHEDULES, poly_lr, register_schedule


def test_builtin_entries_and_unknown_names():
    assert {"segmentation"} <= set(TASKS.names())
    assert {"dice_ce", "dice_bce", "masked_l1", "masked_l2"} <= set(LOSSES.names())
    assert {"sgd_nesterov", "adamw", "adam"} <= set(OPTIMIZERS.names())
    assert {"poly", "warmup_cosine", "constant"} <= set(SCHEDULES.names())
    assert {"zscore", "ct", "range", "imagenet", "none"} <= set(NORMALIZATIONS.names())
    assert {"default", "none", "no_mirror", "light"} <= set(AUGMENTATIONS.names())
    with pytest.raises(ValueError, match=r"unknown loss 'dice'.*dice_ce"):
        LOSSES.get("dice")
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        TrainingConfig(optimizer="lion").check()
    TrainingConfig(task="segmentation", loss="dice_bce", optimizer="adamw", schedule="constant").check()


def test_one_function_and_one_decorator_adds_an_entry(isolated_registries):
    @register_schedule("halving_test")
    def halving(initial, step, total, cfg):
        """Halve at half time."""
        return initial * (0.5 if step >= total // 2 else 1.0)

    assert SCHEDULES.get("halving_test")(1.0, 6, 10, None) == 0.5
    assert SCHEDULES.describe()["halving_test"] == "Halve at half time."

    @register_normalization("minus_one_test")
    def minus_one(x, norm, mask):
        return x - 1

    out = normalize(np.ones((1, 2, 2, 2)), [Normalization("minus_one_test")])
    assert out.dtype == np.float32 and (out == 0).all()

    @register_augmentation("mirror_only_test")
    def mirror_only(dims, aniso):
        return AUGMENTATIONS.get("none")(dims, aniso)

    assert TrainingConfig(augmentation="mirror_only_test").augment_config(3, False).p_rotation == 0


def test_schedules():
    cfg = SimpleNamespace(warmup_epochs=1, iterations_per_epoch=4, poly_exponent=0.9)
    poly = SCHEDULES.get("poly")
    assert [poly(0.01, s, 100, cfg) for s in range(4)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert poly(0.01, 10, 100, cfg) == poly_lr(0.01, 10, 100, 0.9)
    cos = SCHEDULES.get("warmup_cosine")
    assert cos(1.0, 3, 104, cfg) == 1.0 and cos(1.0, 4, 104, cfg) == 1.0
    assert cos(1.0, 54, 104, cfg) == pytest.approx(0.5)
    assert cos(1.0, 104, 104, cfg) == pytest.approx(0.0, abs=1e-12)
    const = SCHEDULES.get("constant")
    assert const(3e-4, 0, 10, cfg) == pytest.approx(7.5e-5) and const(3e-4, 9, 10, cfg) == 3e-4


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.Conv3d(4, 2, 1))


def test_parameter_groups_and_learning_rates():
    net = _net()
    groups = parameter_groups(net, [{"prefix": "0.", "lr_scale": 0.1}], 3e-5)
    assert [len(g["params"]) for g in groups] == [2, 2] and [g["lr_scale"] for g in groups] == [0.1, 1.0]
    frozen = parameter_groups(net, [{"match": r"^0\.", "lr_scale": 0}], 3e-5)
    assert len(frozen) == 1 and frozen[0]["params"][0] is net[1].weight  # scale 0: not optimised at all
    with pytest.raises(ValueError, match="matches no parameter"):
        parameter_groups(net, [{"prefix": "decoder."}], 0.0)
    cfg = TrainingConfig(optimizer="adamw", initial_lr=1e-3, param_groups=[{"prefix": "0.", "lr_scale": 10}])
    opt = build_optimizer(net, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    set_learning_rate(opt, 1e-3)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-2), 1e-3]
    sgd = build_optimizer(net, TrainingConfig())
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]


def test_ema_follows_the_weights():
    net = _net()
    ema = WeightEMA(net, 0.9)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)  # first update copies
    ema.update(net)
    w0 = next(iter(ema.module.parameters())).detach().clone()
    assert torch.allclose(w0, next(iter(net.parameters())))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    assert torch.allclose(next(iter(ema.module.parameters())), w0 + 0.1)  # 0.9 * w + 0.1 * (w + 1)
    with pytest.raises(ValueError, match="EMA decay"):
        WeightEMA(net, 1.0)


def test_losses():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, 6, generator=g)
    target = torch.randint(0, 3, (2, 1, 6, 6, 6), generator=g)
    cfg = TrainingConfig()
    assert LOSSES.get("dice_ce")(logits, Batch(logits, target), cfg) == pytest.approx(
        float(dice_ce_loss(logits, target))
    )
    # dice_bce: a confident, correct binary prediction has loss near -1 (BCE ~ 0, Dice ~ 1)
    mask = (torch.rand(2, 1, 6, 6, 6, generator=g) > 0.5).long()
    perfect = (mask.float() * 2 - 1) * 50
    assert float(LOSSES.get("dice_bce")(perfect, Batch(perfect, mask), cfg)) == pytest.approx(-1.0, abs=1e-4)
    assert float(LOSSES.get("dice_bce")(-perfect, Batch(perfect, mask), cfg)) > 10
    # masked L1/L2: only the masked voxels count, averaged over them
    pred, noise = torch.zeros(1, 1, 4, 4, 4), torch.ones(1, 1, 4, 4, 4)
    noise[..., :2] = 5.0  # outside the mask: must not matter
    m = torch.zeros(1, 1, 4, 4, 4)
    m[..., 2:] = 1
    b = Batch(pred, noise, extras={"loss_mask": m})
    assert float(LOSSES.get("masked_l1")({"noise": pred}, b, cfg)) == pytest.approx(1.0)
    assert float(LOSSES.get("masked_l2")(pred + 3, b, cfg)) == pytest.approx(4.0)
    assert float(masked_regression(pred, noise, None, 1)) == pytest.approx((32 * 5 + 32) / 64)


def test_normalisation_schemes():
    pet = np.array([[[[-1.0, 0.0, 5.0, 12.0]]]])
    out = normalize(pet, [Normalization("range", clip_low=0.0, clip_high=10.0)])
    assert out.ravel().tolist() == [0.0, 0.0, 0.5, 1.0]
    rgb = np.full((3, 1, 2, 2), 255.0)
    out = normalize(rgb, imagenet_normalization(3))
    assert out[:, 0, 0, 0] == pytest.approx([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    with pytest.raises(ValueError, match="clip_low < clip_high"):
        normalize(pet, [Normalization("range")])
    with pytest.raises(ValueError, match="unknown normalisation scheme 'zscroe'"):
        normalize(pet, [Normalization("zscroe")])


def test_segmentation_task_validation_metric():
    task = get_task("segmentation", 3, labels={"background": 0, "Anterior": 1, "Posterior": 2})
    state = task.validation_state()
    ref = torch.tensor([[[0, 1, 2, 2]]])[:, None]  # (B, 1, 1, 4)
    logits = torch.zeros(1, 3, 1, 4)
    for i, c in enumerate([0, 1, 2, 1]):
        logits[0, c, 0, i] = 5
    task.validation_update(state, [logits, logits[..., :2]], Batch(logits, ref))
    summary = task.validation_summary(state)
    assert summary["pseudo_dice"] == [pytest.approx(2 / 3, abs=1e-4), pytest.approx(2 / 3, abs=1e-4)]
    assert task.validation_summary(None) == {"pseudo_dice": [], "mean_pseudo_dice": None}
    assert not math.isnan(summary["mean_pseudo_dice"])
    assert task.summary_line(summary) == "pseudo-Dice Anterior 0.6667  Posterior 0.6667"


def test_plan_normalisation_chosen_by_name(tmp_path):
    from conftest import REPO

    from medseg import api

    data = REPO / "tests" / "fixtures" / "busi_4"
    p = api.plan(data, workspace=tmp_path / "ws", normalization={0: "range:0,255"}, progress=False)
    assert p.normalization[0] == Normalization("range", clip_low=0.0, clip_high=255.0)
    assert api.load_plan(data, tmp_path / "ws").normalization == p.normalization  # in plan.json, hence model.json
    with pytest.raises(ValueError, match="range:LOW,HIGH"):
        api.plan(data, workspace=tmp_path / "ws2", normalization={0: "range:10"}, progress=False)
    with pytest.raises(ValueError, match="unknown normalisation scheme 'zcore'"):
        api.plan(data, workspace=tmp_path / "ws3", normalization={0: "zcore"}, progress=False)
