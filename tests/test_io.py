"""Image I/O on real files: NIfTI, NRRD, MetaImage and DICOM series.

Every check compares medseg's (z, y, x) arrays and geometry with an independent reader
(SimpleITK directly, nibabel, pydicom), so an axis or spacing swap cannot hide.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import HIPPO, SHARED_DATA, real_data, require

from medseg.errors import ImageReadError, OutputError
from medseg.io.image import ImageMeta, label_dtype, read_image, write_image

pytestmark = pytest.mark.realdata

SPINE = SHARED_DATA / "spinalcord_mri"
RADIOMICS = real_data("pyradiomics_testcases")  # tests/fixtures ships breast1 only
PGBM = SHARED_DATA / "tcia_pgbm_hippocrop_dicom"
TS_DICOM = SHARED_DATA / "totalsegmentator_examples" / "dicom" / "example_ct_dicom"

HIPPO_IMG = HIPPO / "imagesTr" / "hippocampus_001_0000.nii.gz"
OBLIQUE_IMG = SPINE / "imagesTr" / "spinegeneric_unf01_t2w_0000.nii.gz"  # float32, oblique direction
ROTATED_IMG = SPINE / "imagesTr" / "sct_errsm30_t2_0000.nii.gz"  # axes permuted (P-S-R)

# mask voxel counts stated in pyradiomics_testcases/SOURCE.md
RADIOMICS_CASES = {"brain1": ((25, 256, 256), 4137), "brain2": ((23, 256, 256), 453), "breast1": ((21, 120, 45), 143)}
# slice counts stated in the SOURCE.md files
DICOM_SERIES = {
    "Study1_13_HCropVolume": 32,
    "Study2_14_HCropVolume": 35,
    "Study3_11_HCropVolume": 40,
    "example_ct_dicom": 20,
}


def dicom_dir(name: str) -> Path:
    return require(TS_DICOM if name == "example_ct_dicom" else PGBM / name)


def assert_meta_close(a: ImageMeta, b: ImageMeta) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=1e-6)
    np.testing.assert_allclose(a.origin, b.origin, atol=1e-4)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-6)


def sitk_geometry(img) -> tuple:
    """(shape, spacing, origin, direction) straight from SimpleITK, converted to medseg's (z, y, x) order."""
    return (
        tuple(reversed(img.GetSize())),
        tuple(reversed(img.GetSpacing())),
        tuple(reversed(img.GetOrigin())),
        tuple(img.GetDirection()),
    )


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------
# NIfTI


@pytest.mark.parametrize("src", [HIPPO_IMG, OBLIQUE_IMG, ROTATED_IMG], ids=["hippo", "oblique", "rotated"])
def test_nifti_round_trip_keeps_array_and_geometry(src, tmp_path):
    arr, meta = read_image(require(src))
    out = write_image(arr, meta, tmp_path / "copy.nii.gz")
    back, meta2 = read_image(out)
    assert back.dtype == arr.dtype
    np.testing.assert_array_equal(back, arr)
    assert_meta_close(meta2, meta)
    assert files_in(tmp_path) == ["copy.nii.gz"]
    assert out.read_bytes()[:2] == b"\x1f\x8b"  # really gzip-compressed


@pytest.mark.parametrize("src", [HIPPO_IMG, ROTATED_IMG], ids=["hippo", "rotated"])
def test_nifti_axes_and_spacing_match_nibabel(src):
    """medseg arrays are (z, y, x) with spacing in the same order; nibabel gives (x, y, z)."""
    nib = pytest.importorskip("nibabel")
    arr, meta = read_image(require(src))
    ref = nib.load(str(src))
    np.testing.assert_array_equal(arr, np.asarray(ref.dataobj).transpose(2, 1, 0))
    np.testing.assert_allclose(meta.spacing, tuple(reversed(ref.header.get_zooms()[:3])), rtol=1e-6)
    assert meta.shape == tuple(reversed(ref.shape))
    # world position of voxel (x, y, z) = (0, 0, 0): nibabel's affine is RAS, ITK's origin LPS
    ras_origin = ref.affine[:3, 3]
    np.testing.assert_allclose(tuple(reversed(meta.origin)), ras_origin * [-1, -1, 1], atol=1e-3)


