"""The nnU-Net v2 raw dataset layout and an MSD -> nnU-Net converter.

Layout::

    DATASET/dataset.json            channel_names, labels (name -> int, background 0), file_ending
    DATASET/imagesTr/CASE_0000.nii.gz, CASE_0001.nii.gz, ...   one file per channel
    DATASET/labelsTr/CASE.nii.gz
    DATASET/imagesTs/CASE_0000.nii.gz                          optional test images
    DATASET/sentences.csv           optional: a grounding dataset, one case per sentence (medseg.reports.dataset)

2D natural images (file_ending .png, .bmp, .tif, .tiff) follow nnU-Net's convention: an RGB file
``CASE_0000.png`` alone supplies the channels R, G, B of dataset.json (medseg.io.natural_image).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import DatasetError
from medseg.io.image import image_suffix, is_natural_image, strip_suffix
from medseg.io.jsonio import read_json_object

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


@dataclass(frozen=True)
class Case:
    """One case: its channel image files (ordered) and optional label file."""

    name: str
    images: tuple[Path, ...]
    label: Path | None
    sentence: str | None = None  # grounding datasets: the sentence whose lesion ``label`` is
    group: str | None = None  # cases of one group (a grounding dataset's image case) share a fold

    @property
    def image_case(self) -> str:
        """The stem of the image files (``<image_case>_0000``): the case itself, or a sentence's image case."""
        return self.group if self.sentence is not None and self.group else self.name


@dataclass(frozen=True)
class DatasetInfo:
    """The parts of dataset.json medseg uses."""

    name: str
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    file_ending: str
    regions: bool = False
    text_encoder: str = "minilm"  # grounding datasets: the sentence encoder of the conditions

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
    d = read_json_object(path, DatasetError, "dataset.json")
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
    seen: dict[int, str] = {}
    for name, value in labels.items():
        if value in seen:
            raise DatasetError(path, f"labels '{seen[value]}' and '{name}' have the same value {value}")
        seen[value] = name
    ending = d.get("file_ending", ".nii.gz")
    if image_suffix("x" + ending) is None:
        raise DatasetError(path, f"file_ending '{ending}' is not a supported image type")
    return DatasetInfo(d.get("name", folder.name), channel_names, labels, ending,
                       text_encoder=str(d.get("text_encoder", "minilm")))  # fmt: skip


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


def list_cases(
    folder: str | Path, info: DatasetInfo | None = None, *, split: str = "Tr", strict: bool = True
) -> list[Case]:
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
    if split == "Tr" and (folder / "sentences.csv").is_file():
        from medseg.reports.dataset import grounding_cases

        return grounding_cases(folder, info, groups, strict)
    cases = []
    for name, chans in sorted(groups.items()):
        missing = [i for i in range(info.num_channels) if i not in chans]
        if single_file_channels(info.file_ending, chans):
            missing = []  # an RGB _0000 holds them all; the channel count is checked when it is read
        if missing and strict:
            raise DatasetError(img_dir / f"{name}_{missing[0]:04d}{info.file_ending}", "missing channel file")
        extra = sorted(i for i in chans if i >= info.num_channels)
        if extra and strict:
            raise DatasetError(
                chans[extra[0]], f"unexpected channel file (dataset.json has {info.num_channels} channel(s))"
            )
        label = folder / f"labels{split}" / f"{name}{info.file_ending}"
        if split == "Tr" and not label.is_file():
            if strict:
                raise DatasetError(label, "missing label file")
            label = None
        cases.append(Case(name, tuple(chans[i] for i in sorted(chans)), label if split == "Tr" else None))
    return cases


def single_file_channels(file_ending: str, chans) -> bool:
    """True when one natural-image file ``_0000`` stands for all channels of a case (RGB in one file,
    nnU-Net's convention); the channels are counted when the file is read."""
    return is_natural_image(file_ending) and set(chans) == {0}


def cases_from_input(path: str | Path, num_channels: int = 1) -> list[Case]:
    """Prediction inputs: a file, a DICOM series folder, or a folder of images.

    In a folder, files named ``CASE_XXXX.ext`` are grouped into channels; other image files
    are single-channel cases. Sub-folders that hold a DICOM series are cases too.
    """
    from medseg.io.image import is_dicom_folder

    path = Path(path)
    if not path.exists():
        raise DatasetError(path, "input not found")
    if path.is_file() and path.suffix.lower() == ".zip":
        return [Case(path.stem, (path,), None)]
    if path.is_file():
        if num_channels != 1 and not is_natural_image(path):  # an RGB image holds 3 channels in one file
            raise DatasetError(
                path, f"model needs {num_channels} channels; pass a folder with CASE_0000..CASE_{num_channels - 1:04d}"
            )
        return [Case(strip_suffix(path), (path,), None)]
    if is_dicom_folder(path):
        return [Case(path.name, (path,), None)]
    files = sorted(f for f in path.iterdir() if f.is_file() and image_suffix(f) and not f.name.startswith("."))
    grouped: dict[str, dict[int, Path]] = {}
    for f in files:
        m = _CHANNEL.match(strip_suffix(f))
        name, ch = (m["case"], int(m["ch"])) if m else (strip_suffix(f), 0)
        if ch in grouped.setdefault(name, {}):
            raise DatasetError(
                f, f"clashes with {grouped[name][ch].name} (both would be channel {ch} of case '{name}')"
            )
        grouped[name][ch] = f
    cases = []
    for name, chans in sorted(grouped.items()):
        one_file = len(chans) == 1 and (num_channels == 1 or is_natural_image(next(iter(chans.values()))))
        if one_file and 0 not in chans:  # "scan_2023.nii.gz": digits, not a channel
            (f,) = chans.values()
            name, chans = strip_suffix(f), {0: f}
        if sorted(chans) != list(range(num_channels)) and not one_file:  # one PNG may hold R, G, B
            found = ", ".join(f"_{c:04d}" for c in sorted(chans))
            raise DatasetError(
                path / name,
                f"has {len(chans)} channel file(s) ({found}); "
                f"the model needs {num_channels} (_0000 to _{num_channels - 1:04d})",
            )
        cases.append(Case(name, tuple(chans[i] for i in sorted(chans)), None))
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        if is_dicom_folder(sub):
            cases.append(Case(sub.name, (sub,), None))
    if num_channels == 1:
        cases += [Case(z.stem, (z,), None) for z in sorted(path.glob("*.zip")) if not z.name.startswith(".")]
    if not cases:
        raise DatasetError(path, "folder holds no images")
    return cases


