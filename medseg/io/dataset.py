"""The nnU-Net v2 raw dataset layout and an MSD -> nnU-Net converter.

Layout::

    DATASET/dataset.json            channel_names, labels (name -> int, background 0), file_ending
    DATASET/imagesTr/CASE_0000.nii.gz, CASE_0001.nii.gz, ...   one file per channel
    DATASET/labelsTr/CASE.nii.gz
    DATASET/imagesTs/CASE_0000.nii.gz                          optional test images
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import DatasetError
from medseg.io.image import image_suffix, strip_suffix

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


@dataclass(frozen=True)
class Case:
    """One case: its channel image files (ordered) and optional label file."""

    name: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass(frozen=True)
class DatasetInfo:
    """The parts of dataset.json medseg uses."""

    name: str
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    file_ending: str
    regions: bool = False

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Number of output classes including background."""
        return max(self.labels.values()) + 1

    @property
    def label_names(self) -> dict[int, str]:
        return {v: k for k, v in self.labels.items()}


def load_dataset_json(folder: str | Path) -> DatasetInfo:
    folder = Path(folder)
    path = folder / "dataset.json"
    if not folder.is_dir():
        raise DatasetError(folder, "dataset folder not found")
    if not path.is_file():
        raise DatasetError(path, "dataset.json not found")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(path, f"invalid JSON ({exc})") from None
    for key in ("channel_names", "labels"):
        if key not in d:
            raise DatasetError(path, f"missing key '{key}'")
    chans = d["channel_names"]
    try:
        channel_names = tuple(chans[str(i)] for i in range(len(chans)))
    except KeyError:
        raise DatasetError(path, "channel_names keys must be '0', '1', ... without gaps") from None
    labels = {}
    for name, value in d["labels"].items():
        if isinstance(value, (list, tuple)):
            raise DatasetError(path, f"label '{name}' is a region (list); region-based training is not supported yet")
        if not isinstance(value, int) or value < 0:
            raise DatasetError(path, f"label '{name}' must be a non-negative integer, got {value!r}")
        labels[name] = value
    if 0 not in labels.values():
        raise DatasetError(path, "labels must include background with value 0")
    ending = d.get("file_ending", ".nii.gz")
    if image_suffix("x" + ending) is None:
        raise DatasetError(path, f"file_ending '{ending}' is not a supported image type")
    return DatasetInfo(d.get("name", folder.name), channel_names, labels, ending)


def _group_channels(folder: Path, ending: str) -> dict[str, dict[int, Path]]:
    cases: dict[str, dict[int, Path]] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.name.endswith(ending):
            continue
        m = _CHANNEL.match(f.name[: -len(ending)])
        if not m:
            raise DatasetError(f, f"image file name must end in _XXXX{ending} (channel index)")
        cases.setdefault(m["case"], {})[int(m["ch"])] = f
    return cases


def list_cases(folder: str | Path, info: DatasetInfo | None = None, *, split: str = "Tr",
               strict: bool = True) -> list[Case]:
    """Cases of ``imagesTr`` (+ ``labelsTr``) or ``imagesTs``.

    With ``strict`` a missing channel or label raises; otherwise the case is returned with
    what exists so ``verify`` can report every problem at once.
    """
    folder = Path(folder)
    info = info or load_dataset_json(folder)
    img_dir = folder / f"images{split}"
    if not img_dir.is_dir():
        raise DatasetError(img_dir, "folder not found")
    groups = _group_channels(img_dir, info.file_ending)
    if not groups:
        raise DatasetError(img_dir, f"no images ending in {info.file_ending}")
    cases = []
    for name, chans in sorted(groups.items()):
        missing = [i for i in range(info.num_channels) if i not in chans]
        if missing and strict:
            raise DatasetError(img_dir / f"{name}_{missing[0]:04d}{info.file_ending}", "missing channel file")
        label = folder / f"labels{split}" / f"{name}{info.file_ending}"
        if split == "Tr" and not label.is_file():
            if strict:
                raise DatasetError(label, "missing label file")
            label = None
        cases.append(Case(name, tuple(chans[i] for i in sorted(chans)), label if split == "Tr" else None))
    return cases