def test_nifti_geometry_matches_simpleitk_for_anisotropic_file(tmp_path):
    """A synthetic anisotropic grid makes any z/x swap visible (real files here are mostly isotropic)."""
    arr, meta = read_image(require(HIPPO_IMG))
    aniso = ImageMeta(spacing=(3.0, 0.8, 0.5), origin=(-10.0, 20.0, 30.0), direction=meta.direction, shape=arr.shape)
    out = write_image(arr, aniso, tmp_path / "aniso.nii.gz")
    import SimpleITK as sitk

    img = sitk.ReadImage(str(out))
    assert img.GetSize() == tuple(reversed(arr.shape))  # x first in ITK
    np.testing.assert_allclose(img.GetSpacing(), (0.5, 0.8, 3.0))
    np.testing.assert_allclose(img.GetOrigin(), (30.0, 20.0, -10.0), atol=1e-5)
    assert_meta_close(read_image(out)[1], aniso)


def test_write_image_bool_and_float16_are_stored(tmp_path):
    arr, meta = read_image(require(HIPPO_IMG))
    mask = arr > np.median(arr)
    back, _ = read_image(write_image(mask, meta, tmp_path / "mask.nii.gz"))
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, mask.astype(np.uint8))
    half = (arr / 255).astype(np.float16)
    back, _ = read_image(write_image(half, meta, tmp_path / "prob.nii.gz"))
    np.testing.assert_array_equal(back, half.astype(np.float32))


# --------------------------------------------------------------------------------------------
# atomic writes


@pytest.mark.parametrize("name", ["x.nii.gz", "x.nii", "x.nrrd", "x.nhdr", "x.mha", "x.mhd"])
def test_write_image_leaves_no_temp_files(name, tmp_path):
    arr, meta = read_image(require(HIPPO_IMG))
    write_image(arr, meta, tmp_path / name)
    write_image(arr, meta, tmp_path / name)  # overwrite too
    left = files_in(tmp_path)
    assert name in left
    assert not [f for f in left if f.startswith(".")], left
    back, meta2 = read_image(tmp_path / name)
    np.testing.assert_array_equal(back, arr)
    assert_meta_close(meta2, meta)


def _failing_writer(real_write):
    """A SimpleITK.WriteImage that writes half a file, then dies (disk full, killed writer ...)."""

    def write(image, path, *args, **kwargs):
        real_write(image, path, *args, **kwargs)
        p = Path(path)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        raise RuntimeError("simulated failure during write")

    return write


def test_failed_write_leaves_no_final_file(tmp_path, monkeypatch):
    import SimpleITK as sitk

    arr, meta = read_image(require(HIPPO_IMG))
    monkeypatch.setattr(sitk, "WriteImage", _failing_writer(sitk.WriteImage))
    target = tmp_path / "seg.nii.gz"
    with pytest.raises(OutputError, match="simulated failure") as info:
        write_image(arr, meta, target)
    assert info.value.path == str(target)
    assert not target.exists()
    assert files_in(tmp_path) == []


def test_failed_overwrite_keeps_previous_file_intact(tmp_path, monkeypatch):
    import SimpleITK as sitk

    arr, meta = read_image(require(HIPPO_IMG))
    target = write_image(arr, meta, tmp_path / "seg.nii.gz")
    before = target.read_bytes()
    monkeypatch.setattr(sitk, "WriteImage", _failing_writer(sitk.WriteImage))
    with pytest.raises(OutputError):
        write_image(np.zeros_like(arr), meta, target)
    assert target.read_bytes() == before
    assert files_in(tmp_path) == ["seg.nii.gz"]


