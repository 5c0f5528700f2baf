"""Model zoo: STU-Net and ResEnc match their published sizes and checkpoint names; tiny configs train.

Big models are only ever built on the meta device (shapes, no storage), so this file runs in seconds.
"""

from __future__ import annotations

import json

import pytest
import torch

from medseg.models import create_model, get_entry, list_models
from medseg.models.flops import build_meta, count_parameters, forward_cost, measure
from medseg.models.stunet import PRESETS as STUNET_PRESETS

# uni-medical/STU-Net README: 1 input channel, 105 TotalSegmentator classes, 128^3 crop.
# The "FLOPs" column is multiply-accumulates (torchinfo mult-adds), i.e. our ``macs``.
PUBLISHED = {
    "stunet_s": (14.6e6, 0.13e12),
    "stunet_b": (58.26e6, 0.51e12),
    "stunet_l": (440.30e6, 3.81e12),
    "stunet_h": (1457.33e6, 12.60e12),
}
ZOO = ["stunet_s", "stunet_b", "stunet_l", "stunet_h", "resenc", "resenc_m", "resenc_l"]


def _in_head(name: str, key: str) -> bool:
    """Whether tensor ``key`` lies in the output heads the registry entry declares."""
    return any(key == h or key.startswith(h + ".") for h in get_entry(name).head)


def _tiny(name: str, num_classes: int = 3, **overrides):
    cfg = {**get_entry(name).test_config, **overrides}
    return create_model(name, 2, num_classes, **cfg), cfg


def _tiny_patch(cfg: dict) -> list[int]:
    """Twice the total downsampling per axis: the smallest patch every stage can halve."""
    div = [1] * cfg.get("spatial_dims", 3)
    for s in cfg["strides"]:
        div = [d * k for d, k in zip(div, s)]
    return [2 * d for d in div]


def test_zoo_is_registered():
    assert set(ZOO) <= set(list_models())


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_stunet_published_params_and_flops(name):
    params, macs = PUBLISHED[name]
    cost = measure(name, (128, 128, 128), in_channels=1, num_classes=105)
    assert abs(cost.params - params) / params < 0.01, cost.params
    assert abs(cost.macs - macs) / macs < 0.05, cost.macs
    assert cost.flops == 2 * cost.macs


def _official_stunet_keys(depth: int, n_stages: int = 6) -> set[str]:
    """Parameter names of uni-medical/STU-Net's STUNet (nnunet/network_architecture/STUNet.py)."""

    def block(prefix: str, first: bool) -> list[str]:
        convs = ["conv1", "norm1", "conv2", "norm2"] + (["conv3"] if first else [])
        return [f"{prefix}.{c}.{w}" for c in convs for w in ("weight", "bias")]

    keys = []
    for d in range(n_stages):
        for j in range(depth):
            keys += block(f"conv_blocks_context.{d}.{j}", j == 0)
    for u in range(n_stages - 1):
        for j in range(depth):
            keys += block(f"conv_blocks_localization.{u}.{j}", j == 0)
        keys += [
            f"upsample_layers.{u}.conv.weight",
            f"upsample_layers.{u}.conv.bias",
            f"seg_outputs.{u}.weight",
            f"seg_outputs.{u}.bias",
        ]
    return set(keys)


@pytest.mark.parametrize("name", ["stunet_b", "stunet_l"])
def test_stunet_parameter_names_match_official_checkpoints(name):
    model = build_meta(name, 1, 105)
    sd = model.state_dict()
    depth = STUNET_PRESETS[name]["blocks_per_stage"][0]
    assert set(sd) == _official_stunet_keys(depth)
    dims = STUNET_PRESETS[name]["features"]
    assert sd["conv_blocks_context.0.0.conv3.weight"].shape == (dims[0], 1, 1, 1, 1)
    assert sd["upsample_layers.0.conv.weight"].shape == (dims[4], dims[5], 1, 1, 1)
    assert sd["conv_blocks_localization.0.0.conv1.weight"].shape == (dims[4], 2 * dims[4], 3, 3, 3)
    assert sd["seg_outputs.4.weight"].shape == (105, dims[0], 1, 1, 1)  # full resolution head is the last


def test_stunet_preset_fits_planned_strides_like_the_official_trainer():
    # a 4-stage plan: STUNetTrainer keeps its pools and pads with stride 1 up to 6 stages
    model = build_meta("stunet_s", 1, 4, strides=[[1, 1, 1], [2, 2, 2], [1, 2, 2], [2, 2, 2]])
    assert len(model.conv_blocks_context) == 6
    assert model.conv_blocks_context[5][0].conv1.stride == (1, 1, 1)
    assert model.conv_blocks_context[2][0].conv1.stride == (1, 2, 2)
    with pytest.raises(TypeError):  # plain-U-Net plan keys must not silently reshape a preset
        build_meta("stunet_b", 1, 4, n_conv_per_stage=2)


