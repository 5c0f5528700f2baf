"""Streaming (slab-wise) prediction and export equals the whole-volume path, whatever the resampling
between the model's grid and the native one (finer, coarser, thick slices), with and without TTA."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from medseg.inference.predictor import Predictor
from medseg.io.image import read_image

IMAGE = Path(__file__).resolve().parents[1] / "examples" / "hippocampus" / "images" / "hippocampus_001.nii.gz"


@pytest.fixture(scope="module")
def predictor():
    return Predictor.from_folder("hippocampus", tta=False)


@pytest.mark.parametrize(
    "spacing",
    [(1.0, 1.0, 1.0), (0.7, 1.3, 0.9), (1.6, 0.8, 0.8), (4.0, 1.0, 1.0)],
    ids=["model_grid", "mixed", "coarse_z", "thick_slices_nearest_z"],
)
def test_streaming_equals_whole_volume(predictor, spacing):
    img, meta = read_image(IMAGE)
    meta = dataclasses.replace(meta, spacing=spacing)
    whole, _ = predictor.predict_array(img[None].astype(np.float32), meta, streaming=False)
    streamed, probs = predictor.predict_array(img[None].astype(np.float32), meta, streaming=True)
    assert probs is None and streamed.dtype == whole.dtype and streamed.shape == whole.shape
    assert {1, 2} <= set(np.unique(whole).tolist())
    assert np.array_equal(streamed, whole)


def test_streaming_with_tta_on_a_long_volume(predictor):
    img, meta = read_image(IMAGE)
    long = np.concatenate([img, img[::-1], img], 0)  # several tile rows along z
    tta = Predictor.from_folder("hippocampus", tta=True)
    whole, _ = tta.predict_array(long[None].astype(np.float32), meta, streaming=False)
    streamed, _ = tta.predict_array(long[None].astype(np.float32), meta, streaming=True)
    assert np.array_equal(streamed, whole)


def test_streaming_refuses_probabilities(predictor):
    img, meta = read_image(IMAGE)
    with pytest.raises(ValueError, match="probabilities"):
        predictor.predict_array(img[None].astype(np.float32), meta, streaming=True, return_probabilities=True)
