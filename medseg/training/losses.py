"""Losses: Dice + cross-entropy with deep supervision (nnU-Net's default) and the loss registry."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from medseg.registry import Registry


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


# ---------------------------------------------------------------------------------------- registry
# A loss is ``fn(prediction, batch, cfg) -> scalar``: ``prediction`` is what the model returned (a
# tensor, a deep-supervision list, or a dict of named maps) in float32, ``batch`` a
# :class:`medseg.tasks.base.Batch` (``target``, ``extras``), ``cfg`` the TrainingConfig.

LOSSES = Registry("loss")
register_loss = LOSSES.register


def _main_map(prediction, key: str = "logits"):
    return prediction[key] if isinstance(prediction, dict) else prediction


@register_loss("dice_ce")
def dice_ce(prediction, batch, cfg) -> torch.Tensor:
    """Soft Dice + cross-entropy over softmax classes, deep supervision over scales (nnU-Net)."""
    return deep_supervision_loss(_main_map(prediction), batch.target, batch_dice=cfg.batch_dice)


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, *, batch_dice: bool = True, smooth: float = 1e-5):
    """Binary cross-entropy + soft Dice on sigmoid outputs; ``target`` (B, K, ...) of 0/1 per channel
    (a (B, 1, ...) label map with one logit channel is the binary case)."""
    target = target.float()
    probs = torch.sigmoid(logits)
    dims = (0, *range(2, logits.ndim)) if batch_dice else tuple(range(2, logits.ndim))
    tp = (probs * target).sum(dims)
    dice = (2 * tp + smooth) / (probs.sum(dims) + target.sum(dims) + smooth).clamp_min(1e-8)
    return F.binary_cross_entropy_with_logits(logits, target) - dice.mean()


@register_loss("dice_bce")
def dice_bce(prediction, batch, cfg) -> torch.Tensor:
    """Sigmoid BCE + soft Dice per output channel (binary or multi-label masks), deep supervision."""
    out = _main_map(prediction)
    outs = out if isinstance(out, (list, tuple)) else [out]
    weights = deep_supervision_weights(len(outs))
    used = [(w, o) for w, o in zip(weights, outs) if w > 0]
    targets = downsample_targets(batch.target, [o.shape[2:] for _, o in used])
    loss = sum(w * dice_bce_loss(o, t, batch_dice=cfg.batch_dice) for (w, o), t in zip(used, targets))
    unused = [o for w, o in zip(weights, outs) if w == 0]
    return loss + sum((o * 0).sum() for o in unused) if unused else loss


@register_loss("prompt_dice_bce")
def prompt_dice_bce(prediction, batch, cfg) -> torch.Tensor:
    """``dice_bce`` on the mask logits, plus the same on ``coarse_logits`` when the model gives them:
    I-MedSAM supervises its coarse and its refined prediction alike (loss = L_fine + L_coarse).
    A ``point_target`` in the prediction (a decoder rendered at sampled points) replaces the target."""
    if isinstance(prediction, dict) and "point_target" in prediction:
        batch = dataclasses.replace(batch, target=prediction["point_target"])
    loss = dice_bce(prediction, batch, cfg)
    if isinstance(prediction, dict) and "coarse_logits" in prediction:
        loss = loss + dice_bce(prediction["coarse_logits"], batch, cfg)
    return loss


def masked_regression(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, power: int):
    """Mean |pred - target|^power over the voxels where ``mask`` is set (all voxels without a mask).

    As LeFusion: prediction and target are both multiplied by the mask, so only the lesion is
    learned; the mean is taken over masked voxels x channels, so small lesions are not down-weighted."""
    diff = pred - target
    err = diff.abs() if power == 1 else diff.pow(2)
    if mask is None:
        return err.mean()
    mask = mask.float().expand_as(err)
    return (err * mask).sum() / mask.sum().clamp_min(1.0)


@register_loss("masked_l1")
def masked_l1(prediction, batch, cfg) -> torch.Tensor:
    """L1 between prediction and target (e.g. noise), inside ``batch.extras['loss_mask']`` if given."""
    return masked_regression(_main_map(prediction, "noise"), batch.target, batch.extras.get("loss_mask"), 1)


@register_loss("masked_l2")
def masked_l2(prediction, batch, cfg) -> torch.Tensor:
    """Squared error between prediction and target (DDPM's objective), inside the loss mask if given."""
    return masked_regression(_main_map(prediction, "noise"), batch.target, batch.extras.get("loss_mask"), 2)


# ------------------------------------------------------------------------ mask transformers (MaxQuery)
QD_WEIGHT = 1.0


def query_distribution_loss(mask_logits: torch.Tensor, class_logits: torch.Tensor, target: torch.Tensor):
    """MaxQuery's query-distribution (QD) loss, as read here (docs/ood.md).

    Each query belongs to the class its classifier picks, ``k_i = argmax_k c_ik`` (no gradient);
    ``D_kv = sum_{i: k_i = k} softmax_i(m_iv)`` is the share of voxel v's assignment held by the
    queries of class k. Dice + cross-entropy of ``log D`` against the label map forces foreground
    voxels onto foreground queries and background voxels onto the others *at the query level*, so
    no query mixes both and the queries do not all spend themselves on background."""
    assign = torch.softmax(mask_logits, 1)  # (B, N, *)
    owner = F.one_hot(class_logits.detach().argmax(-1), class_logits.shape[-1]).to(assign.dtype)  # (B, N, K)
    share = torch.einsum("bn...,bnk->bk...", assign, owner)
    return dice_ce_loss(torch.log(share.clamp_min(1e-6)), target)


def mask_segmentation_loss(prediction: dict, batch, cfg, qd_weight: float) -> torch.Tensor:
    """Dice + CE on the semantic logits of every decoder layer (their mean: deep supervision across
    layers), plus ``qd_weight`` x the QD loss of the last layer."""
    layers = [prediction["logits"], *prediction.get("aux_logits", [])]
    loss = sum(dice_ce_loss(o, batch.target, batch_dice=cfg.batch_dice) for o in layers) / len(layers)
    if qd_weight and "mask_logits" in prediction:
        loss = loss + qd_weight * query_distribution_loss(
            prediction["mask_logits"], prediction["class_logits"], batch.target
        )
    return loss


@register_loss("mask_dice_ce")
def mask_dice_ce(prediction, batch, cfg) -> torch.Tensor:
    """Mask transformers: Dice + CE on each decoder layer's semantic logits (no QD loss)."""
    return mask_segmentation_loss(prediction, batch, cfg, 0.0)


@register_loss("mask_dice_ce_qd")
def mask_dice_ce_qd(prediction, batch, cfg) -> torch.Tensor:
    """Mask transformers (MaxQuery): ``mask_dice_ce`` + the query-distribution loss."""
    return mask_segmentation_loss(prediction, batch, cfg, QD_WEIGHT)
