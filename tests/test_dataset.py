"""The nnU-Net v2 raw layout, prediction-input grouping and the MSD converter, on real volumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import HIPPO, SHARED_DATA, real_data, require

from medseg.errors import DatasetError
from medseg.io.dataset import cases_from_input, convert_msd, list_cases, load_dataset_json
from medseg.io.image import read_image
from medseg.io.verify import verify_dataset

pytestmark = pytest.mark.realdata

SPINE = SHARED_DATA / "spinalcord_mri"
RADIOMICS = real_data("pyradiomics_testcases")  # tests/fixtures ships breast1 only
PGBM = SHARED_DATA / "tcia_pgbm_hippocrop_dicom"
TS_DICOM = SHARED_DATA / "totalsegmentator_examples" / "dicom" / "example_ct_dicom"

# spine-generic subject unf01: T1w, T2w and T2* share one oblique 131x141x16 grid
UNF01 = {c: SPINE / "imagesTr" / f"spinegeneric_unf01_{c}_0000.nii.gz" for c in ("t1w", "t2w", "t2star")}
UNF01_LABEL = SPINE / "labelsTr" / "spinegeneric_unf01_t1w.nii.gz"
HIPPO_PAIR = ["hippocampus_001", "hippocampus_003"]


def hippo_image(case: str) -> Path:
    return require(HIPPO / "imagesTr" / f"{case}_0000.nii.gz")


def hippo_label(case: str) -> Path:
    return require(HIPPO / "labelsTr" / f"{case}.nii.gz")


def write_dataset_json(root: Path, channels: list[str], labels: dict[str, int], ending: str = ".nii.gz") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": root.name,
                "channel_names": {str(i): c for i, c in enumerate(channels)},
                "labels": labels,
                "numTraining": 0,
                "file_ending": ending,
            }
        )
    )


@pytest.fixture
def two_channel_dataset(tmp_path) -> Path:
    """Real 2-channel dataset: spine-generic T1w + T2w of one subject, and hippocampus with a duplicated channel."""
    for f in (*UNF01.values(), UNF01_LABEL):
        require(f)
    root = tmp_path / "Dataset900_TwoChannel"
    write_dataset_json(root, ["T1w", "T2w"], {"background": 0, "a": 1, "b": 2})
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    shutil.copyfile(UNF01["t1w"], root / "imagesTr" / "unf01_0000.nii.gz")
    shutil.copyfile(UNF01["t2w"], root / "imagesTr" / "unf01_0001.nii.gz")
    shutil.copyfile(UNF01_LABEL, root / "labelsTr" / "unf01.nii.gz")
    for case in HIPPO_PAIR:
        for ch in (0, 1):
            shutil.copyfile(hippo_image(case), root / "imagesTr" / f"{case}_{ch:04d}.nii.gz")
        shutil.copyfile(hippo_label(case), root / "labelsTr" / f"{case}.nii.gz")
    return root


# --------------------------------------------------------------------------------------------
# dataset.json and list_cases


@pytest.mark.parametrize(
    "folder,channels,labels",
    [
        (HIPPO, ("MRI",), {"background": 0, "Anterior": 1, "Posterior": 2}),
        (SPINE, ("MRI",), {"background": 0, "spinal_cord": 1}),
    ],
)
def test_load_dataset_json_of_real_datasets(folder, channels, labels):
    info = load_dataset_json(require(folder))
    assert info.channel_names == channels
    assert info.labels == labels
    assert info.num_classes == max(labels.values()) + 1
    assert info.file_ending == ".nii.gz"


def test_list_cases_real_single_channel_dataset():
    cases = list_cases(require(SPINE))
    assert [c.name for c in cases] == sorted(p.name[: -len("_0000.nii.gz")] for p in (SPINE / "imagesTr").iterdir())
    for c in cases:
        assert c.images == (SPINE / "imagesTr" / f"{c.name}_0000.nii.gz",)
        assert c.label == SPINE / "labelsTr" / f"{c.name}.nii.gz"


def test_list_cases_two_channels(two_channel_dataset):
    root = two_channel_dataset
    info = load_dataset_json(root)
    assert info.num_channels == 2
    cases = list_cases(root, info)
    assert [c.name for c in cases] == [*HIPPO_PAIR, "unf01"]
    for c in cases:
        assert [p.name for p in c.images] == [f"{c.name}_0000.nii.gz", f"{c.name}_0001.nii.gz"]
        assert c.label == root / "labelsTr" / f"{c.name}.nii.gz"
    unf = cases[-1]
    t1, m1 = read_image(unf.images[0])
    t2, m2 = read_image(unf.images[1])
    assert m1 == m2 and not np.array_equal(t1, t2)  # two real contrasts on one grid
    n, problems = verify_dataset(root, workers=1)
    assert (n, problems) == (3, [])


def test_list_cases_missing_channel(two_channel_dataset):
    root = two_channel_dataset
    gone = root / "imagesTr" / "unf01_0001.nii.gz"
    gone.unlink()
    with pytest.raises(DatasetError, match="missing channel") as info:
        list_cases(root)
    assert info.value.path == str(gone)
    lenient = {c.name: c for c in list_cases(root, strict=False)}
    assert len(lenient["unf01"].images) == 1
    _, problems = verify_dataset(root, workers=1)
    assert [(p.path, p.reason) for p in problems] == [(str(gone), "missing channel file")]


def test_list_cases_extra_channel_is_rejected(two_channel_dataset):
    extra = two_channel_dataset / "imagesTr" / "unf01_0002.nii.gz"
    shutil.copyfile(UNF01["t2star"], extra)
    with pytest.raises(DatasetError, match="unexpected channel") as info:
        list_cases(two_channel_dataset)
    assert info.value.path == str(extra)


def test_list_cases_missing_label(two_channel_dataset):
    gone = two_channel_dataset / "labelsTr" / "unf01.nii.gz"
    gone.unlink()
    with pytest.raises(DatasetError, match="missing label") as info:
        list_cases(two_channel_dataset)
    assert info.value.path == str(gone)
    assert {c.name: c.label for c in list_cases(two_channel_dataset, strict=False)}["unf01"] is None


def test_list_cases_file_without_channel_suffix(two_channel_dataset):
    bad = two_channel_dataset / "imagesTr" / "unf01.nii.gz"
    shutil.copyfile(UNF01["t1w"], bad)
    with pytest.raises(DatasetError, match="_XXXX") as info:
        list_cases(two_channel_dataset)
    assert info.value.path == str(bad)


def test_list_cases_test_split_and_other_file_ending(tmp_path):
    """imagesTs has no labels; NRRD datasets use file_ending '.nrrd'."""
    root = tmp_path / "Dataset901_Nrrd"
    write_dataset_json(root, ["MRI"], {"background": 0, "lesion": 1}, ending=".nrrd")
    for split in ("imagesTr", "labelsTr", "imagesTs"):
        (root / split).mkdir()
    for case in ("brain1", "brain2"):
        shutil.copyfile(require(RADIOMICS / f"{case}_image.nrrd"), root / "imagesTr" / f"{case}_0000.nrrd")
        shutil.copyfile(require(RADIOMICS / f"{case}_label.nrrd"), root / "labelsTr" / f"{case}.nrrd")
    shutil.copyfile(require(RADIOMICS / "breast1_image.nrrd"), root / "imagesTs" / "breast1_0000.nrrd")
    (root / "imagesTr" / "notes.txt").write_text("ignored\n")
    assert [c.name for c in list_cases(root)] == ["brain1", "brain2"]
    ts = list_cases(root, split="Ts")
    assert [(c.name, c.label) for c in ts] == [("breast1", None)]
    assert verify_dataset(root, workers=1) == (2, [])


# --------------------------------------------------------------------------------------------
# prediction inputs


def test_cases_from_input_groups_channel_files(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(require(UNF01["t1w"]), folder / "unf01_0000.nii.gz")
    shutil.copyfile(require(UNF01["t2w"]), folder / "unf01_0001.nii.gz")
    shutil.copyfile(hippo_image("hippocampus_001"), folder / "hippo_0001.nii.gz")  # written out of order
    shutil.copyfile(hippo_image("hippocampus_001"), folder / "hippo_0000.nii.gz")
    (folder / ".hidden_0000.nii.gz").write_bytes(b"junk")
    (folder / "readme.txt").write_text("not an image\n")
    cases = cases_from_input(folder, num_channels=2)
    assert [(c.name, [p.name for p in c.images]) for c in cases] == [
        ("hippo", ["hippo_0000.nii.gz", "hippo_0001.nii.gz"]),
        ("unf01", ["unf01_0000.nii.gz", "unf01_0001.nii.gz"]),
    ]
    assert all(c.label is None for c in cases)
    with pytest.raises(DatasetError, match="needs 1"):
        cases_from_input(folder, num_channels=1)


def test_cases_from_input_gap_in_channels_is_rejected(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(require(UNF01["t1w"]), folder / "unf01_0000.nii.gz")
    shutil.copyfile(require(UNF01["t2star"]), folder / "unf01_0002.nii.gz")  # channel 1 missing
    with pytest.raises(DatasetError, match="needs 2"):
        cases_from_input(folder, num_channels=2)


def test_cases_from_input_single_files_without_channel_suffix(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(require(RADIOMICS / "brain1_image.nrrd"), folder / "brain1_image.nrrd")
    shutil.copyfile(hippo_image("hippocampus_001"), folder / "hippocampus_001.nii.gz")
    shutil.copyfile(hippo_image("hippocampus_003"), folder / "hippocampus_003_0000.nii.gz")
    shutil.copyfile(require(UNF01["t2w"]), folder / "scan_2023.nii.gz")  # 4 digits that are not a channel
    cases = cases_from_input(folder)
    assert [(c.name, [p.name for p in c.images]) for c in cases] == [
        ("brain1_image", ["brain1_image.nrrd"]),
        ("hippocampus_001", ["hippocampus_001.nii.gz"]),
        ("hippocampus_003", ["hippocampus_003_0000.nii.gz"]),
        ("scan_2023", ["scan_2023.nii.gz"]),
    ]
    for c in cases:
        assert read_image(c.images[0])[0].ndim == 3


def test_cases_from_input_name_clash_is_rejected(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(hippo_image("hippocampus_001"), folder / "hippo.nii.gz")
    shutil.copyfile(hippo_image("hippocampus_003"), folder / "hippo_0000.nii.gz")
    with pytest.raises(DatasetError, match="clashes"):
        cases_from_input(folder)


def test_cases_from_input_single_file(tmp_path):
    src = require(RADIOMICS / "breast1_image.nrrd")
    assert [(c.name, c.images) for c in cases_from_input(src)] == [("breast1_image", (src,))]
    with pytest.raises(DatasetError, match="2 channels"):
        cases_from_input(src, num_channels=2)
    with pytest.raises(DatasetError, match="not found"):
        cases_from_input(tmp_path / "nope.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        cases_from_input(tmp_path / "empty")


@pytest.mark.parametrize("folder", [PGBM / "Study1_13_HCropVolume", TS_DICOM], ids=["pgbm", "totalseg"])
def test_cases_from_input_dicom_folder_is_one_case(folder):
    cases = cases_from_input(require(folder))
    assert [(c.name, c.images) for c in cases] == [(folder.name, (folder,))]


def test_cases_from_input_folder_of_dicom_series_and_files(tmp_path):
    """A folder holding series sub-folders (and a NIfTI file) gives one case per series and per file."""
    folder = tmp_path / "in"
    for study in ("Study1_13_HCropVolume", "Study3_11_HCropVolume"):
        shutil.copytree(require(PGBM / study), folder / study)
    shutil.copyfile(hippo_image("hippocampus_001"), folder / "hippocampus_001.nii.gz")
    (folder / "not_dicom").mkdir()
    (folder / "not_dicom" / "notes.txt").write_text("x\n")
    cases = cases_from_input(folder)
    assert [c.name for c in cases] == ["hippocampus_001", "Study1_13_HCropVolume", "Study3_11_HCropVolume"]
    assert [read_image(c.images[0])[0].shape[0] for c in cases[1:]] == [32, 40]


# --------------------------------------------------------------------------------------------
# MSD -> nnU-Net v2 converter


def _join_4d(*paths: Path):
    import SimpleITK as sitk

    return sitk.JoinSeries([sitk.ReadImage(str(p)) for p in paths])


@pytest.fixture
def msd_task(tmp_path) -> Path:
    """A tiny MSD task: 4D NIfTI images made by stacking real T1w/T2w/T2* volumes of one subject."""
    import SimpleITK as sitk

    for f in (*UNF01.values(), UNF01_LABEL):
        require(f)
    task = tmp_path / "Task99_Spine"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True)
    sitk.WriteImage(_join_4d(UNF01["t1w"], UNF01["t2w"]), str(task / "imagesTr" / "spine_001.nii.gz"))
    sitk.WriteImage(_join_4d(UNF01["t2star"], UNF01["t2w"]), str(task / "imagesTr" / "spine_002.nii.gz"))
    sitk.WriteImage(_join_4d(UNF01["t1w"], UNF01["t2star"]), str(task / "imagesTs" / "spine_003.nii.gz"))
    shutil.copyfile(UNF01_LABEL, task / "labelsTr" / "spine_001.nii.gz")
    shutil.copyfile(SPINE / "labelsTr" / "spinegeneric_unf01_t2star.nii.gz", task / "labelsTr" / "spine_002.nii.gz")
    (task / "imagesTr" / "._spine_001.nii.gz").write_bytes(b"macOS resource fork junk")  # as in the MSD tarballs
    (task / "dataset.json").write_text(
        json.dumps(
            {
                "name": "Spine",
                "description": "test task",
                "licence": "MIT",
                "tensorImageSize": "4D",
                "modality": {"0": "T1w", "1": "T2w"},
                "labels": {"0": "background", "1": "spinal_cord"},
                "numTraining": 2,
                "numTest": 1,
                "training": [
                    {"image": "./imagesTr/spine_001.nii.gz", "label": "./labelsTr/spine_001.nii.gz"},
                    {"image": "./imagesTr/spine_002.nii.gz", "label": "./labelsTr/spine_002.nii.gz"},
                ],
                "test": ["./imagesTs/spine_003.nii.gz"],
            }
        )
    )
    return task


def test_convert_msd_splits_4d_images(msd_task, tmp_path):
    out = convert_msd(msd_task, tmp_path / "Dataset099_Spine")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "dataset.json",
        "imagesTr/spine_001_0000.nii.gz",
        "imagesTr/spine_001_0001.nii.gz",
        "imagesTr/spine_002_0000.nii.gz",
        "imagesTr/spine_002_0001.nii.gz",
        "imagesTs/spine_003_0000.nii.gz",
        "imagesTs/spine_003_0001.nii.gz",
        "labelsTr/spine_001.nii.gz",
        "labelsTr/spine_002.nii.gz",
    ]
    expected = {
        "imagesTr/spine_001": ("t1w", "t2w"),
        "imagesTr/spine_002": ("t2star", "t2w"),
        "imagesTs/spine_003": ("t1w", "t2star"),
    }
    for stem, contrasts in expected.items():
        for ch, contrast in enumerate(contrasts):
            got, got_meta = read_image(out / f"{stem}_{ch:04d}.nii.gz")
            ref, ref_meta = read_image(UNF01[contrast])
            assert got.dtype == ref.dtype
            np.testing.assert_array_equal(got, ref)  # identical voxels, channel order kept
            assert got_meta.shape == ref_meta.shape
            np.testing.assert_allclose(got_meta.spacing, ref_meta.spacing, rtol=1e-6)
            np.testing.assert_allclose(got_meta.origin, ref_meta.origin, atol=1e-4)
            np.testing.assert_allclose(got_meta.direction, ref_meta.direction, atol=1e-6)  # oblique kept
    assert (out / "labelsTr" / "spine_001.nii.gz").read_bytes() == UNF01_LABEL.read_bytes()

    d = json.loads((out / "dataset.json").read_text())
    assert d["channel_names"] == {"0": "T1w", "1": "T2w"}
    assert d["labels"] == {"background": 0, "spinal_cord": 1}
    assert d["file_ending"] == ".nii.gz"
    assert d["numTraining"] == 2
    assert d["licence"] == "MIT"
    assert not {"modality", "training", "test"} & set(d)
    info = load_dataset_json(out)
    assert info.num_channels == 2 and info.labels == {"background": 0, "spinal_cord": 1}
    assert [c.name for c in list_cases(out)] == ["spine_001", "spine_002"]
    assert [c.name for c in list_cases(out, split="Ts")] == ["spine_003"]


def test_convert_msd_cli_then_verify_passes(msd_task, tmp_path):
    from typer.testing import CliRunner

    from medseg.cli import app

    out = tmp_path / "Dataset099_Spine"
    runner = CliRunner()
    res = runner.invoke(app, ["convert-msd", str(msd_task), str(out)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    assert "2 cases OK" in res.output


def test_convert_msd_3d_task(tmp_path):
    """Single-modality MSD tasks (3D NIfTI) are copied; an uncompressed .nii is re-encoded as .nii.gz."""
    import SimpleITK as sitk

    task = tmp_path / "Task04_Hippocampus"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True)
    for case in HIPPO_PAIR:
        shutil.copyfile(hippo_image(case), task / "imagesTr" / f"{case}.nii.gz")
        shutil.copyfile(hippo_label(case), task / "labelsTr" / f"{case}.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(hippo_image("hippocampus_004"))), str(task / "imagesTs" / "hippocampus_004.nii"))
    (task / "dataset.json").write_text(
        json.dumps(
            {
                "name": "Hippocampus",
                "modality": {"0": "MRI"},
                "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
                "training": [
                    {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in HIPPO_PAIR
                ],
                "test": ["./imagesTs/hippocampus_004.nii"],
            }
        )
    )
    out = convert_msd(task, tmp_path / "Dataset004_Hippocampus")
    for case in HIPPO_PAIR:
        assert (out / "imagesTr" / f"{case}_0000.nii.gz").read_bytes() == hippo_image(case).read_bytes()
    test_img = out / "imagesTs" / "hippocampus_004_0000.nii.gz"
    assert test_img.read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(read_image(test_img)[0], read_image(hippo_image("hippocampus_004"))[0])
    assert json.loads((out / "dataset.json").read_text())["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert verify_dataset(out, workers=1) == (2, [])


def test_convert_msd_rejects_modality_mismatch(msd_task, tmp_path):
    d = json.loads((msd_task / "dataset.json").read_text())
    d["modality"] = {"0": "T1w", "1": "T2w", "2": "FLAIR"}
    (msd_task / "dataset.json").write_text(json.dumps(d))
    with pytest.raises(DatasetError, match="2 channel.*lists 3") as info:
        convert_msd(msd_task, tmp_path / "out")
    assert info.value.path == str(msd_task / "imagesTr" / "spine_001.nii.gz")


def test_convert_msd_rejects_missing_listed_file(msd_task, tmp_path):
    (msd_task / "labelsTr" / "spine_002.nii.gz").unlink()
    with pytest.raises(DatasetError, match="not found") as info:
        convert_msd(msd_task, tmp_path / "out")
    assert info.value.path == str(msd_task / "labelsTr" / "spine_002.nii.gz")


@pytest.mark.parametrize("text,reason", [("{not json", "invalid JSON"), ('{"modality": {"0": "CT"}}', "labels")])
def test_convert_msd_rejects_bad_dataset_json(text, reason, tmp_path):
    task = tmp_path / "Task01_Bad"
    task.mkdir()
    (task / "dataset.json").write_text(text)
    with pytest.raises(DatasetError, match=reason):
        convert_msd(task, tmp_path / "out")
    with pytest.raises(DatasetError, match="not found"):
        convert_msd(tmp_path / "missing_task", tmp_path / "out")


@pytest.mark.parametrize("text,reason", [("{broken", "dataset.json is not valid JSON"), ("[]", "not a JSON object")])
def test_unreadable_dataset_json_is_one_line_naming_the_file(tmp_path, text, reason):
    from medseg.errors import DatasetError

    (tmp_path / "dataset.json").write_text(text)
    with pytest.raises(DatasetError, match=reason) as exc:
        load_dataset_json(tmp_path)
    assert exc.value.path == str(tmp_path / "dataset.json") and "\n" not in exc.value.one_line()
