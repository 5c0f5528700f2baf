"""Optimisers, selected by ``TrainingConfig.optimizer``, and parameter groups.

An optimiser is ``fn(groups, cfg) -> torch.optim.Optimizer`` where ``groups`` are torch parameter
groups built by :func:`parameter_groups`. Per-group learning rates (fine-tuning adapters at 10x the
backbone's rate, a frozen encoder at 0) come from ``TrainingConfig.param_groups``: a list of
``{"prefix": "encoder.", "lr_scale": 0.1}`` (or ``"match"``: a regular expression on the parameter
name; ``"weight_decay"`` optional). Each parameter joins the first group it matches, the rest form
the default group (scale 1). A scale of 0 leaves a group out of the optimiser altogether.
"""

from __future__ import annotations

import re

import torch

from medseg.registry import Registry

OPTIMIZERS = Registry("optimizer")
register_optimizer = OPTIMIZERS.register


def _matches(rule: dict, name: str) -> bool:
    if "prefix" in rule:
        return name.startswith(rule["prefix"])
    if "match" in rule:
        return re.search(rule["match"], name) is not None
    raise ValueError(f"parameter group {rule} needs a 'prefix' or a 'match' key")


def parameter_groups(model: torch.nn.Module, rules: list[dict], weight_decay: float) -> list[dict]:
    """Torch parameter groups (each with ``lr_scale``) for ``rules``; empty groups are dropped.

    Without rules this is one group of all parameters, so SGD sees exactly what
    ``SGD(model.parameters())`` would."""
    buckets: list[list] = [[] for _ in rules] + [[]]
    for name, p in model.named_parameters():
        idx = next((i for i, r in enumerate(rules) if _matches(r, name)), len(rules))
        buckets[idx].append(p)
    unmatched = [r for r, b in zip(rules, buckets) if not b]
    if unmatched:
        raise ValueError(f"parameter group {unmatched[0]} matches no parameter of the model")
    groups = []
    for rule, params in zip([*rules, {}], buckets):
        scale = float(rule.get("lr_scale", 1.0))
        if params and scale > 0:
            groups.append({"params": params, "lr_scale": scale, "weight_decay": rule.get("weight_decay", weight_decay)})
    return groups


@register_optimizer("sgd_nesterov")
def sgd_nesterov(groups: list[dict], cfg) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (nnU-Net: momentum 0.99, lr 1e-2, weight decay 3e-5)."""
    return torch.optim.SGD(groups, lr=cfg.initial_lr, momentum=cfg.momentum, nesterov=True)


@register_optimizer("adamw")
def adamw(groups: list[dict], cfg) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay): transformers, SAM adapters, diffusion models."""
    return torch.optim.AdamW(groups, lr=cfg.initial_lr, betas=tuple(cfg.betas))


@register_optimizer("adam")
def adam(groups: list[dict], cfg) -> torch.optim.Optimizer:
    """Adam with L2 weight decay (the LeFusion / DDPM reference setting)."""
    return torch.optim.Adam(groups, lr=cfg.initial_lr, betas=tuple(cfg.betas))


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    if None in (cfg.optimizer, cfg.initial_lr, cfg.weight_decay):  # no task chose: the base recipe
        from medseg.tasks.base import Task

        cfg = cfg.with_task_defaults(Task)
    groups = parameter_groups(model, list(cfg.param_groups), cfg.weight_decay)
    return OPTIMIZERS.get(cfg.optimizer)(groups, cfg)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate, times each group's ``lr_scale``."""
    for group in optimizer.param_groups:
        scale = group.get("lr_scale", 1.0)
        group["lr"] = lr if scale == 1.0 else lr * scale


class WeightEMA:
    """Exponential moving average of a model's weights (and buffers), for inference.

    Wraps :class:`torch.optim.swa_utils.AveragedModel`; ``decay`` 0.999 = a horizon of about 1000
    steps. The averaged weights are the ones exported for prediction when EMA is on."""

    def __init__(self, model: torch.nn.Module, decay: float):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.averaged.update_parameters(model)

    @property
    def module(self) -> torch.nn.Module:
        return self.averaged.module

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)