def convert_msd(msd_folder: str | Path, out_folder: str | Path) -> Path:
    """Convert a Medical Segmentation Decathlon task (4D NIfTI images) to the nnU-Net v2 layout.

    MSD stores multi-modal images as one 4D NIfTI; nnU-Net wants one file per channel. Each
    channel keeps the 3D spacing, origin and direction of the 4D image (the 4th axis is dropped).
    Only the cases listed in the MSD dataset.json are converted (the MSD tarballs also hold
    macOS ``._*`` junk files).
    """
    import SimpleITK as sitk

    from medseg.io.image import ImageMeta, write_image
    from medseg.io.jsonio import write_json

    msd, out = Path(msd_folder), Path(out_folder)
    src_json = msd / "dataset.json"
    if not src_json.is_file():
        raise DatasetError(src_json, "MSD dataset.json not found")
    try:
        d = json.loads(src_json.read_text())
        modality = d.get("modality", {"0": "image"})
        channel_names = {str(i): modality[str(i)] for i in range(len(modality))}
        labels = {name: int(k) for k, name in d["labels"].items()}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(src_json, f"invalid JSON ({exc})") from None
    except KeyError as exc:
        raise DatasetError(src_json, f"missing key {exc} (MSD needs 'labels'; modality keys '0', '1', ...)") from None
    except (ValueError, AttributeError):
        raise DatasetError(src_json, "MSD 'labels' must map integer strings to names") from None
    if 0 not in labels.values():
        raise DatasetError(src_json, "MSD labels must include 0")
    labels = {("background" if v == 0 else k): v for k, v in sorted(labels.items(), key=lambda kv: kv[1])}

    def source(rel: str) -> Path:
        f = msd / rel  # MSD paths look like "./imagesTr/x.nii.gz"
        if not f.is_file():
            raise DatasetError(f, f"listed in {src_json.name} but not found")
        return f

    def copy_3d(src: Path, dst: Path) -> None:
        if src.name.endswith(".nii.gz"):
            shutil.copyfile(src, dst)
        else:  # e.g. .nii: re-encode so the content matches the .nii.gz name
            sitk.WriteImage(sitk.ReadImage(str(src)), str(dst), True)

    def split_channels(src: Path, dst_dir: Path, case: str) -> None:
        img = sitk.ReadImage(str(src))
        n = img.GetSize()[3] if img.GetDimension() == 4 else 1
        if img.GetDimension() not in (3, 4):
            raise DatasetError(src, f"is {img.GetDimension()}D; expected a 3D or 4D NIfTI")
        if n != len(channel_names):
            raise DatasetError(src, f"has {n} channel(s) but dataset.json 'modality' lists {len(channel_names)}")
        if img.GetDimension() == 3:
            copy_3d(src, dst_dir / f"{case}_0000.nii.gz")
            return
        # explicit 3D geometry from the 4D header (top-left 3x3 of the 4x4 direction), stored (z, y, x)
        meta = ImageMeta(
            spacing=tuple(float(s) for s in reversed(img.GetSpacing()[:3])),
            origin=tuple(float(o) for o in reversed(img.GetOrigin()[:3])),
            direction=tuple(float(x) for x in [v for r in range(3) for v in img.GetDirection()[4 * r : 4 * r + 3]]),
        )
        arr = sitk.GetArrayFromImage(img)  # (c, z, y, x)
        for c in range(n):
            write_image(arr[c], meta, dst_dir / f"{case}_{c:04d}.nii.gz")

    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    n = 0
    for entry in d.get("training", []):
        img, lab = source(entry["image"]), source(entry["label"])
        case = strip_suffix(img)
        split_channels(img, out / "imagesTr", case)
        copy_3d(lab, out / "labelsTr" / f"{case}.nii.gz")
        n += 1
    for entry in d.get("test", []):
        img = source(entry if isinstance(entry, str) else entry["image"])
        split_channels(img, out / "imagesTs", strip_suffix(img))
    new = {
        "name": d.get("name", msd.name),
        "description": d.get("description", ""),
        "channel_names": channel_names,
        "labels": labels,
        "numTraining": n,
        "file_ending": ".nii.gz",
        "licence": d.get("licence", d.get("license", "")),
    }
    write_json(out / "dataset.json", new)
    return out
