"""Learning-rate schedules, selected by ``TrainingConfig.schedule``.

A schedule is ``fn(initial, step, total, cfg) -> lr`` for optimiser step ``step`` of ``total``
(``cfg`` gives ``warmup_epochs``/``iterations_per_epoch``/``poly_exponent``). Parameter groups scale the
result by their ``lr_scale`` (see :mod:`medseg.training.optim`).
"""

from __future__ import annotations

import math

from medseg.registry import Registry

SCHEDULES = Registry("LR schedule")
register_schedule = SCHEDULES.register


def warmup_steps(cfg) -> int:
    return cfg.warmup_epochs * cfg.iterations_per_epoch


def poly_lr(initial: float, step: int, total: int, exponent: float, warmup: int = 0) -> float:
    """nnU-Net's polynomial decay, with an optional linear warm-up over the first ``warmup`` steps."""
    if warmup and step < warmup:
        return initial * (step + 1) / warmup
    return initial * (1 - min(step, total - 1) / total) ** exponent


@register_schedule("poly")
def poly(initial: float, step: int, total: int, cfg) -> float:
    """Polynomial decay (1 - t/T)^0.9 after an optional linear warm-up (nnU-Net)."""
    return poly_lr(initial, step, total, cfg.poly_exponent, warmup_steps(cfg))


@register_schedule("warmup_cosine")
def warmup_cosine(initial: float, step: int, total: int, cfg) -> float:
    """Linear warm-up, then half-cosine decay to 0 at the last step (transformers, SAM fine-tuning)."""
    warm = warmup_steps(cfg)
    if warm and step < warm:
        return initial * (step + 1) / warm
    span = max(total - warm, 1)
    return initial * 0.5 * (1 + math.cos(math.pi * min(step - warm, span) / span))


@register_schedule("constant")
def constant(initial: float, step: int, total: int, cfg) -> float:
    """The initial rate throughout, after an optional linear warm-up (diffusion models)."""
    warm = warmup_steps(cfg)
    if warm and step < warm:
        return initial * (step + 1) / warm
    return initial
