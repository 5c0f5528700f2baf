"""The CPU fast path (medseg.execution, medseg.models.norms): layout-preserving instance norm, the
candidates and the measured, cached choice, pre-cast bf16 inference agreeing with fp32 on real MRIs,
channels-last training, the fp32 fallback on CPUs without bf16, and bad --layout values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from medseg import execution, utils
from medseg.execution import Execution, candidates, choose_execution
from medseg.io.image import read_image
from medseg.models.norms import InstanceNorm2d, InstanceNorm3d
from tests.conftest import run_main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "hippocampus"
CPU = torch.device("cpu")
CL3 = torch.channels_last_3d


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_instance_norm_is_torchs_in_either_layout(dims, channels_last):
    torch.manual_seed(0)
    ours = (InstanceNorm3d if dims == 3 else InstanceNorm2d)(6, affine=True)
    ref = (nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d)(6, affine=True)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2)
        ours.bias.uniform_(-1, 1)
    ref.load_state_dict(ours.state_dict())  # same keys
    x = torch.randn(2, 6, *([5, 7, 6] if dims == 3 else [9, 8])) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=CL3 if dims == 3 else torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), ref(x2)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
    if channels_last:  # no copy back to NCDHW
        assert y1.is_contiguous(memory_format=CL3 if dims == 3 else torch.channels_last)
    assert isinstance(ours, nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d)


def test_candidates_follow_device_precision_and_model(monkeypatch):
    monkeypatch.setattr(utils, "native_bf16_cpu", lambda: True)
    names = [c.name for c in candidates(CPU, amp=None, layout="auto", training=False, fast_path=True)]
    assert names == ["bfloat16 pre-cast contiguous", "bfloat16 pre-cast channels_last",
                     "float32 contiguous", "float32 channels_last"]  # fmt: skip
    train = candidates(CPU, amp=None, layout="auto", training=True, fast_path=True)
    assert not any(c.precast for c in train) and train[0].name == "bfloat16 autocast contiguous"  # fp32 master weights
    only = candidates(CPU, amp=False, layout="channels_last", training=False, fast_path=True)
    assert [(c.precision, c.layout, c.chosen_by) for c in only] == [("float32", "channels_last", "user")]
    plain = candidates(CPU, amp=None, layout="auto", training=False, fast_path=False)  # attention models
    assert [(c.precision, c.layout, c.precast) for c in plain] == [("bfloat16", "contiguous", False)]
    cuda = candidates(torch.device("cuda"), amp=None, layout="auto", training=False, fast_path=True)
    assert [(c.precision, c.layout) for c in cuda] == [("float16", "contiguous")]
    monkeypatch.setattr(utils, "native_bf16_cpu", lambda: False)  # a CPU without bf16: fp32 only
    assert {c.precision for c in candidates(CPU, amp=None, layout="auto", training=False, fast_path=True)} == {
        "float32"
    }
    with pytest.raises(ValueError, match="--layout must be one of"):
        candidates(CPU, amp=None, layout="nhwc", training=False, fast_path=True)


def _net():
    from medseg.models.unet import build_unet

    kw = {"features": [4, 8, 16], "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 3}
    return build_unet(1, 3, deep_supervision=False, **kw).eval()


def test_choice_is_the_fastest_measured_and_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(utils, "native_bf16_cpu", lambda: True)
    fake = {"bfloat16 pre-cast contiguous": 0.3, "bfloat16 pre-cast channels_last": 0.1,
            "float32 contiguous": 0.5, "float32 channels_last": float("inf")}  # fmt: skip
    calls = []
    monkeypatch.setattr(
        execution, "_time_or_inf", lambda ex, *a: calls.append(ex.name) or fake.get(ex.name, float("inf"))
    )
    cache = tmp_path / "execution.json"
    net = _net()
    ex = choose_execution(net, (1, 1, 16, 16, 16), CPU, fast_path=True, cache=cache)
    assert (ex.name, ex.chosen_by) == ("bfloat16 pre-cast channels_last", "benchmark")
    assert ex.timings == {"bfloat16 pre-cast contiguous": 300.0, "bfloat16 pre-cast channels_last": 100.0,
                          "float32 contiguous": 500.0}  # a candidate that cannot run is left out  # fmt: skip
    assert len(calls) == 4 and json.loads(cache.read_text())
    again = choose_execution(net, (1, 1, 16, 16, 16), CPU, fast_path=True, cache=cache)
    assert (again.name, again.chosen_by, len(calls)) == (ex.name, "cache", 4)  # not measured again
    other = choose_execution(net, (2, 1, 16, 16, 16), CPU, fast_path=True, cache=cache)  # another shape
    assert other.chosen_by == "benchmark" and len(calls) == 8
    cache.write_text("{not json")  # a damaged cache is re-measured, not an error
    assert choose_execution(net, (1, 1, 16, 16, 16), CPU, fast_path=True, cache=cache).chosen_by == "benchmark"
    fake.update({"bfloat16 pre-cast contiguous": float("inf"), "bfloat16 pre-cast channels_last": float("inf"),
                 "bfloat16 autocast channels_last": 0.2})  # no bf16 kernel for an op (ResEnc's avg_pool3d)  # fmt: skip
    fallback = choose_execution(net, (4, 1, 16, 16, 16), CPU, fast_path=True, cache=False)
    assert (fallback.name, fallback.precast) == ("bfloat16 autocast channels_last", False)  # autocast runs it
    for name in fake:
        fake[name] = float("inf")  # nothing runs: the default path, whose own error a user would see
    none = choose_execution(net, (3, 1, 16, 16, 16), CPU, fast_path=True, cache=False)
    assert (none.name, none.chosen_by) == ("float32 contiguous", "rule")


@pytest.mark.execution_timing
def test_real_timing_leaves_the_network_unchanged():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = torch.random.get_rng_state()
    ex = choose_execution(net, (1, 1, 16, 16, 16), CPU, amp=False, fast_path=True, cache=False)
    assert ex.chosen_by == "benchmark" and set(ex.timings) == {"float32 contiguous", "float32 channels_last"}
    assert all(torch.equal(before[k], v) and v.is_contiguous() for k, v in net.state_dict().items())
    assert torch.equal(state, torch.random.get_rng_state())  # seeded training is not perturbed


def test_precast_channels_last_runs_in_bf16_without_autocast():
    torch.manual_seed(0)
    net, ref = _net(), _net()
    ref.load_state_dict(net.state_dict())
    ex = Execution("bfloat16", "channels_last", precast=True)
    ex.prepare(net)
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    x = torch.randn(2, 1, 16, 16, 16)
    xi = ex.input(x)
    assert xi.dtype == torch.bfloat16 and xi.is_contiguous(memory_format=CL3)
    with torch.no_grad(), ex.context(CPU):
        y = net(xi)
        y_ref = ref(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=CL3)
    assert float((y.float() - y_ref).norm() / y_ref.norm()) < 0.02  # bf16 rounding, not another function
    assert isinstance(Execution("bfloat16", "contiguous").context(CPU), torch.autocast)  # training-style


def _dice(a, b):
    s = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / s) if s else 1.0


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fast_path_segments_real_mris_like_fp32(layout, monkeypatch):
    """The bundled hippocampus model on the three example MRIs: pre-cast bf16 (where this CPU has bf16)
    in either layout against the fp32 contiguous path, Dice >= 0.999 per structure."""
    from medseg.inference.predictor import Predictor

    ref = Predictor.from_folder("hippocampus", device="cpu", amp=False, layout="contiguous")
    fast = Predictor.from_folder("hippocampus", device="cpu", amp=True, layout=layout)
    assert ref.execution.name == "float32 contiguous"
    assert (fast.execution.precision, fast.execution.layout, fast.execution.precast) == ("bfloat16", layout, True)
    assert next(fast.models[0].parameters()).dtype == torch.bfloat16
    for path in sorted((EXAMPLES / "images").glob("*.nii.gz")):
        image, meta = read_image(path)
        a, pa = ref.predict_array(image[None].astype(np.float32), meta, return_probabilities=True)
        b, pb = fast.predict_array(image[None].astype(np.float32), meta, return_probabilities=True)
        assert pb.dtype == np.float32 and 0 < float(np.abs(pa - pb).max()) < 0.2
        for label in (1, 2):
            assert _dice(a == label, b == label) >= 0.999, (path.name, label)


def test_cpu_without_bf16_falls_back_to_fp32(monkeypatch):
    from medseg.inference.predictor import Predictor

    monkeypatch.setattr(utils, "native_bf16_cpu", lambda: False)
    p = Predictor.from_folder("hippocampus", device="cpu")
    assert p.execution.precision == "float32" and not p.execution.precast
    assert next(p.models[0].parameters()).dtype == torch.float32
    image, meta = read_image(sorted((EXAMPLES / "images").glob("*.nii.gz"))[0])
    seg, _ = p.predict_array(image[None].astype(np.float32), meta)
    assert set(np.unique(seg)) == {0, 1, 2}


def test_channels_last_training_writes_plain_weights(hippo_dataset, tmp_path):
    from medseg import api
    from medseg.io.checkpoint import load_weights
    from medseg.training.config import TrainingConfig

    cfg = TrainingConfig(epochs=1, iterations_per_epoch=2, val_iterations=1, batch_size=2, layout="channels_last",
                         final_validation=False, device="cpu")  # fmt: skip
    out = tmp_path / "model"
    api.plan(hippo_dataset, tmp_path / "ws", progress=False)
    api.preprocess(hippo_dataset, tmp_path / "ws", workers=1, progress=False)
    api.train(hippo_dataset, workspace=tmp_path / "ws", fold=0, config=cfg, output=out, log=lambda *a, **k: None)
    record = json.loads((out / "fold_0" / "checkpoint.json").read_text())
    assert record["execution"].endswith("channels_last")
    weights = load_weights(out / "fold_0")
    assert all(t.is_contiguous() for t in weights.values())


def test_bad_layout_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    image = sorted((EXAMPLES / "images").glob("*.nii.gz"))[0]
    code, _, err = run_main(monkeypatch, capsys, "predict", "-m", "hippocampus", "-i", image, "-o", tmp_path / "o",
                            "--layout", "nhwc")  # fmt: skip
    assert code != 0 and "--layout must be one of" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
