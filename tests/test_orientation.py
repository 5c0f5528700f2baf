"""Canonical voxel orientation: codes, exact reorientation and its inverse, the plan field, the
preprocess -> export round trip, and the bundled model on scans stored in another voxel order."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_DATA, require

from medseg.errors import PlanError
from medseg.inference.export import segmentation_from_logits, to_input_grid
from medseg.io.image import ImageMeta, image_suffix, read_image
from medseg.planning.plan import SCHEMA_VERSION, Configuration, Normalization, Plan
from medseg.preprocessing.orientation import orientation_code, orientation_transform, reorient, restore
from medseg.preprocessing.pipeline import preprocess_array

IXI = SHARED_DATA / "ixi_hippocampus_target"


def _world(meta: ImageMeta, shape) -> np.ndarray:
    """(3, z, y, x) LPS world coordinate (x, y, z components) of every voxel."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    idx = np.stack([i, j, k]).reshape(3, -1) * np.array(meta.spacing[::-1])[:, None]
    d = np.asarray(meta.direction).reshape(3, 3)
    return (np.array(meta.origin[::-1])[:, None] + d @ idx).reshape(3, *shape)


def _rotation(rng, max_deg: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    a = np.deg2rad(rng.uniform(-max_deg, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


SIGNED_PERMUTATIONS = [(p, s) for p in itertools.permutations(range(3)) for s in itertools.product((1, -1), repeat=3)]


def _direction(perm, signs) -> np.ndarray:
    d = np.zeros((3, 3))
    for col, (row, sign) in enumerate(zip(perm, signs)):
        d[row, col] = sign
    return d


def test_codes_of_common_matrices():
    assert orientation_code((1, 0, 0, 0, 1, 0, 0, 0, 1)) == "LPS"  # ITK's identity
    assert orientation_code((-1, 0, 0, 0, -1, 0, 0, 0, 1)) == "RAS"  # a RAS NIfTI as SimpleITK reads it
    assert orientation_code((0, 0, -1, 1, 0, 0, 0, 1, 0)) == "PSR"  # the IXI crops
    # exact 45-degree tie: decided by axis order, always a permutation, same answer every time
    c = np.sqrt(0.5)
    tie = (c, -c, 0, c, c, 0, 0, 0, 1)
    assert orientation_code(tie) == orientation_code(tie) == "LPS"
    with pytest.raises(ValueError):
        orientation_code((1, 0, 0, 1, 0, 0, 0, 0, 1))


def test_all_48_axis_orders_reorient_exactly_and_invert(rng):
    nib = pytest.importorskip("nibabel")
    from nibabel.orientations import aff2axcodes

    shape = (3, 4, 5)
    array = rng.normal(size=(2, *shape)).astype(np.float32)  # a leading channel axis
    for perm, signs in SIGNED_PERMUTATIONS:
        d = _rotation(rng, 25) @ _direction(perm, signs)  # oblique-ish, closest axes = the signed permutation
        meta = ImageMeta(
            spacing=tuple(rng.uniform(0.5, 3.0, 3)), origin=tuple(rng.uniform(-50, 50, 3)),
            direction=tuple(d.ravel()), shape=shape,
        )  # fmt: skip
        code = orientation_code(meta.direction)
        affine = np.eye(4)
        affine[:3, :3] = np.diag([-1, -1, 1]) @ d  # nibabel works in RAS
        assert code == "".join(aff2axcodes(affine)), (perm, signs)
        for target in ("RAS", "LPS", "PSR", code):
            out, new_meta, record = reorient(array, meta, target)
            json.dumps(record)  # stored in the preprocessing properties
            assert orientation_code(new_meta.direction) == target
            assert out.shape[1:] == new_meta.shape and out.flags.c_contiguous
            assert sorted(new_meta.spacing) == sorted(meta.spacing)
            # every voxel keeps its physical position: old world field on the new grid == new world field
            moved, _, _ = reorient(_world(meta, shape), meta, target)
            np.testing.assert_allclose(moved, _world(new_meta, new_meta.shape), atol=1e-9)
            np.testing.assert_array_equal(restore(out, record), array)
            np.testing.assert_array_equal(restore(out[0], record), array[0])
            np.testing.assert_array_equal(restore(torch.from_numpy(out), record).numpy(), array)
    del nib


def test_reorient_agrees_with_simpleitk_dicomorient(rng):
    """An independent implementation: SimpleITK's DICOMOrient (same codes: ITK's identity is "LPS")."""
    import SimpleITK as sitk

    from medseg.io.image import _sitk_image

    array = rng.normal(size=(3, 4, 5)).astype(np.float32)
    for perm, signs in SIGNED_PERMUTATIONS:
        meta = ImageMeta((1.0, 2.0, 3.0), (4.0, -5.0, 6.0), tuple(_direction(perm, signs).ravel()), array.shape)
        assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(meta.direction) == orientation_code(
            meta.direction
        )
        ref = sitk.DICOMOrient(_sitk_image(array, meta), "RAS")
        out, new_meta, _ = reorient(array, meta, "RAS")
        np.testing.assert_array_equal(out, sitk.GetArrayFromImage(ref))
        np.testing.assert_allclose(new_meta.origin[::-1], ref.GetOrigin(), atol=1e-9)
        np.testing.assert_allclose(new_meta.direction, ref.GetDirection(), atol=1e-12)
        np.testing.assert_allclose(new_meta.spacing[::-1], ref.GetSpacing())


def test_orientation_transform_of_the_ixi_axes():
    perm, flip = orientation_transform((0, 0, -1, 1, 0, 0, 0, 1, 0), "RAS")  # P-S-R -> R-A-S
    assert perm == [1, 2, 0] and flip == [False, True, False]


# ----------------------------------------------------------------------------- every example image
def _example_images(folder: Path, per_folder: int = 2) -> list[Path]:
    """A few images medseg reads (NIfTI, NRRD, MHA, ...) and DICOM series folders under ``folder``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    images = [p for p in files if image_suffix(p)][:per_folder]
    series = sorted({p.parent for p in files if p.suffix.lower() == ".dcm" or p.name.startswith("CT.")})
    return images + series[:1]


_FOLDERS = [REPO / "examples" / "hippocampus"] + (
    sorted(p for p in SHARED_DATA.iterdir() if p.is_dir()) if SHARED_DATA.is_dir() else []
)


@pytest.mark.parametrize("folder", _FOLDERS, ids=lambda p: p.name)
def test_round_trip_on_example_images(folder):
    from medseg.errors import ImageReadError

    paths = _example_images(require(folder))
    read = 0
    for path in paths:
        try:
            array, meta = read_image(path)
        except ImageReadError:
            continue  # not an image medseg reads (a 2D PNG, say)
        if array.ndim < 3:
            continue
        read += 1
        out, new_meta, record = reorient(array, meta, "RAS")
        assert orientation_code(new_meta.direction) == "RAS", path
        corners = [
            tuple((n - 1) * b for n, b in zip(array.shape[-3:], bits)) for bits in itertools.product((0, 1), repeat=3)
        ]
        for c in corners:  # the voxel value at each physical corner is unchanged
            world = _world_point(meta, c)
            new_idx = _index_of(new_meta, world)
            assert out[(..., *new_idx)].tolist() == array[(..., *c)].tolist(), path
        np.testing.assert_array_equal(restore(out, record), array)
    if not read:
        pytest.skip(f"no image here that medseg reads as a volume ({folder.name})")


def _world_point(meta: ImageMeta, idx_zyx) -> np.ndarray:
    d = np.asarray(meta.direction).reshape(3, 3)
    return np.array(meta.origin[::-1]) + d @ (np.array(idx_zyx[::-1]) * np.array(meta.spacing[::-1]))


def _index_of(meta: ImageMeta, world) -> tuple[int, ...]:
    d = np.asarray(meta.direction).reshape(3, 3)
    ijk = np.linalg.solve(d, world - np.array(meta.origin[::-1])) / np.array(meta.spacing[::-1])
    assert np.allclose(ijk, np.round(ijk), atol=1e-4)
    return tuple(int(v) for v in np.round(ijk)[::-1])


# ----------------------------------------------------------------------------- plan and pipeline
def _plan(spacing, orientation="RAS"):
    cfg = Configuration("3d_fullres", tuple(spacing), (8, 8, 8), (8, 8, 8), 2)
    plan = Plan("toy", ("MRI",), {"background": 0, "a": 1, "b": 2}, (Normalization("zscore"),), {"3d_fullres": cfg})
    return replace(plan, orientation=orientation), cfg


def _psr_case(rng):
    """The same synthetic RAS scan stored R-A-S and P-S-R (as the IXI crops)."""
    shape = (12, 14, 10)
    image = np.zeros((1, *shape), np.float32)
    image[0, 1:11, 2:13, 1:9] = rng.normal(10, 2, (10, 11, 8))
    label = np.zeros(shape, np.uint8)
    label[3:8, 4:10, 2:7] = 1
    label[5:7, 6:9, 3:5] = 2
    ras = ImageMeta((1.0, 1.5, 2.0), (10.0, -20.0, 30.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1), shape)
    psr_image, psr_meta, _ = reorient(image, ras, "PSR")
    psr_label, _, _ = reorient(label, ras, "PSR")
    return (image, label, ras), (psr_image, psr_label, psr_meta)


def test_preprocess_then_export_of_a_psr_case_returns_the_identical_label_map(rng):
    (image, label, ras), (psr_image, psr_label, psr_meta) = _psr_case(rng)
    assert orientation_code(psr_meta.direction) == "PSR"
    plan, cfg = _plan((1.0, 1.5, 2.0))  # RAS spacing: no resampling, so the round trip is exact
    data, seg, props = preprocess_array(psr_image, psr_meta, plan, cfg, psr_label)
    json.dumps(props)
    assert props["orientation"]["from"] == "PSR" and props["orientation"]["to"] == "RAS"
    ras_data, ras_seg, _ = preprocess_array(image, ras, plan, cfg, label)
    np.testing.assert_array_equal(data, ras_data)  # the network sees the same voxels whatever the storage
    np.testing.assert_array_equal(seg, ras_seg)
    logits = torch.from_numpy(np.stack([(seg == c) for c in range(3)]).astype(np.float32) * 20)
    native, probs = segmentation_from_logits(logits, props, return_probabilities=True)
    native, probs = to_input_grid(native, props), to_input_grid(probs, props)
    np.testing.assert_array_equal(native, psr_label)
    assert probs.shape == (3, *psr_label.shape)
    np.testing.assert_array_equal(probs.argmax(0), psr_label)


def test_preprocess_then_export_of_a_real_ixi_label_is_identical():
    label_file = sorted(require(IXI / "labelsTr").glob("*.nii.gz"))[0]
    label, meta = read_image(label_file)
    image = (label[None] + 1).astype(np.float32)  # non-zero everywhere: no crop, just the reorientation
    plan, cfg = _plan(tuple(meta.spacing))
    data, seg, props = preprocess_array(image, meta, plan, cfg, label)
    assert seg.shape != label.shape  # the axes really moved
    logits = torch.from_numpy(np.stack([(seg == c) for c in range(3)]).astype(np.float32) * 20)
    native, _ = segmentation_from_logits(logits, props)
    np.testing.assert_array_equal(to_input_grid(native, props), label)


def test_schema_1_plan_loads_without_reorientation(rng):
    spec = json.loads((REPO / "medseg/pretrained/hippocampus/model.json").read_text())
    assert spec["plan"]["orientation"] == "RAS" and spec["plan"]["schema_version"] == SCHEMA_VERSION == 2
    old = {k: v for k, v in spec["plan"].items() if k != "orientation"}
    old["schema_version"] = 1
    plan = Plan.from_json(old)
    assert plan.orientation is None
    assert Plan.from_json(plan.to_json()).orientation is None  # saved again: stays off
    assert Plan.from_json(spec["plan"]).orientation == "RAS"
    with pytest.raises(PlanError, match="orientation"):
        Plan.from_json({**spec["plan"], "orientation": "RAX"})
    # off: the voxels reach the network in stored order, as before schema 2
    _, (psr_image, psr_label, psr_meta) = _psr_case(rng)
    plan, cfg = _plan(psr_meta.spacing, orientation=None)
    data, seg, props = preprocess_array(psr_image, psr_meta, plan, cfg, psr_label)
    assert props["orientation"] is None and props["original_shape"] == list(psr_label.shape)
    assert to_input_grid(seg, props) is seg


def test_new_plans_name_ras_and_fingerprint_in_ras_axis_order(tmp_path):
    from medseg.io.dataset import load_dataset_json
    from medseg.planning.fingerprint import compute_fingerprint
    from medseg.planning.planner import make_plan

    require(IXI)
    fp = compute_fingerprint(IXI, workers=1, progress=False)
    label, meta = read_image(sorted((IXI / "labelsTr").glob("*.nii.gz"))[0])
    assert meta.spacing == (2.0, 2.0, 2.0)
    plan = make_plan(load_dataset_json(IXI), fp)
    assert plan.orientation == "RAS"
    # the fingerprint's shapes are in the RAS axis order the preprocessed data will have
    perm, _ = orientation_transform(meta.direction, "RAS")
    first = sorted((IXI / "imagesTr").glob("*.nii.gz"))[0]
    image, m = read_image(first)
    from medseg.preprocessing.cropping import crop_to_nonzero

    cropped = crop_to_nonzero(image[None].astype(np.float32))[0]
    assert fp.shapes_after_crop[0] == [cropped.shape[1:][p] for p in perm]


# ----------------------------------------------------------------------------- the bundled model
def _union_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    p, r = pred > 0, ref > 0
    return float(2 * (p & r).sum() / max(p.sum() + r.sum(), 1))


def test_bundled_model_on_psr_scans_beats_stored_voxel_order():
    from medseg.inference.predictor import Predictor

    require(IXI)
    canonical = Predictor.from_folder("hippocampus", device="cpu", tta=False, amp=False)
    stored = Predictor(
        replace(canonical.spec, plan=replace(canonical.spec.plan, orientation=None)),
        {"0": canonical.models[0].state_dict()}, device="cpu", tta=False, amp=False,
    )  # fmt: skip
    for name in ("ixi_IXI048-HH-1326_L", "ixi_IXI048-HH-1326_R"):  # one subject, both sides
        image, meta = read_image(IXI / "imagesTr" / f"{name}_0000.nii.gz")
        ref, _ = read_image(IXI / "labelsTr" / f"{name}.nii.gz")
        seg, probs = canonical.predict_array(image[None].astype(np.float32), meta, return_probabilities=True)
        assert seg.shape == ref.shape and probs.shape == (3, *ref.shape)
        if name.endswith("_L"):  # the streaming path maps back to the input grid too
            streamed, _ = canonical.predict_array(image[None].astype(np.float32), meta, streaming=True)
            assert (streamed != seg).mean() < 1e-3
        off, _ = stored.predict_array(image[None].astype(np.float32), meta)
        on_dice, off_dice = _union_dice(seg, ref), _union_dice(off, ref)
        assert on_dice > 0.5 and on_dice > off_dice + 0.1, (name, on_dice, off_dice)
    # a case already stored R-A-S (as all of its training data) is predicted exactly as before
    image, meta = read_image(REPO / "examples/hippocampus/images/hippocampus_001.nii.gz")
    on, _ = canonical.predict_array(image[None].astype(np.float32), meta)
    off, _ = stored.predict_array(image[None].astype(np.float32), meta)
    np.testing.assert_array_equal(on, off)


def test_round_trip_through_a_metaimage_file(tmp_path, rng):
    """No .mha among the example data: write one in P-S-R order and read it back."""
    from medseg.io.image import write_image

    _, (psr_image, _, psr_meta) = _psr_case(rng)
    path = write_image(psr_image[0], psr_meta, tmp_path / "psr.mha")
    array, meta = read_image(path)
    assert orientation_code(meta.direction) == "PSR"
    out, new_meta, record = reorient(array, meta)
    assert orientation_code(new_meta.direction) == "RAS"
    np.testing.assert_array_equal(restore(out, record), array)
