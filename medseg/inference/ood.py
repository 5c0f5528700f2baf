"""Out-of-distribution (OOD) score maps, higher = more OOD, from a segmentation network's blended outputs.

Baselines for every segmentation model, from the class logits ``z`` (after tiling and TTA):

* ``msp``: 1 - max_k softmax(z)_k (maximum softmax probability, Hendrycks & Gimpel 2017);
* ``maxlogit``: -max_k z_k (Hendrycks et al. 2022);
* ``entropy``: -sum_k p_k log p_k / log K (normalised to [0, 1]).

For mask transformers (:mod:`medseg.models.mask_transformer`):

* ``maxquery``: 1 - max_i cos(q_i, e_v), the pixel's best affinity to any query, i.e. to any inlier
  cluster centre (MaxQuery, Yuan et al. CVPR 2023).

A score is ``fn(logits, aux) -> (1, *spatial)``; ``aux`` holds the task's auxiliary maps.
"""

from __future__ import annotations

import math

import torch

from medseg.registry import Registry

OOD_SCORES = Registry("OOD score")
register_ood_score = OOD_SCORES.register


@register_ood_score("msp")
def max_softmax(logits: torch.Tensor, aux: dict) -> torch.Tensor:
    """1 - maximum softmax probability."""
    return 1 - torch.softmax(logits.float(), 0).amax(0, keepdim=True)


@register_ood_score("maxlogit")
def max_logit(logits: torch.Tensor, aux: dict) -> torch.Tensor:
    """Negative maximum logit."""
    return -logits.float().amax(0, keepdim=True)


@register_ood_score("entropy")
def entropy(logits: torch.Tensor, aux: dict) -> torch.Tensor:
    """Softmax entropy divided by log K."""
    logp = torch.log_softmax(logits.float(), 0)
    return -(logp.exp() * logp).sum(0, keepdim=True) / math.log(max(logits.shape[0], 2))


@register_ood_score("maxquery", needs="max_affinity")
def max_query(logits: torch.Tensor, aux: dict) -> torch.Tensor:
    """1 - the maximum pixel-query cosine affinity (mask transformers)."""
    return 1 - aux["max_affinity"].float()


def default_ood_score(task) -> str:
    """``maxquery`` for models with queries, ``msp`` for the others."""
    return "maxquery" if "max_affinity" in task.auxiliary_maps else "msp"


def check_ood_score(name: str, task, model: str) -> str:
    """The score's name, or a ValueError (one line) when it is unknown or the model cannot give it."""
    entry = OOD_SCORES.entry(name)  # ValueError naming the registered scores
    if task.label_output is None:
        raise ValueError(f"model '{model}' has no class logits: it gives no OOD map")
    need = entry.meta.get("needs")
    if need and need not in task.auxiliary_maps:
        others = ", ".join(n for n in OOD_SCORES.names() if not OOD_SCORES.entry(n).meta.get("needs"))
        raise ValueError(f"OOD score '{name}' needs a model with queries (e.g. maskformer_unet); "
                         f"model '{model}' has none (available: {others})")  # fmt: skip
    return name


def ood_score_map(name: str, logits: torch.Tensor, aux: dict) -> torch.Tensor:
    """(1, *spatial) float32 OOD score from (K, *spatial) logits and the auxiliary maps."""
    return OOD_SCORES.get(name)(logits, aux).float()
