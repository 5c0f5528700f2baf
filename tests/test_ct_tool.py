"""`medseg ct` end to end on the real CTs of ../shared/data/totalsegmentator_examples (NIfTI, DICOM
folder, zip) with an imported nnU-Net-format model: named masks, statistics, previews, DICOM-SEG, ROI
subset through the fast variant.

The model is tests/fixtures/nnunet_v2_ct_tiny (made by scripts/make_ct_fixture_model.py): two tiny
nnU-Net v2 models for 12 TotalSegmentator structures, trained with nnunetv2 itself on these two CTs,
imported here with `medseg import-nnunet` exactly as a user imports TotalSegmentator's weights. It
checks the tool and the geometry (a flipped or shifted result loses the liver), not anatomy-level
accuracy."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, require

from medseg.io.image import read_image

NNUNET = Path(__file__).parent / "fixtures" / "nnunet_v2_ct_tiny"
RESULTS = NNUNET / "Dataset906_CTFixture12"
TRAINER = "nnUNetTrainer_MedsegCTFixture"
TS = SHARED_DATA / "totalsegmentator_examples"
CT = TS / "ct_total" / "imagesTr" / "ts_ct_example_0000.nii.gz"
CT_LABELS = TS / "ct_total" / "labelsTr" / "ts_ct_example.nii.gz"
SERIES = TS / "dicom" / "example_ct_dicom"
CT_NIFTIS = [
    TS / "ct_total" / "imagesTr" / "ts_ct_dicomseries_0000.nii.gz",
    TS / "ct_aorta" / "imagesTr" / "ts_ct_aorta_crop_0000.nii.gz",
    TS / "ct_pulmonary_artery" / "imagesTr" / "ts_ct_pulmonary_crop_0000.nii.gz",
]
MEDSEG = [sys.executable, "-m", "medseg"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The nnU-Net results folders imported as MODEL and MODEL/fast, through the CLI."""
    out = tmp_path_factory.mktemp("ct_model") / "model"
    for src, dst in (
        (f"{TRAINER}__nnUNetPlans__3d_fullres", out),
        (f"{TRAINER}__nnUNetPlansFast__3d_fullres", out / "fast"),
    ):
        r = subprocess.run(
            MEDSEG + ["import-nnunet", "-i", str(RESULTS / src), "-o", str(dst)], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def run(model):
    def _run(*args):
        cmd = MEDSEG + ["ct", "-m", str(model), "--no-tta"] + [str(a) for a in args]
        return subprocess.run(cmd, capture_output=True, text=True)

    return _run


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_per_structure_masks_statistics_and_preview(run, tmp_path):
    require(CT)
    r = run("-i", CT, "-o", tmp_path / "out", "--statistics", "--preview")
    assert r.returncode == 0, r.stderr
    files = {p.name for p in (tmp_path / "out").glob("*.nii.gz")}
    assert len(files) == 12 and {"liver.nii.gz", "spleen.nii.gz", "aorta.nii.gz"} <= files
    liver = read_image(tmp_path / "out" / "liver.nii.gz")[0]
    ref = read_image(CT_LABELS)[0]
    assert liver.shape == ref.shape and set(np.unique(liver)) <= {0, 1}
    assert dice(liver > 0, ref == 5) > 0.7  # the fixture saw this CT: the tool must put it back in place
    stats = json.loads((tmp_path / "out" / "statistics.json").read_text())["structures"]
    assert stats["liver"]["volume_ml"] > 500 and 0 < stats["liver"]["hu_mean"] < 200
    assert (tmp_path / "out" / "statistics.csv").exists()
    assert (tmp_path / "out" / "preview.png").stat().st_size > 10_000
    assert "liver" in r.stdout and "structures found" in r.stdout


def test_side_outputs_are_named_after_the_output_and_nothing_is_overwritten(run, tmp_path):
    """-o seg.nii.gz: seg_statistics.json/.csv and seg_preview.png beside it, never the fixed names
    statistics.json/preview.png (which may be someone else's); a second run refuses, --overwrite redoes."""
    require(CT)
    out = tmp_path / "results"
    out.mkdir()
    theirs = {n: out / n for n in ("statistics.json", "statistics.csv", "preview.png")}
    for p in theirs.values():
        p.write_text("not medseg's")
    args = ("-i", CT, "-o", out / "seg.nii.gz", "--multilabel", "--statistics", "--preview")
    r = run(*args)
    assert r.returncode == 0, r.stderr
    mine = [out / n for n in ("seg.nii.gz", "seg_statistics.json", "seg_statistics.csv", "seg_preview.png")]
    assert all(p.is_file() for p in mine)
    assert all(p.read_text() == "not medseg's" for p in theirs.values())
    stamps = [p.stat().st_mtime_ns for p in mine]
    again = run(*args)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    assert "seg.nii.gz: already exists" in again.stderr and "--overwrite" in again.stderr
    assert [p.stat().st_mtime_ns for p in mine] == stamps
    assert run(*args, "--overwrite").returncode == 0


def test_a_class_map_that_does_not_fit_the_model_is_refused(run, tmp_path):
    """TotalSegmentator's 117-name map on the 12-class fixture model used to write 117 wrongly named
    masks; now it is one line, exit 2, nothing written (the model's own labels are the default)."""
    require(CT)
    r = run("-i", CT, "-o", tmp_path / "out", "--class-map", "total")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "class map names 117 structures (values 1-117) but the model" in r.stderr and "has 12" in r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_dicom_folder_multilabel_and_dicom_seg_round_trip(run, tmp_path):
    require(SERIES)
    pytest.importorskip("highdicom")
    from medseg.io.dicom_seg import read_dicom_seg

    r = run(
        "-i",
        SERIES,
        "-o",
        tmp_path / "out",
        "--multilabel",
        "--dicom-seg",
        "--statistics",
        "--stats-format",
        "totalsegmentator",
    )
    assert r.returncode == 0, r.stderr
    seg = read_image(tmp_path / "out" / "segmentation.nii.gz")[0]
    assert seg.shape == (20, 512, 512) and seg.max() > 0
    back, labels = read_dicom_seg(tmp_path / "out" / "segmentation.dcm", SERIES)
    assert np.array_equal(back, seg) and labels["liver"] == 5
    ts_stats = json.loads((tmp_path / "out" / "statistics.json").read_text())
    assert len(ts_stats) == 12 and set(ts_stats["liver"]) == {"volume", "intensity"}


def test_zip_input_gives_the_same_result_as_the_folder(run, tmp_path):
    require(SERIES)
    z = tmp_path / "ct.zip"
    with zipfile.ZipFile(z, "w") as archive:
        for f in SERIES.iterdir():
            archive.write(f, f"series/{f.name}")
    a = run("-i", z, "-o", tmp_path / "a.nii.gz", "--multilabel")
    b = run("-i", SERIES, "-o", tmp_path / "b.nii.gz", "--multilabel")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert np.array_equal(read_image(tmp_path / "a.nii.gz")[0], read_image(tmp_path / "b.nii.gz")[0])


def test_roi_subset_uses_the_fast_model_to_crop(run, tmp_path):
    require(CT)
    r = run("-i", CT, "-o", tmp_path / "roi", "--roi-subset", "liver", "--roi-subset", "spleen")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "roi").glob("*.nii.gz")) == ["liver.nii.gz", "spleen.nii.gz"]
    full = run("-i", CT, "-o", tmp_path / "full.nii.gz", "--multilabel")
    assert full.returncode == 0, full.stderr
    ref_liver = read_image(tmp_path / "full.nii.gz")[0] == 5
    assert dice(read_image(tmp_path / "roi" / "liver.nii.gz")[0] > 0, ref_liver) > 0.9


