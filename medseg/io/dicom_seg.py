"""DICOM-SEG out and back: a label map on a DICOM series' grid ↔ a DICOM Segmentation object.

Written with highdicom (optional extra ``medseg[dicom]``, imported lazily). One segment per label
value, segment number = label value, so a reader that combines segments gets the label map
back unchanged. Segment labels are the structure names; the coded property is SNOMED CT
"Anatomical structure" unless a codes table names a specific concept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.errors import DatasetError, ImageReadError, OutputError

ANATOMICAL_STRUCTURE = ("91723000", "SCT", "Anatomical structure")
TISSUE = ("85756007", "SCT", "Tissue")


def _highdicom():
    try:
        import highdicom
        import pydicom
    except ImportError as exc:
        raise OutputError(
            None, f"DICOM-SEG needs the optional extra: pip install 'medseg[dicom]' ({exc.name})"
        ) from None
    return highdicom, pydicom


def series_files(series_dir: str | Path) -> list[str]:
    """The series' files in the slice order medseg (SimpleITK) uses for the image array."""
    import SimpleITK as sitk

    from medseg.io.image import quiet_native_stderr

    series_dir = Path(series_dir)
    with quiet_native_stderr():
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(series_dir)) if series_dir.is_dir() else []
    if not ids:
        raise ImageReadError(series_dir, "folder holds no DICOM series")
    if len(ids) > 1:
        raise ImageReadError(series_dir, f"folder holds {len(ids)} DICOM series; pass one series folder")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_dir), ids[0]))


def _with_uids_from_file_meta(ds):
    """Anonymisers sometimes blank SOPClassUID/SOPInstanceUID in the dataset while the file meta keeps
    them; take them from there (in memory only: the input files are never modified)."""
    meta = getattr(ds, "file_meta", None)
    for attr, meta_attr in (
        ("SOPClassUID", "MediaStorageSOPClassUID"),
        ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
    ):
        if not str(ds.get(attr, "") or "") and meta is not None and str(meta.get(meta_attr, "") or ""):
            setattr(ds, attr, meta.get(meta_attr))
    return ds


# Type-2 attributes of the Patient and General Study modules: required to be present, allowed empty.
# Anonymised series (TCIA's among them) omit some; highdicom copies them from the source and fails on
# a missing one, so the in-memory copies get them empty, as the standard allows (files are not touched).
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")  # fmt: skip


def _with_empty_type2(ds):
    for keyword in TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def write_dicom_seg(
    series_dir: str | Path,
    seg: np.ndarray,
    labels: dict[str, int],
    output: str | Path,
    *,
    algorithm: str = "medseg",
    algorithm_version: str = "",
    series_description: str = "medseg segmentation",
) -> Path:
    """Write ``seg`` (z, y, x, on the series' grid as medseg reads it) as a DICOM-SEG file.

    Every label value from 1 to the largest in ``labels`` becomes a segment (names from ``labels``,
    ``label_N`` for gaps), so segment numbers equal label values; empty segments have no frames.
    """
    hd, pydicom = _highdicom()
    from medseg import __version__
    from medseg.io.image import atomic_target, label_dtype

    files = series_files(series_dir)
    sources = [_with_empty_type2(_with_uids_from_file_meta(pydicom.dcmread(f))) for f in files]
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if seg.shape != (len(sources), rows, cols):
        raise ValueError(f"label map shape {seg.shape} is not the series grid {(len(sources), rows, cols)}")
    values = np.unique(seg)
    if values.min() < 0 or (seg.dtype.kind == "f" and not np.array_equal(values, np.round(values))):
        raise ValueError("label map values must be non-negative integers")
    top = max([int(values.max()), *labels.values()])
    names = {v: n for n, v in labels.items() if v > 0}
    unknown = sorted(set(int(v) for v in values) - {0} - set(names))
    if unknown:
        raise ValueError(f"label values {unknown} are not in the class map")
    algo = hd.AlgorithmIdentificationSequence(
        name=algorithm,
        version=algorithm_version or __version__,
        family=hd.sr.CodedConcept("123109", "DCM", "Artificial Intelligence"),
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=v,
            segment_label=names.get(v, f"label_{v}")[:64],
            segmented_property_category=hd.sr.CodedConcept(*TISSUE[:2], TISSUE[2]),
            segmented_property_type=hd.sr.CodedConcept(*ANATOMICAL_STRUCTURE[:2], ANATOMICAL_STRUCTURE[2]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
        )
        for v in range(1, top + 1)
    ]
    obj = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=seg.astype(label_dtype(top), copy=False),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medseg",
        manufacturer_model_name="medseg",
        software_versions=__version__,
        device_serial_number="0",
        series_description=series_description[:64],
    )
    output = Path(output)
    tmp = atomic_target(output)
    try:
        obj.save_as(tmp)
        Path(tmp).replace(output)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(output, f"cannot write ({exc.strerror or exc})") from None
    return output


def read_dicom_seg(path: str | Path, series_dir: str | Path) -> tuple[np.ndarray, dict[str, int]]:
    """A DICOM-SEG back as a label map on ``series_dir``'s grid (z, y, x) plus its segment names."""
    hd, pydicom = _highdicom()
    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is "not a readable DICOM-SEG"
        raise ImageReadError(path, f"not a readable DICOM-SEG ({type(exc).__name__})") from None
    uids = [
        str(_with_uids_from_file_meta(pydicom.dcmread(f, stop_before_pixels=True)).SOPInstanceUID)
        for f in series_files(series_dir)
    ]
    labels = {str(d.segment_label): int(d.segment_number) for d in seg.SegmentSequence}
    numbers = sorted(labels.values())
    arr = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=numbers, combine_segments=True, relabel=False
    )
    return np.asarray(arr), labels


def dicom_seg_from_files(
    series_dir: str | Path, seg_path: str | Path, output: str | Path, labels: dict[str, int]
) -> Path:
    """``medseg dicom-seg``: check that the label map lies on the series' grid, then write the SEG."""
    from medseg.io.image import check_writable_dir, read_image

    check_writable_dir(Path(output).parent)
    image, meta = read_image(series_dir)
    seg, seg_meta = read_image(seg_path)
    if seg.shape != image.shape:
        raise DatasetError(seg_path, f"shape {seg.shape} differs from the DICOM series' {image.shape} ({series_dir})")
    for what, a, b, tol in (
        ("spacing", seg_meta.spacing, meta.spacing, 1e-3),
        ("origin", seg_meta.origin, meta.origin, 1e-2),
        ("direction", seg_meta.direction, meta.direction, 1e-3),
    ):
        if not np.allclose(a, b, atol=tol):
            raise DatasetError(
                seg_path,
                f"{what} {tuple(round(x, 4) for x in a)} differs from the DICOM series' "
                f"{tuple(round(x, 4) for x in b)}; resample the label map onto the series first",
            )
    try:
        return write_dicom_seg(series_dir, seg, labels, output)
    except ValueError as exc:
        raise DatasetError(seg_path, str(exc)) from None