def test_resenc_parameter_names_and_count_match_nnunet():
    # Cross-checked against dynamic-network-architectures 0.4.4 ResidualEncoderUNet (same kwargs, conv_bias=True,
    # InstanceNorm3d eps 1e-5 affine, LeakyReLU): 101,868,569 parameters and identical canonical state-dict names.
    kwargs = {
        "features": [32, 64, 128, 256, 320, 320],
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
        "kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * 5,
        "blocks_per_stage": [1, 3, 4, 6, 6, 6],
    }
    model = build_meta("resenc", 2, 5, **kwargs)
    assert count_parameters(model) == 101_868_569
    keys = set(model.state_dict())
    for k in [
        "encoder.stem.convs.0.conv.weight",
        "encoder.stem.convs.0.norm.bias",
        "encoder.stages.1.blocks.0.skip.1.conv.weight",  # avg-pool at skip.0, then 1x1 conv-norm
        "encoder.stages.1.blocks.0.skip.1.norm.weight",
        "encoder.stages.5.blocks.5.conv2.norm.weight",
        "decoder.transpconvs.0.weight",
        "decoder.transpconvs.4.bias",
        "decoder.stages.4.convs.0.conv.weight",
        "decoder.seg_layers.4.bias",
    ]:
        assert k in keys, k
    assert "encoder.stages.1.blocks.0.skip.1.conv.bias" not in keys  # nnU-Net's skip conv has no bias
    assert not any(k.startswith("encoder.stages.0.blocks.0.skip") for k in keys)  # same width, no stride
    assert not any(".all_modules." in k or k.startswith("decoder.encoder.") for k in keys)


def test_resenc_loads_nnunet_state_dict_with_aliases():
    model, _ = _tiny("resenc")
    sd = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    nnunet = dict(sd)
    for k, v in sd.items():  # nnU-Net's duplicate views of the same tensors
        if ".conv." in k and not k.startswith("decoder.transpconvs"):
            nnunet[k.replace(".conv.", ".all_modules.0.")] = v
        if k.startswith("encoder."):
            nnunet["decoder." + k] = v
    fresh, _ = _tiny("resenc")
    fresh.load_state_dict(nnunet)  # strict: aliases dropped by the pre-hook
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_resenc_presets_take_planner_kwargs():
    plan_kwargs = {
        "features": [16, 32, 64, 128],
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
        "kernel_sizes": [[3, 3, 3]] * 4,
        "n_conv_per_stage": 2,
        "spatial_dims": 3,
    }
    model = build_meta("resenc", 1, 3, **plan_kwargs)
    assert [len(s.blocks) for s in model.encoder.stages] == [1, 3, 4, 6]
    assert all(len(s.convs) == 1 for s in model.decoder.stages)
    m = build_meta("resenc_m", 1, 3, strides=plan_kwargs["strides"])  # preset widths for that topology
    assert [s.blocks[0].conv1.conv.out_channels for s in m.encoder.stages] == [32, 64, 128, 256]
    m2d = build_meta("resenc_l", 1, 3, spatial_dims=2, strides=[[1, 1]] + [[2, 2]] * 6)
    assert m2d.encoder.stages[-1].blocks[0].conv1.conv.out_channels == 512


@pytest.mark.parametrize("name", ZOO)
def test_tiny_forward_backward_deep_supervision(name):
    torch.manual_seed(0)
    model, cfg = _tiny(name)
    patch = _tiny_patch(cfg)
    x = torch.randn(2, 2, *patch)
    outs = model(x)
    assert isinstance(outs, list) and len(outs) == len(cfg["strides"]) - 1
    size = list(patch)
    for out, stride in zip(outs, cfg["strides"][1:]):
        assert list(out.shape) == [2, 3, *size]
        size = [s // k for s, k in zip(size, stride)]
    sum(o.float().square().mean() for o in outs).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if _in_head(name, n))
    model.eval()
    model_nods, _ = _tiny(name, deep_supervision=False)
    model_nods.load_state_dict(model.state_dict())  # same heads with and without deep supervision
    model_nods.eval()
    with torch.no_grad():
        single = model_nods(x)
        assert isinstance(single, torch.Tensor) and list(single.shape) == [2, 3, *patch]
        assert torch.allclose(single, model(x)[0], atol=1e-5)


@pytest.mark.parametrize("name", ["stunet_s", "resenc"])
def test_head_replacement_changes_only_the_heads(name):
    a, _ = _tiny(name, num_classes=3)
    b, _ = _tiny(name, num_classes=7)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    differ = {k for k in sa if sa[k].shape != sb[k].shape}
    assert differ == {k for k in sa if _in_head(name, k)} and differ
    missing, unexpected = b.load_state_dict({k: v for k, v in sa.items() if not _in_head(name, k)}, strict=False)
    assert set(missing) == differ and not unexpected


def test_flops_counts_convolutions_as_two_macs():
    conv = torch.nn.Conv3d(2, 4, 3, padding=1)
    flops, elements = forward_cost(conv, (4, 5, 6), in_channels=2)
    assert flops == 2 * (2 * 27) * 4 * (4 * 5 * 6)
    assert elements == 4 * 4 * 5 * 6


def test_measure_never_allocates():
    model = build_meta("stunet_h", 1, 105)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_models_cli_json():
    from typer.testing import CliRunner

    from medseg.cli import app

    res = CliRunner().invoke(app, ["models", "--json", "--patch", "64", "64", "64", "--num-classes", "4"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    b = rows["stunet_b"]
    assert b["available"] and b["error"] is None and b["patch"] == [64, 64, 64] and b["flops"] == 2 * b["macs"]
    assert b["params"] == count_parameters(build_meta("stunet_b", 1, 4))


@pytest.mark.parametrize("name", ["stunet_s", "resenc_m"])
def test_2d_variant(name):
    model = create_model(
        name, 1, 3, spatial_dims=2, features=[4, 8, 8], strides=[[1, 1], [2, 2], [2, 2]], kernel_sizes=[[3, 3]] * 3
    )
    assert [list(o.shape) for o in model(torch.randn(1, 1, 16, 16))] == [[1, 3, 16, 16], [1, 3, 8, 8]]