def test_fast_variant_runs(run, tmp_path):
    require(CT)
    r = run("-i", CT, "-o", tmp_path / "fast.nii.gz", "--multilabel", "--fast")
    assert r.returncode == 0, r.stderr
    assert "fast model" in r.stdout and read_image(tmp_path / "fast.nii.gz")[0].max() > 0


def test_unknown_structure_is_a_one_line_error_with_a_suggestion(run, tmp_path):
    r = run("-i", CT, "-o", tmp_path / "x", "--roi-subset", "livr")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert "'livr'" in r.stderr and "liver" in r.stderr
    assert not (tmp_path / "x").exists()


def test_mr_input_warns(run, tmp_path):
    mr = TS / "mr_total" / "imagesTr" / "ts_mr_example_0000.nii.gz"
    require(mr)
    r = run("-i", mr, "-o", tmp_path / "mr.nii.gz", "--multilabel")
    assert r.returncode == 0, r.stderr
    assert "does not look like a CT" in r.stderr


def test_imported_model_agrees_with_nnunet_predict_on_ct(model):
    """medseg's prediction with the imported model vs nnUNetv2_predict's own output on both CTs."""
    require(CT)
    from medseg.inference.predictor import Predictor

    # fp32: this checks the import's numerics; the barely trained fixture's logits are so close between
    # classes that bf16 rounding (medseg's default on CPUs with native bf16) moves whole small structures;
    # contiguous: nnU-Net's layout (channels-last fp32 rounds differently enough to move them too)
    predictor = Predictor.from_folder(model, device="cpu", amp=False, layout="contiguous")
    for case in ("ts_ct_example", "ts_ct_dicomseries"):
        image, meta = read_image(TS / "ct_total" / "imagesTr" / f"{case}_0000.nii.gz")
        ours = predictor.predict_array(image[None].astype(np.float32), meta)[0]
        theirs = read_image(NNUNET / "nnunet_predictions" / f"{case}.nii.gz")[0]
        assert ours.shape == theirs.shape
        for label in np.unique(theirs)[1:]:
            if (theirs == label).sum() >= 100:  # tiny specks: a few boundary voxels swing Dice
                assert dice(ours == label, theirs == label) >= 0.99, (case, int(label))


@pytest.mark.parametrize("image", CT_NIFTIS, ids=lambda p: p.name.split("_0000")[0])
def test_every_example_ct_gives_named_masks_statistics_and_preview(run, image, tmp_path):
    require(image)
    r = run("-i", image, "-o", tmp_path / "out", "--statistics", "--preview")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 12
    stats = json.loads((tmp_path / "out" / "statistics.json").read_text())["structures"]
    assert set(stats) >= {"liver", "aorta"} and (tmp_path / "out" / "preview.png").stat().st_size > 10_000
