"""Out-of-distribution input (medseg.planning.ood): predict compares each case with the model's
training range (model.json ``training_data``) and warns, one line per case, when it is far outside;
cases like the training data, and model folders without a training range, give no warning."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SHARED_DATA, require
from scipy import ndimage

from medseg.io.image import ImageMeta, read_image, read_image_channels, write_image
from medseg.planning.ood import case_summary, ood_reasons, training_range

EXAMPLES = REPO / "examples" / "hippocampus" / "images"  # fold-0 validation cases of the bundled model


def _meta(spacing=(1.0, 1.0, 1.0), direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)) -> ImageMeta:
    return ImageMeta(tuple(spacing), direction=tuple(direction))


def _training(n=4, shape=(30, 40, 30), value=100.0) -> dict:
    rng = np.random.default_rng(0)
    cases = [rng.normal(value, 10, (1, *shape)).astype(np.float32) for _ in range(n)]
    return training_range([case_summary(c, _meta()) for c in cases])


def test_training_range_and_reasons_on_small_arrays():
    training = _training()
    assert training["num_cases"] == 4 and training["orientations"] == ["LPS"]  # ITK's identity direction
    assert training["spacing_mm"] == {"min": [1.0, 1.0, 1.0], "max": [1.0, 1.0, 1.0]}
    like = np.full((1, 32, 36, 28), 100.0, np.float32)
    assert ood_reasons(case_summary(like, _meta()), training, ["zscore"], "RAS") == []
    # slices 2.9 mm thick: within the generous 3x; 6.5 mm: not
    assert ood_reasons(case_summary(like, _meta((2.9, 1.0, 1.0))), training, ["zscore"], "RAS") == []
    thick = like[..., :5]  # 5 slices of 6.5 mm: the same 32 mm extent
    (reason,) = ood_reasons(case_summary(thick, _meta((1.0, 1.0, 6.5))), training, ["zscore"], "RAS")
    assert reason.startswith("spacing 6.5 mm on axis ")
    # the non-zero region decides the extent: a wide field of view, or a tiny crop
    wide = np.zeros((1, 30, 40, 200), np.float32)
    wide[:, :, :, :130] = 100.0
    (reason,) = ood_reasons(case_summary(wide, _meta()), training, ["zscore"], "RAS")
    assert reason.startswith("extent 130 mm")
    tiny = np.zeros((1, 30, 40, 30), np.float32)
    tiny[:, 10:15, 10:15, 10:15] = 100.0
    assert ood_reasons(case_summary(tiny, _meta()), training, ["zscore"], "RAS")[0].startswith("extent 5 mm")


def test_intensity_is_compared_only_on_an_absolute_scale_and_orientation_only_without_a_canonical_one():
    training = _training(value=100.0)  # training intensities about 70..130
    scaled = np.full((1, 30, 40, 30), 4000.0, np.float32)
    summary = case_summary(scaled, _meta())
    assert ood_reasons(summary, training, ["zscore"], "RAS") == []  # per-case z-score: raw scale arbitrary
    (reason,) = ood_reasons(summary, training, ["ct"], "RAS")
    assert reason.startswith("channel 0 intensities 4000 to 4000")
    ras = case_summary(np.full((1, 30, 40, 30), 100.0, np.float32), _meta(direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)))
    assert ood_reasons(ras, training, ["zscore"], "RAS") == []  # reoriented to the plan's RAS anyway
    assert ood_reasons(ras, training, ["zscore"], None) == ["orientation RAS (training LPS)"]


# --------------------------------------------------------------------------------------------
# the bundled hippocampus model on real cases made out of distribution


def _thick_slices(src: Path, dst: Path, mm: float = 6.5) -> None:
    """A real case resampled to ``mm`` slices along its last array axis (as a 2D-acquired MRI)."""
    arr, meta = read_image(src)
    thick = ndimage.zoom(arr.astype(np.float32), (1.0, 1.0, meta.spacing[2] / mm), order=1)
    write_image(thick, ImageMeta((meta.spacing[0], meta.spacing[1], mm), meta.origin, meta.direction), dst)


def _wide_field_of_view(src: Path, dst: Path, factor: int = 6) -> None:
    """A real case mirrored out to ``factor`` times its extent along one axis (a whole-head field of view)."""
    arr, meta = read_image(src)
    n = arr.shape[2]
    wide = np.pad(arr, ((0, 0), (0, 0), (0, (factor - 1) * n)), mode="symmetric")
    write_image(wide, meta, dst)


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ood")
    inp = root / "in"
    inp.mkdir()
    normal = sorted(EXAMPLES.glob("*.nii.gz"))[:2]
    for f in normal:
        shutil.copyfile(f, inp / f.name)
    _thick_slices(normal[0], inp / "thick.nii.gz")
    _wide_field_of_view(normal[1], inp / "wide.nii.gz")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MEDSEG_WORKSPACE": str(root / "ws")}
    cmd = [sys.executable, "-m", "medseg.cli", "predict", "-m", "hippocampus", "-i", str(inp), "-o", str(root / "out")]
    res = subprocess.run([*cmd, "--no-tta", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=600)
    return root, normal, res


def test_predict_warns_once_per_case_far_outside_the_training_data(predicted):
    root, normal, res = predicted
    assert res.returncode == 0, res.stderr  # a warning, not a refusal: every case is still predicted
    for name in [f.name for f in normal] + ["thick.nii.gz", "wide.nii.gz"]:
        assert (root / "out" / name).is_file()
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("medseg: warning:")]
    assert len(warnings) == 2, res.stderr
    thick, wide = sorted(warnings)
    assert str(root / "in" / "thick.nii.gz") in thick and "spacing 6.5 mm on axis" in thick
    assert str(root / "in" / "wide.nii.gz") in wide and "extent" in wide
    assert all("far outside the model's training data" in w for w in warnings)
    assert not any(f.name in res.stderr for f in normal), "normal cases must not warn"
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    flagged = {c["case"] for c in manifest["cases"] if c.get("ood")}
    assert flagged == {"thick", "wide"}


def test_real_validation_cases_pass_and_a_model_without_training_data_skips_the_check(tmp_path):
    from medseg.inference.predictor import Predictor
    from medseg.io.checkpoint import resolve_model

    predictor = Predictor.from_folder("hippocampus", device="cpu")
    assert predictor.spec.training_data["num_cases"] == 208
    for f in sorted(EXAMPLES.glob("*.nii.gz")):
        assert predictor.ood_reasons(*read_image_channels(f)) == [], f
    wide = tmp_path / "wide.nii.gz"
    _wide_field_of_view(next(EXAMPLES.glob("*.nii.gz")), wide)
    assert predictor.ood_reasons(*read_image_channels(wide))
    old = Path(shutil.copytree(resolve_model("hippocampus"), tmp_path / "old_model"))
    spec = json.loads((old / "model.json").read_text())
    del spec["training_data"]  # a model folder from before the training range was recorded
    (old / "model.json").write_text(json.dumps(spec))
    assert Predictor.from_folder(old, device="cpu").ood_reasons(*read_image_channels(wide)) == []


def test_the_whole_brain_mri_of_the_issue_is_flagged():
    """Issue 17: pyradiomics' brain1 (whole-brain MRI, 0.78 x 0.78 x 6.5 mm) through the hippocampus
    model gave 32 + 44 mL of "hippocampus" without a word; its 6.5 mm slices and its extent are flagged."""
    from medseg.inference.predictor import Predictor

    image = require(SHARED_DATA / "pyradiomics_testcases" / "brain1_image.nrrd")
    reasons = Predictor.from_folder("hippocampus", device="cpu").ood_reasons(*read_image_channels(image))
    assert any(r.startswith("spacing 6.5 mm") for r in reasons), reasons
    assert any(r.startswith("extent") for r in reasons), reasons
