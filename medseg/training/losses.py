"""Dice + cross-entropy with deep supervision (nnU-Net's default loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, *, batch_dice: bool = True, smooth: float = 1e-5
) -> torch.Tensor:
    """1 - mean soft Dice over foreground classes. target: (B, 1, *spatial) integer labels."""
    probs = torch.softmax(logits, 1)
    onehot = torch.zeros_like(probs).scatter_(1, target.long(), 1.0)
    dims = (0, *range(2, logits.ndim)) if batch_dice else tuple(range(2, logits.ndim))
    tp = (probs * onehot).sum(dims)
    fp = (probs * (1 - onehot)).sum(dims)
    fn = ((1 - probs) * onehot).sum(dims)
    dice = (2 * tp + smooth) / (2 * tp + fp + fn + smooth).clamp_min(1e-8)
    dice = dice[1:] if batch_dice else dice[:, 1:]
    return -dice.mean()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, *, batch_dice: bool = True) -> torch.Tensor:
    return F.cross_entropy(logits, target[:, 0].long()) + soft_dice_loss(logits, target, batch_dice=batch_dice)


def deep_supervision_weights(n: int) -> list[float]:
    """1, 1/2, 1/4, ... with the lowest resolution switched off, normalised to sum 1."""
    w = [1 / 2**i for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    s = sum(w)
    return [x / s for x in w]


def downsample_targets(target: torch.Tensor, shapes) -> list[torch.Tensor]:
    """Nearest-neighbour target maps for each deep-supervision output shape."""
    out = []
    for shape in shapes:
        if tuple(shape) == tuple(target.shape[2:]):
            out.append(target)
        else:
            out.append(F.interpolate(target.float(), size=tuple(shape), mode="nearest").long())
    return out


def deep_supervision_loss(outputs, target: torch.Tensor, *, batch_dice: bool = True) -> torch.Tensor:
    """Weighted sum over scales. Switched-off scales still enter the graph with a zero
    contribution: DDP fails when a parameter (their head) receives no gradient."""
    if not isinstance(outputs, (list, tuple)):
        return dice_ce_loss(outputs, target, batch_dice=batch_dice)
    weights = deep_supervision_weights(len(outputs))
    used = [(w, o) for w, o in zip(weights, outputs) if w > 0]
    targets = downsample_targets(target, [o.shape[2:] for _, o in used])
    loss = sum(w * dice_ce_loss(o, t, batch_dice=batch_dice) for (w, o), t in zip(used, targets))
    unused = [o for w, o in zip(weights, outputs) if w == 0]
    return loss + sum((o * 0).sum() for o in unused) if unused else loss
