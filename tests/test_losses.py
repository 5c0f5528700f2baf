"""Unit tests for Dice + CE and deep supervision helpers (medseg/training/losses.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medseg.training.losses import (
    deep_supervision_loss,
    deep_supervision_weights,
    dice_ce_loss,
    downsample_targets,
    soft_dice_loss,
)


def target_and_onehot(shape=(2, 1, 8, 8, 8), k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, k, shape, generator=g)
    onehot = F.one_hot(t[:, 0], k).movedim(-1, 1).float()
    return t, onehot


def test_soft_dice_perfect_and_worst():
    t, onehot = target_and_onehot()
    perfect = onehot * 40 - 20
    assert soft_dice_loss(perfect, t).item() == pytest.approx(-1.0, abs=1e-4)
    assert soft_dice_loss(perfect, t, batch_dice=False).item() == pytest.approx(-1.0, abs=1e-4)
    wrong = torch.roll(onehot, 1, dims=1) * 40 - 20  # every voxel predicts another class
    assert soft_dice_loss(wrong, t).item() == pytest.approx(0.0, abs=1e-4)


def test_soft_dice_hand_computed():
    """Two voxels, two classes, uniform probabilities: tp=0.5, fp=0.5, fn=0.5 for class 1."""
    logits = torch.zeros(1, 2, 2, 1)
    t = torch.tensor([[[[1], [0]]]])
    expected = (2 * 0.5 + 1e-5) / (2 * 0.5 + 0.5 + 0.5 + 1e-5)
    assert soft_dice_loss(logits, t).item() == pytest.approx(-expected, rel=1e-6)


def test_soft_dice_ignores_background():
    """Only foreground classes count: a prediction that is perfect on class 1 and wrong on
    background-vs-nothing still scores -1 when class 1 is the only foreground class."""
    t = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    t[..., :2, :2] = 1
    logits = torch.stack([torch.where(t[:, 0] == 0, 20.0, -20.0), torch.where(t[:, 0] == 1, 20.0, -20.0)], 1)
    assert soft_dice_loss(logits, t).item() == pytest.approx(-1.0, abs=1e-4)
    # with a third class absent from target and prediction, batch dice is smooth/smooth = 1 for it
    logits3 = torch.cat([logits, torch.full((1, 1, 4, 4), -20.0)], 1)
    assert soft_dice_loss(logits3, t).item() == pytest.approx(-1.0, abs=1e-3)


def test_dice_ce_decreases_for_better_logits():
    t, onehot = target_and_onehot(seed=1)
    noise = torch.randn(onehot.shape, generator=torch.Generator().manual_seed(2))
    losses = [dice_ce_loss(noise + a * (onehot * 2 - 1), t).item() for a in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] == pytest.approx(-1.0, abs=0.02)


def test_dice_ce_gradients_flow_2d_and_3d():
    for shape in [(2, 1, 6, 7), (2, 1, 4, 5, 6)]:
        t, onehot = target_and_onehot(shape, k=4, seed=3)
        logits = torch.zeros(onehot.shape, requires_grad=True)
        dice_ce_loss(logits, t).backward()
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_deep_supervision_weights():
    assert deep_supervision_weights(1) == [1.0]
    for n in (2, 3, 5):
        w = deep_supervision_weights(n)
        assert len(w) == n
        assert w[-1] == 0.0
        assert sum(w) == pytest.approx(1.0)
        assert all(a > b for a, b in zip(w, w[1:]))
        if n > 2:
            assert w[0] / w[1] == pytest.approx(2.0)


def test_downsample_targets_shapes_and_values():
    t, _ = target_and_onehot((2, 1, 16, 16, 8), k=4, seed=4)
    shapes = [(16, 16, 8), (8, 8, 4), (4, 4, 4), (2, 2, 2)]
    out = downsample_targets(t, shapes)
    assert [tuple(o.shape) for o in out] == [(2, 1, *s) for s in shapes]
    assert out[0] is t
    assert all(o.dtype == torch.long for o in out)
    # nearest: every downsampled value is one of the block's values (here: its first voxel)
    torch.testing.assert_close(out[1], t[:, :, ::2, ::2, ::2])
    assert set(out[2].unique().tolist()) <= set(t.unique().tolist())


def test_deep_supervision_loss_matches_weighted_sum():
    t, onehot = target_and_onehot((2, 1, 8, 8, 8), k=3, seed=5)
    g = torch.Generator().manual_seed(6)
    outputs = [
        torch.randn(2, 3, 8, 8, 8, generator=g),
        torch.randn(2, 3, 4, 4, 4, generator=g),
        torch.randn(2, 3, 2, 2, 2, generator=g),
    ]
    w = deep_supervision_weights(3)
    targets = downsample_targets(t, [o.shape[2:] for o in outputs])
    expected = sum(wi * dice_ce_loss(o, ti) for wi, o, ti in zip(w, outputs, targets) if wi > 0)
    torch.testing.assert_close(deep_supervision_loss(outputs, t), expected)
    # a single tensor is plain Dice + CE
    torch.testing.assert_close(deep_supervision_loss(outputs[0], t), dice_ce_loss(outputs[0], t))
