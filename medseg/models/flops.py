"""Parameters, FLOPs and activation size of a registered model, without allocating it.

The model is built on the ``meta`` device (shapes only, no storage) and one forward pass runs under
``torch.utils.flop_counter.FlopCounterMode``, so even STU-Net H (1.46 B parameters, 25 TFLOPs at 128^3)
is measured in well under a second on a laptop.

Conventions (they differ between papers, so every number says which it is):

* ``flops`` = 2 x multiply-accumulates of convolutions (incl. transposed), linear layers, matmuls and
  attention, for one forward pass at batch size 1. Norms, activations, interpolation and bias adds are
  not counted (< 1 % for these networks).
* ``macs`` = ``flops / 2``. The STU-Net paper's "FLOPs" column (0.13 T for S at 128^3) is MACs, as
  reported by torchinfo's "mult-adds": it equals our ``macs``, half our ``flops``.
* ``feature_map_elements`` = sum of the output sizes of every conv, nnU-Net's proxy for training
  memory (``compute_conv_feature_map_size``), which its planners compare to a GPU budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class ModelCost:
    name: str
    patch: tuple[int, ...]  # voxels (or pixels), one per spatial axis
    in_channels: int
    num_classes: int
    params: int
    flops: int  # 2 x MACs, forward, batch 1
    feature_map_elements: int  # sum of conv output elements, batch 1

    @property
    def macs(self) -> int:
        return self.flops // 2

    def as_dict(self) -> dict:
        return {**asdict(self), "patch": list(self.patch), "macs": self.macs}


def build_meta(name: str, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered model with meta tensors: correct shapes and counts, zero bytes of weights."""
    from medseg.models.registry import create_model

    with torch.device("meta"):
        return create_model(name, in_channels, num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tensor registered under two names counts once)."""
    return sum(p.numel() for p in model.parameters())


def forward_cost(model: nn.Module, patch: Sequence[int], in_channels: int) -> tuple[int, int]:
    """(FLOPs, conv feature-map elements) of one forward pass at batch 1, on whatever device the model is.

    On a meta model nothing is computed, so this is free; on a real model it runs the forward pass.
    """
    device = next((p.device for p in model.parameters()), torch.device("meta"))
    # a model whose input is not the image's channels says so (LeFusion: one noisy channel per lesion class)
    x = torch.empty(1, getattr(model, "input_channels", in_channels), *patch, device=device)
    elements = [0]

    def hook(_module, _inp, out):
        elements[0] += out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return int(counter.get_total_flops()), int(elements[0])


def feature_map_elements(model: nn.Module, patch: Sequence[int], in_channels: int) -> int:
    """nnU-Net's training-memory proxy for ``patch``; multiply by batch size and bytes per element."""
    return forward_cost(model, patch, in_channels)[1]


def measure(
    name: str,
    patch: Sequence[int] = (128, 128, 128),
    *,
    in_channels: int = 1,
    num_classes: int = 105,
    deep_supervision: bool = True,
    **kwargs,
) -> ModelCost:
    """Parameters and forward cost of registry model ``name`` at ``patch`` (default: STU-Net's setting,
    1 CT channel, 105 TotalSegmentator classes, 128^3, deep supervision on as in training)."""
    patch = tuple(int(p) for p in patch)
    kwargs.setdefault("spatial_dims", len(patch))
    model = build_meta(name, in_channels, num_classes, deep_supervision=deep_supervision, **kwargs)
    flops, elements = forward_cost(model, patch, in_channels)
    return ModelCost(name, patch, in_channels, num_classes, count_parameters(model), flops, elements)
