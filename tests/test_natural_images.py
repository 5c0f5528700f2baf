"""2D natural images (PNG, BMP, TIFF) through the whole pipeline, in nnU-Net's NaturalImage2DIO
convention: read/write round trips, RGB in one file, verify on real PNG datasets, one-line errors for
bad cases, a tiny BUSI plan -> preprocess -> train -> predict -> evaluate, ROI-masked evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, require
from PIL import Image

from medseg.errors import DatasetError, ImageReadError, OutputError
from medseg.io.channels import read_case_channels
from medseg.io.image import NATURAL_SPACING, ImageMeta, read_image, read_image_channels, write_image

FIXTURE = Path(__file__).parent / "fixtures" / "busi_4"  # 4 BUSI cases (CC0, SOURCE.md)
BUSI = SHARED_DATA / "busi_breast_ultrasound"
DRIVE = SHARED_DATA / "drive_retina_vessels"  # no clear licence: used from ../shared only
META = ImageMeta(NATURAL_SPACING)


def _copy_fixture(dst: Path) -> Path:
    shutil.copytree(FIXTURE, dst)
    for f in dst.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    return dst


# ---------------------------------------------------------------------------------------- read / write


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".tiff"])
def test_grey_label_round_trip(tmp_path, rng, ext):
    label = rng.integers(0, 4, (1, 37, 53)).astype(np.uint8)
    out = write_image(label, META, tmp_path / f"case{ext}")
    assert [p.name for p in tmp_path.iterdir()] == [f"case{ext}"]  # no temp file left behind
    arr, meta = read_image(out)
    assert arr.shape == (1, 37, 53) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, label)
    assert meta.spacing == NATURAL_SPACING and meta.shape == (1, 37, 53) and meta.origin == (0.0, 0.0, 0.0)
    assert meta.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16_bit_is_not_truncated(tmp_path, ext):
    label = np.array([[[0, 1, 255, 256, 1000, 65535]]], dtype=np.int64)
    out = write_image(label, META, tmp_path / f"inst{ext}")
    assert Image.open(out).mode == "I;16"
    arr, _ = read_image(out)
    assert arr.dtype == np.uint16
    np.testing.assert_array_equal(arr, label)


def test_rgb_file_gives_three_channels_alpha_dropped(tmp_path, rng):
    rgba = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c_0000.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "c_0000.tif")
    for f in ("c_0000.png", "c_0000.tif"):
        arr, meta = read_image_channels(tmp_path / f)
        assert arr.shape == (3, 1, 20, 30) and meta.shape == (1, 20, 30)
        for c in range(3):
            np.testing.assert_array_equal(arr[c, 0], rgba[..., c])
    with pytest.raises(ImageReadError, match="RGB") as exc:  # a label or a grey channel must be one channel
        read_image(tmp_path / "c_0000.png")
    assert exc.value.path == str(tmp_path / "c_0000.png")
    data, _ = read_case_channels([tmp_path / "c_0000.png"], 3)
    assert data.dtype == np.float32 and data.shape == (3, 1, 20, 30)


def test_case_channel_counts_are_one_line_errors(tmp_path):
    grey = FIXTURE / "imagesTr" / "busi_benign_001_0000.png"
    Image.open(grey).convert("RGB").save(tmp_path / "rgb_0000.png")
    with pytest.raises(DatasetError, match=r"is an RGB image \(3 channels\); the model needs 1 channel") as exc:
        read_case_channels([tmp_path / "rgb_0000.png"], 1, needs="the model needs")
    assert exc.value.path == str(tmp_path / "rgb_0000.png")
    with pytest.raises(DatasetError, match=r"is a grey image \(1 channel\); the model needs 3 channels") as exc:
        read_case_channels([grey], 3, needs="the model needs")
    assert exc.value.path == str(grey)
    data, meta = read_case_channels([grey, grey], 2)  # one grey file per channel works too
    assert data.shape == (2, *meta.shape)


def test_grey_16_bit_image_and_palette_label(tmp_path):
    grey = (np.arange(24, dtype=np.uint16).reshape(4, 6) * 2000).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    arr, _ = read_image_channels(tmp_path / "g.png")
    np.testing.assert_array_equal(arr[0, 0], grey)  # up to 46000: not clipped to 8 bits
    pal = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png")[0][0], [[0, 1], [2, 1]])  # indices, not colours


def test_write_refuses_what_a_2d_file_cannot_hold(tmp_path):
    with pytest.raises(OutputError, match=r"one 2D slice, got shape \(2, 4, 4\)"):
        write_image(np.zeros((2, 4, 4), np.uint8), META, tmp_path / "vol.png")
    with pytest.raises(OutputError, match=r"0\.\.255"):
        write_image(np.full((1, 4, 4), 300, np.uint16), META, tmp_path / "big.bmp")
    with pytest.raises(OutputError, match="not integers"):
        write_image(np.full((1, 4, 4), 0.5, np.float32), META, tmp_path / "prob.png")
    assert not list(tmp_path.iterdir())


def test_corrupt_png_is_one_line_error(tmp_path):
    good = (FIXTURE / "imagesTr" / "busi_benign_001_0000.png").read_bytes()
    bad = tmp_path / "cut.png"
    bad.write_bytes(good[: len(good) // 2])  # a half-copied file
    with pytest.raises(ImageReadError) as exc:
        read_image(bad)
    assert exc.value.path == str(bad) and "\n" not in exc.value.one_line()
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageReadError, match="not an image"):
        read_image(tmp_path / "text.png")


# ---------------------------------------------------------------------------------------- verify / errors


def test_verify_fixture_and_shared_png_datasets():
    from medseg.io.verify import verify_dataset

    assert verify_dataset(FIXTURE, workers=1) == (4, [])
    for ds, n in ((BUSI, 200), (DRIVE, 20)):
        if ds.is_dir():  # DRIVE: RGB in one _0000.png, channel_names R, G, B
            assert verify_dataset(ds) == (n, [])
    require(BUSI)


def test_rgb_where_one_channel_is_declared(tmp_path):
    from medseg.io.verify import verify_dataset
    from medseg.planning.fingerprint import compute_fingerprint

    ds = _copy_fixture(tmp_path / "ds")
    bad = ds / "imagesTr" / "busi_benign_002_0000.png"
    Image.open(bad).convert("RGB").save(bad)
    _, problems = verify_dataset(ds, workers=1)
    assert [(p.path, p.reason) for p in problems] == [
        (str(bad), "is an RGB image (3 channels); dataset.json declares 1 channel(s)")
    ]
    with pytest.raises(DatasetError, match="RGB image") as exc:
        compute_fingerprint(ds, workers=1, progress=False)
    assert exc.value.path == str(bad)


def test_grey_where_rgb_is_declared(tmp_path):
    from medseg.io.verify import verify_dataset

    ds = _copy_fixture(tmp_path / "ds")
    d = json.loads((ds / "dataset.json").read_text())
    d["channel_names"] = {"0": "R", "1": "G", "2": "B"}
    (ds / "dataset.json").write_text(json.dumps(d))
    _, problems = verify_dataset(ds, workers=1)
    assert len(problems) == 4 and all("grey image (1 channel); dataset.json declares 3" in p.reason for p in problems)
    assert problems[0].path == str(ds / "imagesTr" / "busi_benign_001_0000.png")


def test_label_of_another_size(tmp_path):
    from medseg import api
    from medseg.io.verify import verify_dataset

    ds = _copy_fixture(tmp_path / "ds")
    lab = ds / "labelsTr" / "busi_malignant_001.png"
    Image.open(lab).crop((0, 0, 100, 90)).save(lab)
    _, problems = verify_dataset(ds, workers=1)
    assert len(problems) == 1 and problems[0].path == str(lab)
    assert problems[0].reason.startswith("shape (1, 90, 100) differs from busi_malignant_001_0000.png")
    with pytest.raises(DatasetError, match=r"shape \(1, 90, 100\) differs") as exc:
        api.plan(ds, tmp_path / "ws", progress=False)
    assert exc.value.path == str(lab)


def test_cases_from_input_finds_png_cases(tmp_path):
    from medseg.io.dataset import cases_from_input

    cases = cases_from_input(FIXTURE / "imagesTr", 1)
    assert [c.name for c in cases] == ["busi_benign_001", "busi_benign_002", "busi_malignant_001", "busi_malignant_002"]
    Image.new("RGB", (8, 6)).save(tmp_path / "photo_0000.png")
    Image.new("RGB", (8, 6)).save(tmp_path / "scan_2024.png")
    cases = cases_from_input(tmp_path, 3)  # an RGB model: one PNG holds the three channels
    assert [(c.name, len(c.images)) for c in cases] == [("photo", 1), ("scan_2024", 1)]


# ---------------------------------------------------------------------------------------- plan


def test_2d_plan_has_only_a_2d_configuration(tmp_path):
    from medseg import api
    from medseg.planning.plan import Plan

    p = api.plan(FIXTURE, tmp_path / "ws", progress=False)
    assert list(p.configurations) == ["2d"] and p.default_configuration == "2d"
    c = p.configuration("2d")
    assert c.spacing == (1.0, 1.0) and len(c.patch_size) == 2 and c.spatial_dims == 2
    assert c.model_kwargs["spatial_dims"] == 2 and p.file_ending == ".png" and p.orientation is None
    assert [n.scheme for n in p.normalization] == ["zscore"]
    again = Plan.from_json(json.loads(json.dumps(p.to_json())))
    assert again == p and again.configuration("2d").spacing == (1.0, 1.0)


def test_2d_config_resamples_only_in_plane():
    from medseg.planning.plan import Configuration, Normalization, Plan
    from medseg.preprocessing.pipeline import preprocess_array

    conf = Configuration("2d", (0.5, 2.0), (1, 1), (16, 16), 2)
    plan = Plan("x", ("g",), {"background": 0, "a": 1}, (Normalization(),), {"2d": conf}, file_ending=".png")
    image = np.random.default_rng(0).random((1, 1, 20, 30)).astype(np.float32) + 1
    label = np.zeros((1, 20, 30), np.uint8)
    label[0, 5:15, 10:20] = 1
    data, seg, props = preprocess_array(image, ImageMeta((1.0, 1.0, 1.0), shape=(1, 20, 30)), plan, conf, label)
    assert data.shape == (1, 1, 40, 15) and seg.shape == (1, 40, 15)
    assert props["separate_z_axis"] is None


# ---------------------------------------------------------------------------------------- end to end


def test_busi_end_to_end(tmp_path):
    """8 BUSI cases: plan -> preprocess -> train (2 epochs x 2 iterations) -> `medseg predict` ->
    PNGs at the input size with values in {0, 1} -> `medseg evaluate` (< 60 s on 2 cores)."""
    from typer.testing import CliRunner

    from medseg import api
    from medseg.cli import app
    from medseg.training.config import TrainingConfig

    require(BUSI)
    ds = tmp_path / "Dataset_BUSI8"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    names = [f"busi_{k}_{i:03d}" for k in ("benign", "malignant") for i in (1, 2, 3, 4)]
    for n in names:
        shutil.copyfile(BUSI / "imagesTr" / f"{n}_0000.png", ds / "imagesTr" / f"{n}_0000.png")
        shutil.copyfile(BUSI / "labelsTr" / f"{n}.png", ds / "labelsTr" / f"{n}.png")
    d = json.loads((BUSI / "dataset.json").read_text())
    (ds / "dataset.json").write_text(json.dumps({**d, "numTraining": len(names)}))
    ws = tmp_path / "ws"

    plan = api.plan(ds, ws, progress=False)
    assert list(plan.configurations) == ["2d"]
    (cache,) = api.preprocess(ds, ws, workers=1, progress=False)  # default configuration: 2d
    assert cache.name == "data_1x1" and np.load(cache / f"{names[0]}.npy").shape[:2] == (1, 1)
    n_stages = len(plan.configuration("2d").model_kwargs["features"])
    cfg = TrainingConfig(
        epochs=2, iterations_per_epoch=2, val_iterations=1, batch_size=2, device="cpu", num_threads=2, seed=0,
        model_kwargs={"features": [min(4 * 2**i, 32) for i in range(n_stages)]},  # the plan's topology, thin
    )  # fmt: skip
    summary = api.train(ds, ws, fold=0, config=cfg, log=lambda _: None)
    model = ws / "results" / ds.name / "unet__2d"
    assert (model / "model.json").is_file() and summary["num_cases"] >= 1
    assert all(p.suffix == ".png" for p in (model / "fold_0" / "validation").glob(f"{names[0][:4]}*"))

    runner = CliRunner()
    inp, out = tmp_path / "input", tmp_path / "pred"
    inp.mkdir()
    for n in names[:3]:
        shutil.copyfile(ds / "imagesTr" / f"{n}_0000.png", inp / f"{n}_0000.png")
    r = runner.invoke(
        app, ["predict", "-m", str(model), "-i", str(inp), "-o", str(out), "--no-tta", "--device", "cpu", "--overlay"]
    )
    assert r.exit_code == 0, r.output
    for n in names[:3]:
        pred = np.array(Image.open(out / f"{n}.png"))
        ref = np.array(Image.open(ds / "labelsTr" / f"{n}.png"))
        assert pred.shape == ref.shape and set(np.unique(pred)) <= {0, 1}
        assert Image.open(out / f"{n}_overlay.png").size[0] >= 200  # the image itself, not 3 thin slices
    r = runner.invoke(
        app, ["evaluate", "--pred", str(out), "--ref", str(ds / "labelsTr"), "-l", str(ds / "dataset.json")]
    )
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["num_cases"] == 3 and 0.0 <= s["mean"]["lesion"]["dice"] <= 1.0


# ---------------------------------------------------------------------------------------- evaluation


def _png(path: Path, arr) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)
    return path


def test_roi_masked_evaluation_known_numbers(tmp_path):
    from medseg.evaluation.metrics import evaluate_folder

    ref = np.zeros((10, 10), np.uint8)
    ref[2:6, 2:6] = 1  # 16 px
    pred = np.zeros_like(ref)
    pred[3:6, 2:6] = 1  # misses row 2 (4 px) inside the ROI
    pred[7:9, 7:9] = 1  # 4 false-positive px outside it
    roi = np.ones_like(ref)
    roi[7:, 7:] = 0
    _png(tmp_path / "pred" / "c.png", pred)
    _png(tmp_path / "ref" / "c.png", ref)
    _png(tmp_path / "roi" / "c.png", roi)
    labels = {"background": 0, "vessel": 1}
    plain = evaluate_folder(tmp_path / "pred", tmp_path / "ref", labels, file_ending=".png")
    m = plain["per_case"]["c"]["vessel"]
    assert (m["tp"], m["fp"], m["fn"]) == (12, 4, 4) and m["dice"] == pytest.approx(0.75)
    inside = evaluate_folder(
        tmp_path / "pred", tmp_path / "ref", labels, file_ending=".png", roi_masks=tmp_path / "roi"
    )
    m = inside["per_case"]["c"]["vessel"]
    assert (m["tp"], m["fp"], m["fn"]) == (12, 0, 4)
    assert m["dice"] == pytest.approx(24 / 28) and m["iou"] == pytest.approx(12 / 16)
    assert m["hd95"] == pytest.approx(1.0) and m["nsd"] == pytest.approx(1.0)  # 1 px = 1 unit apart
    (tmp_path / "roi" / "c.png").unlink()
    with pytest.raises(DatasetError, match="region-of-interest mask missing"):
        evaluate_folder(tmp_path / "pred", tmp_path / "ref", labels, file_ending=".png", roi_masks=tmp_path / "roi")


def test_surface_of_a_2d_image_is_its_contour():
    from medseg.evaluation.metrics import binary_metrics, surface_distances

    sq = np.zeros((1, 9, 9), bool)
    sq[0, 2:7, 2:7] = True  # 5x5: 16 contour pixels (in 3D all 25 would touch the empty z neighbours)
    d_pr, d_rp = surface_distances(sq, sq, (1.0, 1.0, 1.0))
    assert len(d_pr) == len(d_rp) == 16
    shifted = np.roll(sq, 2, axis=2)
    m = binary_metrics(shifted, sq, (1.0, 1.0, 1.0), nsd_tolerance_mm=1.0)
    assert m["hd95"] == pytest.approx(2.0)


def test_drive_fov_masked_evaluation_matches_numpy(tmp_path):
    """DRIVE, evaluated inside its field of view (fovTs) through `medseg evaluate --roi-masks`: a
    "prediction" that shifts the manual vessels by one pixel and marks everything outside the FOV as
    vessel scores as the shifted vessels alone inside the FOV, and far lower without the masks."""
    from typer.testing import CliRunner

    from medseg.cli import app

    require(DRIVE)
    cases = ["drive_01", "drive_02"]
    for sub in ("labelsTs", "fovTs"):
        (tmp_path / sub).mkdir()
        for c in cases:
            shutil.copyfile(DRIVE / sub / f"{c}.png", tmp_path / sub / f"{c}.png")
    expected = {}
    for c in cases:
        ref = np.array(Image.open(tmp_path / "labelsTs" / f"{c}.png")) == 1
        fov = np.array(Image.open(tmp_path / "fovTs" / f"{c}.png")) > 0
        pred = np.roll(ref, 1, axis=1) | ~fov
        _png(tmp_path / "pred" / f"{c}.png", pred)
        a, b = pred & fov, ref & fov
        expected[c] = 2 * (a & b).sum() / (a.sum() + b.sum())
    runner = CliRunner()
    base = ["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "labelsTs")]
    base += ["-l", str(DRIVE / "dataset.json")]
    r = runner.invoke(app, [*base, "--roi-masks", str(tmp_path / "fovTs"), "-o", str(tmp_path / "fov.json")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "all.json")])
    assert r.exit_code == 0, r.output
    fov, full = (json.loads((tmp_path / f).read_text()) for f in ("fov.json", "all.json"))
    for c in cases:
        m = fov["per_case"][c]["vessel"]
        assert m["dice"] == pytest.approx(expected[c]) and 0.5 < m["dice"] < 0.95
        assert m["hd95"] == pytest.approx(1.0) and full["per_case"][c]["vessel"]["dice"] < 0.4
