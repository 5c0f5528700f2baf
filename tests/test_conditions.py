"""Conditioning inputs and named outputs through the one loop and the one predictor.

Points and boxes move with the image under the spatial augmentation; at prediction they follow
reorientation, crop, resampling, tiling and mirror TTA into each tile's coordinates; a model's
extra named maps are blended, un-flipped and exported on the input's own grid."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from medseg.augment.transforms import NO_AUGMENTATION, AugmentConfig, augment_batch
from medseg.inference.conditions import points_to_preprocessed, tile_conditions
from medseg.io.image import ImageMeta


def _blobs(points: torch.Tensor, shape, sigma=1.5) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    coords = torch.stack(grids, -1)  # (*shape, dim)
    d2 = (
        (coords[None] - points[:, None, None, None, :] if len(shape) == 3 else coords[None] - points[:, None, None, :])
        ** 2
    ).sum(-1)
    return torch.exp(-d2 / (2 * sigma**2))[:, None]


SPATIAL_ONLY = replace(NO_AUGMENTATION, p_rotation=1.0, p_scale=1.0, scale_range=(0.8, 1.25), p_mirror=0.5,
                       region_margin=1.4)  # fmt: skip


@pytest.mark.parametrize("region,patch", [((30, 34, 32), (20, 24, 22)), ((44, 40), (32, 28))])
def test_points_follow_rotation_scaling_crop_and_mirror(region, patch):
    g = torch.Generator().manual_seed(0)
    b, dim = 6, len(region)
    centre = torch.tensor(region, dtype=torch.float32) / 2
    pts = centre + (torch.rand(b, dim, generator=g) - 0.5) * torch.tensor(patch, dtype=torch.float32) * 0.5
    image = _blobs(pts, region)
    cond = {"points": pts[:, None, :]}
    out, _, moved = augment_batch(image, None, patch, SPATIAL_ONLY, torch.Generator().manual_seed(3), cond=cond)
    for i in range(b):
        peak = np.unravel_index(int(out[i, 0].argmax()), patch)
        assert np.abs(np.array(peak) - moved["points"][i, 0].numpy()).max() <= 1.0, (i, peak, moved["points"][i])


def test_boxes_follow_and_enclose_the_object():
    g = torch.Generator().manual_seed(1)
    region, patch = (36, 36, 36), (24, 24, 24)
    seg = torch.zeros(4, 1, *region, dtype=torch.int64)
    boxes = []
    for i in range(4):
        lo = torch.randint(10, 16, (3,), generator=g)
        hi = lo + torch.randint(4, 9, (3,), generator=g)
        seg[i, 0, lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = 1
        boxes.append(torch.cat([lo, hi]).float())
    cond = {"boxes": torch.stack(boxes)[:, None, :]}
    image = seg.float()
    cfg = replace(SPATIAL_ONLY, p_rotation=0.0)  # scaling + crop + mirror: the box maps exactly
    _, out_seg, moved = augment_batch(image, seg, patch, cfg, torch.Generator().manual_seed(5), cond=cond)
    for i in range(4):
        idx = torch.nonzero(out_seg[i, 0])
        got = torch.cat([idx.min(0).values, idx.max(0).values]).float()
        assert (got - moved["boxes"][i, 0]).abs().max() <= 1.0
    _, out_seg, moved = augment_batch(image, seg, patch, SPATIAL_ONLY, torch.Generator().manual_seed(5), cond=cond)
    for i in range(4):  # rotated: the moved box encloses the rotated object
        idx = torch.nonzero(out_seg[i, 0]).float()
        lo, hi = moved["boxes"][i, 0, :3], moved["boxes"][i, 0, 3:]
        assert (idx >= lo - 1).all() and (idx <= hi + 1).all()


def test_without_conditions_the_batch_is_unchanged():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 1, 20, 20, 20, generator=g)
    seg = (image > 0).long()
    a, sa = augment_batch(image, seg, (12, 12, 12), AugmentConfig(), torch.Generator().manual_seed(9))
    b, sb, cond = augment_batch(image, seg, (12, 12, 12), AugmentConfig(), torch.Generator().manual_seed(9),
                                cond={"text": torch.ones(2, 4)})  # fmt: skip
    assert torch.equal(a, b) and torch.equal(sa, sb) and torch.equal(cond["text"], torch.ones(2, 4))


def test_tile_conditions_shift_mirror_and_squeeze():
    cond = {"points": torch.tensor([[[0.0, 5.0, 7.0]]]), "boxes": torch.tensor([[[0.0, 2, 3, 0, 6, 9]]]),
            "text": torch.ones(1, 3)}  # fmt: skip
    fn = tile_conditions(cond, (1, 16, 16), squeeze_z=True)
    out = fn([[0, 0, 0], [0, 4, 2]], (2,))  # two tiles, flipped along x
    assert out["text"].shape == (2, 3)
    assert out["points"].tolist() == [[[5.0, 8.0]], [[1.0, 10.0]]]  # x' = 15 - (x - start)
    assert out["boxes"].tolist() == [[[2.0, 6.0, 6.0, 12.0]], [[-2.0, 8.0, 2.0, 14.0]]]


def test_points_follow_reorientation_crop_and_resampling():
    props = {"orientation": {"perm": [1, 0, 2], "flip": [False, True, False], "shape": [10, 20, 30]},
             "bbox": [[2, 20], [1, 9], [0, 30]], "shape_after_crop": [18, 8, 30],
             "shape_after_resampling": [36, 8, 15]}  # fmt: skip
    p = points_to_preprocessed(np.array([[3.0, 7.0, 11.0]]), props)
    # reoriented: (7, 10 - 1 - 3, 11) = (7, 6, 11); cropped: (5, 5, 11); resampled x2, x1, x0.5
    assert p.tolist() == [[10.5, 5.0, 5.25]]


# ---------------------------------------------------------------- predictor, end to end
class PointEcho(torch.nn.Module):
    """Class 1 where a prompt point is (within 2 voxels, in tile coordinates); its ``ood_score`` map
    is the (normalised) input intensity itself, so TTA and export must give it back unchanged."""

    def __init__(self, in_channels, num_classes, deep_supervision=False, **_):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, points=None):
        shape = x.shape[2:]
        grids = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"), -1)
        d2 = ((grids[None, None] - points[:, :, None, None, None, :]) ** 2).sum(-1).amin(1)
        fg = (2.5**2 - d2) * self.scale
        return {"logits": torch.stack([torch.zeros_like(fg), fg], 1), "ood_score": x[:, :1].float()}


def test_predictor_passes_points_and_exports_named_maps(tmp_path, isolated_registries):
    from medseg.inference.predictor import Predictor
    from medseg.io.checkpoint import ModelSpec
    from medseg.io.image import read_image
    from medseg.models.registry import register_model
    from medseg.planning.plan import Configuration, Normalization, Plan

    register_model("point_echo_test", test_config={})(PointEcho)
    conf = Configuration("3d_fullres", (1.0, 1.0, 1.0), (24, 24, 24), (16, 16, 16), 2, model="point_echo_test")
    plan = Plan("test", ("mr",), {"background": 0, "spot": 1}, (Normalization("zscore"),), {conf.name: conf},
                orientation="RAS")  # fmt: skip
    spec = ModelSpec("point_echo_test", {}, 1, 2, dict(plan.labels), plan, conf.name)
    predictor = Predictor(spec, {"0": PointEcho(1, 2).state_dict()}, device="cpu", amp=False)
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (20, 30, 26)], indexing="ij")
    image = (100 + 10 * np.sin(zz / 4) + 5 * np.cos(yy / 5) + xx / 3)[None].astype(np.float32)  # smooth
    # P-S-R voxel order (the IXI crops): index axes i, j, k towards P, S, R (ITK's world is LPS)
    direction = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    meta = ImageMeta((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), direction, (20, 30, 26))
    point = [12.0, 7.0, 19.0]
    maps = predictor.predict_maps(image, meta, points=[point])
    seg = maps["labels"]
    assert seg.shape == image.shape[1:]
    fg = np.argwhere(seg == 1)
    assert len(fg) > 0 and np.abs(fg.mean(0) - point).max() <= 1.0
    z = (image[0] - image[0].mean()) / image[0].std()
    assert maps["ood_score"].shape == (1, *image.shape[1:])
    # resampled 2 mm -> 1 mm and back along z: equal up to interpolation, un-flipped after every TTA flip
    assert np.abs(maps["ood_score"][0] - z)[1:-1].max() < 0.02

    case_dir = tmp_path / "in"
    case_dir.mkdir()
    from medseg.io.dataset import Case
    from medseg.io.image import write_image

    write_image(image[0], meta, case_dir / "c1_0000.nii.gz")
    res = predictor.predict_cases([Case("c1", (case_dir / "c1_0000.nii.gz",), None)], tmp_path / "out",
                                  case_conditions={"c1": {"points": [point]}}, progress=False)  # fmt: skip
    assert res[0]["maps"] == [str(tmp_path / "out" / "c1_ood_score.nii.gz")]
    written, wmeta = read_image(tmp_path / "out" / "c1.nii.gz")
    assert np.array_equal(written, seg) and wmeta.direction == pytest.approx(direction)
    score, _ = read_image(tmp_path / "out" / "c1_ood_score.nii.gz")
    assert score == pytest.approx(maps["ood_score"][0], abs=1e-5)