def test_interrupted_write_cleans_up(tmp_path, monkeypatch):
    import SimpleITK as sitk

    def interrupted(image, path, *args, **kwargs):
        Path(path).write_bytes(b"\x1f\x8b partial")
        raise KeyboardInterrupt

    arr, meta = read_image(require(HIPPO_IMG))
    monkeypatch.setattr(sitk, "WriteImage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_image(arr, meta, tmp_path / "seg.nii.gz")
    assert files_in(tmp_path) == []


def test_unknown_format_is_an_output_error(tmp_path):
    """A real SimpleITK failure (no writer for the extension), no monkeypatching."""
    arr, meta = read_image(require(HIPPO_IMG))
    with pytest.raises(OutputError, match="cannot write image"):
        write_image(arr, meta, tmp_path / "seg.unknownformat")
    assert files_in(tmp_path) == []


def test_write_image_refuses_non_3d_arrays(tmp_path):
    """A (c, z, y, x) array would silently become a vector image in SimpleITK: refuse it."""
    arr, meta = read_image(require(HIPPO_IMG))
    with pytest.raises(OutputError, match="expected a 3D"):
        write_image(np.stack([arr, arr, arr, arr]), meta, tmp_path / "bad.nii.gz")
    with pytest.raises(OutputError, match="expected a 3D"):
        write_image(arr[0], meta, tmp_path / "bad.nii.gz")
    assert files_in(tmp_path) == []


# --------------------------------------------------------------------------------------------
# NRRD


@pytest.mark.parametrize("case", sorted(RADIOMICS_CASES))
def test_nrrd_image_and_mask_match_simpleitk(case):
    import SimpleITK as sitk

    shape, mask_voxels = RADIOMICS_CASES[case]
    img_path, lab_path = require(RADIOMICS / f"{case}_image.nrrd"), require(RADIOMICS / f"{case}_label.nrrd")
    for path in (img_path, lab_path):
        arr, meta = read_image(path)
        ref = sitk.ReadImage(str(path))
        ref_shape, spacing, origin, direction = sitk_geometry(ref)
        assert arr.shape == meta.shape == ref_shape == shape
        np.testing.assert_allclose(meta.spacing, spacing, rtol=1e-9)
        np.testing.assert_allclose(meta.origin, origin, atol=1e-9)
        np.testing.assert_allclose(meta.direction, direction, atol=1e-9)
        np.testing.assert_array_equal(arr, sitk.GetArrayFromImage(ref))
    image, image_meta = read_image(img_path)
    mask, mask_meta = read_image(lab_path)
    assert image.dtype == np.int16
    assert set(np.unique(mask).tolist()) == {0, 1}
    assert int(mask.sum()) == mask_voxels
    assert image_meta == mask_meta
    assert image_meta.spacing[0] > 2 * image_meta.spacing[2]  # thick slices come first: (z, y, x)


@pytest.mark.parametrize("name", ["copy.nrrd", "copy.nhdr"])
def test_nrrd_write_read_back(name, tmp_path):
    arr, meta = read_image(require(RADIOMICS / "brain1_image.nrrd"))
    back, meta2 = read_image(write_image(arr, meta, tmp_path / name))
    np.testing.assert_array_equal(back, arr)
    assert back.dtype == arr.dtype
    assert_meta_close(meta2, meta)


# --------------------------------------------------------------------------------------------
# MetaImage


@pytest.mark.parametrize("compress", [True, False])
def test_mha_write_read_back(compress, tmp_path):
    arr, meta = read_image(require(RADIOMICS / "breast1_image.nrrd"))
    out = write_image(arr, meta, tmp_path / "breast.mha", compress=compress)
    assert files_in(tmp_path) == ["breast.mha"]
    back, meta2 = read_image(out)
    np.testing.assert_array_equal(back, arr)
    assert_meta_close(meta2, meta)


@pytest.mark.parametrize("compress,data_file", [(True, "breast.zraw"), (False, "breast.raw")])
def test_mhd_header_names_its_final_data_file(compress, data_file, tmp_path):
    """A detached header must point at the data file's final name, not at a temp name."""
    arr, meta = read_image(require(RADIOMICS / "breast1_image.nrrd"))
    out = write_image(arr, meta, tmp_path / "breast.mhd", compress=compress)
    assert files_in(tmp_path) == sorted(["breast.mhd", data_file])
    header = dict(line.split(" = ", 1) for line in out.read_text().splitlines())
    assert header["ElementDataFile"] == data_file
    back, meta2 = read_image(out)
    np.testing.assert_array_equal(back, arr)
    assert_meta_close(meta2, meta)
    # moving the pair elsewhere keeps it readable (no absolute or temp paths inside)
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in ("breast.mhd", data_file):
        shutil.move(tmp_path / f, moved / f)
    np.testing.assert_array_equal(read_image(moved / "breast.mhd")[0], arr)


def test_nhdr_header_names_its_final_data_file(tmp_path):
    arr, meta = read_image(require(RADIOMICS / "breast1_image.nrrd"))
    out = write_image(arr, meta, tmp_path / "breast.nhdr")
    data_line = next(ln for ln in out.read_text().splitlines() if ln.startswith("data file:"))
    data_file = data_line.split(":", 1)[1].strip()
    assert not data_file.startswith(".")
    assert files_in(tmp_path) == sorted(["breast.nhdr", data_file])
    with gzip.open(tmp_path / data_file) as fh:
        assert len(fh.read()) == arr.nbytes


# --------------------------------------------------------------------------------------------
# DICOM series


def pydicom_series(folder: Path):
    """Slices of a series sorted along the slice normal, as pydicom reads them."""
    pydicom = pytest.importorskip("pydicom")
    slices = [pydicom.dcmread(str(f)) for f in sorted(folder.iterdir()) if f.is_file()]
    iop = np.array(slices[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(slices, key=lambda s: float(np.dot(normal, np.array(s.ImagePositionPatient, dtype=float)))), normal


@pytest.mark.parametrize("name", sorted(DICOM_SERIES))
def test_dicom_series_matches_pydicom_headers(name):
    folder = dicom_dir(name)
    arr, meta = read_image(folder)
    slices, normal = pydicom_series(folder)
    assert arr.ndim == 3
    assert arr.shape[0] == len(slices) == DICOM_SERIES[name]
    first = slices[0]
    assert arr.shape[1:] == (int(first.Rows), int(first.Columns))
    positions = np.array([np.dot(normal, np.array(s.ImagePositionPatient, dtype=float)) for s in slices])
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)  # DICOM: (between rows, between columns)
    np.testing.assert_allclose(meta.spacing, (np.diff(positions).mean(), row_spacing, col_spacing), rtol=1e-5)
    np.testing.assert_allclose(meta.origin, tuple(reversed([float(v) for v in first.ImagePositionPatient])), atol=1e-4)
    iop = np.array(first.ImageOrientationPatient, dtype=float)
    # ITK direction columns are the row direction, column direction and slice normal
    np.testing.assert_allclose(np.array(meta.direction).reshape(3, 3).T, [iop[:3], iop[3:], normal], atol=1e-6)
    for k in (0, len(slices) // 2, len(slices) - 1):
        s = slices[k]
        expected = s.pixel_array * float(getattr(s, "RescaleSlope", 1)) + float(getattr(s, "RescaleIntercept", 0))
        np.testing.assert_array_equal(arr[k].astype(np.float64), expected)


def test_dicom_slice_spacing_comes_from_positions_not_slice_thickness():
    """The TotalSegmentator series says SliceThickness 3 mm but its slices are 2 mm apart."""
    folder = dicom_dir("example_ct_dicom")
    slices, _ = pydicom_series(folder)
    assert float(slices[0].SliceThickness) == 3.0
    _, meta = read_image(folder)
    assert meta.spacing[0] == pytest.approx(2.0)
    assert meta.spacing[1:] == pytest.approx((0.9765625, 0.9765625))


def test_dicom_ct_intensities_are_hounsfield():
    arr, _ = read_image(dicom_dir("example_ct_dicom"))
    assert arr.min() >= -1024 - 1e-3  # rescale intercept applied (raw stored values start at 0)
    assert (arr < -900).mean() > 0.1  # air around the body


def test_folder_with_two_dicom_series_is_rejected(tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for study in ("Study1_13_HCropVolume", "Study2_14_HCropVolume"):
        for f in dicom_dir(study).iterdir():
            shutil.copyfile(f, mixed / f"{study}_{f.name}")
    with pytest.raises(ImageReadError, match="2 DICOM series") as info:
        read_image(mixed)
    assert info.value.path == str(mixed)
    assert "\n" not in str(info.value)


def test_folder_without_dicom_is_rejected(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here\n")
    with pytest.raises(ImageReadError, match="no DICOM series"):
        read_image(folder)


def test_label_dtype_is_decided_by_the_largest_label_and_round_trips(tmp_path):
    expected = [np.uint8, np.uint8, np.uint16, np.uint16, np.uint32]
    assert [label_dtype(m) for m in (0, 255, 256, 65535, 65536)] == expected
    seg = np.zeros((2, 3, 4), label_dtype(300))
    seg[0, 0, :3] = (1, 255, 300)  # a 301-class label map: 300 must survive, not wrap
    back, _ = read_image(write_image(seg, ImageMeta(spacing=(1.0, 1.0, 1.0), shape=seg.shape), tmp_path / "s.nii.gz"))
    assert back.dtype == np.uint16 and back[0, 0, :3].tolist() == [1, 255, 300]
