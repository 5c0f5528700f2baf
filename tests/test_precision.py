"""Mixed precision: which dtype ``amp`` resolves to, and that the bf16 CPU path (medseg's default on CPUs
with native bf16) segments the real sample MRIs like fp32 does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medseg import utils
from medseg.io.image import read_image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "hippocampus"


@pytest.mark.parametrize("native", [True, False])
def test_autocast_dtype_rules(monkeypatch, native):
    monkeypatch.setattr(utils, "native_bf16_cpu", lambda: native)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert utils.autocast_dtype(cpu, None) == (torch.bfloat16 if native else None)
    assert utils.autocast_dtype(cpu, True) == torch.bfloat16  # forced, even where it is emulated
    assert utils.autocast_dtype(cpu, False) is None
    assert utils.autocast_dtype(cuda, None) == torch.float16  # as nnU-Net
    assert utils.autocast_dtype(cuda, False) is None
    assert utils.autocast_dtype("mps", None) is None


@pytest.mark.parametrize("units", [["avx512_bf16", "amx"], ["avx512_bf16"], []])
def test_cpu_description_names_the_bf16_units(monkeypatch, units):
    """Benchmarks record whether the CPU has AMX: its model name alone does not say."""
    monkeypatch.setattr(utils, "cpu_bf16_units", lambda: units)
    text = utils.cpu_description()
    assert text.startswith(utils.cpu_name())
    assert text.endswith(f"({', '.join(units)})" if units else "(no native bf16)")
    assert utils.native_bf16_cpu() == bool(units)


def test_cpu_bf16_units_are_what_torch_reports():
    cpu = torch.cpu
    expected = {"avx512_bf16": cpu._is_avx512_bf16_supported(), "amx": cpu._is_amx_tile_supported()}
    assert utils.cpu_bf16_units() == [u for u, present in expected.items() if present]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / s) if s else 1.0


def test_bf16_segments_real_mris_like_fp32():
    from medseg.inference.predictor import Predictor

    fp32 = Predictor.from_folder("hippocampus", device="cpu", amp=False)
    bf16 = Predictor.from_folder("hippocampus", device="cpu", amp=True)
    assert fp32.amp_dtype is None and bf16.amp_dtype == torch.bfloat16
    images = sorted((EXAMPLES / "images").glob("*.nii.gz"))
    assert len(images) == 3
    for path in images:
        image, meta = read_image(path)
        ref = read_image(EXAMPLES / "labels" / path.name)[0]
        seg32, p32 = fp32.predict_array(image[None].astype(np.float32), meta, return_probabilities=True)
        seg16, p16 = bf16.predict_array(image[None].astype(np.float32), meta, return_probabilities=True)
        diff = float(np.abs(p32 - p16).max())
        assert 0 < diff < 0.5, diff  # the bf16 path really ran, and only rounding separates the two
        for label in (1, 2):
            assert _dice(seg16 == label, seg32 == label) >= 0.98, (path.name, label)
            # accuracy against the manual labels: within one Dice point of fp32
            assert abs(_dice(seg16 == label, ref == label) - _dice(seg32 == label, ref == label)) < 0.01