def cases_from_input(path: str | Path, num_channels: int = 1) -> list[Case]:
    """Prediction inputs: a file, a DICOM series folder, or a folder of images.

    In a folder, files named ``CASE_XXXX.ext`` are grouped into channels; other image files
    are single-channel cases. Sub-folders that hold a DICOM series are cases too.
    """
    from medseg.io.image import is_dicom_folder

    path = Path(path)
    if not path.exists():
        raise DatasetError(path, "input not found")
    if path.is_file():
        if num_channels != 1:
            raise DatasetError(path, f"model needs {num_channels} channels; pass a folder with CASE_0000..CASE_{num_channels - 1:04d}")
        return [Case(strip_suffix(path), (path,), None)]
    if is_dicom_folder(path):
        return [Case(path.name, (path,), None)]
    files = sorted(f for f in path.iterdir() if f.is_file() and image_suffix(f) and not f.name.startswith("."))
    grouped: dict[str, dict[int, Path]] = {}
    for f in files:
        m = _CHANNEL.match(strip_suffix(f))
        if m:
            grouped.setdefault(m["case"], {})[int(m["ch"])] = f
        else:
            grouped.setdefault(strip_suffix(f), {})[0] = f
    cases = []
    for name, chans in sorted(grouped.items()):
        if len(chans) != num_channels:
            raise DatasetError(path / name, f"has {len(chans)} channel file(s); the model needs {num_channels}")
        cases.append(Case(name, tuple(chans[i] for i in sorted(chans)), None))
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        if is_dicom_folder(sub):
            cases.append(Case(sub.name, (sub,), None))
    if not cases:
        raise DatasetError(path, "folder holds no images")
    return cases


def convert_msd(msd_folder: str | Path, out_folder: str | Path) -> Path:
    """Convert a Medical Segmentation Decathlon task (4D NIfTI images) to the nnU-Net v2 layout.

    MSD stores multi-modal images as one 4D NIfTI; nnU-Net wants one file per channel.
    """
    import SimpleITK as sitk

    msd, out = Path(msd_folder), Path(out_folder)
    src_json = msd / "dataset.json"
    if not src_json.is_file():
        raise DatasetError(src_json, "MSD dataset.json not found")
    d = json.loads(src_json.read_text())
    modality = d.get("modality", {"0": "image"})
    labels = {name: int(k) for k, name in d["labels"].items()}
    if 0 not in labels.values():
        raise DatasetError(src_json, "MSD labels must include 0")
    labels = {("background" if v == 0 else k): v for k, v in labels.items()}
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    def split_channels(src: Path, dst_dir: Path, case: str) -> None:
        img = sitk.ReadImage(str(src))
        if img.GetDimension() == 4:
            size = list(img.GetSize())
            for c in range(size[3]):
                extractor = sitk.ExtractImageFilter()
                extractor.SetSize(size[:3] + [0])
                extractor.SetIndex([0, 0, 0, c])
                sitk.WriteImage(extractor.Execute(img), str(dst_dir / f"{case}_{c:04d}.nii.gz"))
        else:
            shutil.copyfile(src, dst_dir / f"{case}_0000.nii.gz")

    n = 0
    for entry in d.get("training", []):
        img, lab = msd / entry["image"], msd / entry["label"]
        case = strip_suffix(img)
        split_channels(img, out / "imagesTr", case)
        shutil.copyfile(lab, out / "labelsTr" / f"{case}.nii.gz")
        n += 1
    for entry in d.get("test", []):
        img = msd / (entry if isinstance(entry, str) else entry["image"])
        split_channels(img, out / "imagesTs", strip_suffix(img))
    new = {"name": d.get("name", msd.name), "description": d.get("description", ""),
           "channel_names": {str(k): v for k, v in modality.items()}, "labels": labels,
           "numTraining": n, "file_ending": ".nii.gz",
           "licence": d.get("licence", d.get("license", ""))}
    (out / "dataset.json").write_text(json.dumps(new, indent=2))
    return out
