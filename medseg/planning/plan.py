"""The Plan: a typed, versioned JSON document a person can read and edit.

It names the architecture by registry key + kwargs (never a Python import path), so a plan
written today still loads after refactors, and any registered model can be planned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from medseg.errors import PlanError

SCHEMA_VERSION = 2  # 2: Plan.orientation (schema 1 plans load with None: no reorientation)


@dataclass(frozen=True)
class Normalization:
    """Per-channel intensity normalisation.

    scheme: ``zscore`` (per case), ``ct`` (dataset-wide percentile clip + z-score),
    ``none``. ``use_mask``: statistics only inside the non-zero mask (set when cropping to
    non-zero removed a lot, as in skull-stripped brain MRI).
    """

    scheme: str = "zscore"
    use_mask: bool = False
    clip_low: float | None = None
    clip_high: float | None = None
    mean: float | None = None
    std: float | None = None


@dataclass(frozen=True)
class Configuration:
    """One trainable configuration (2d, 3d_fullres, 3d_lowres)."""

    name: str
    spacing: tuple[float, ...]  # target spacing (z, y, x) mm
    median_shape: tuple[int, ...]  # median shape after resampling, voxels
    patch_size: tuple[int, ...]  # network input, voxels (2 axes for 2d)
    batch_size: int
    model: str = "unet"
    model_kwargs: dict = field(default_factory=dict)
    separate_z: bool = False  # resample the anisotropic axis separately
    anisotropic_axis: int | None = None
    estimated_memory_gb: float = 0.0
    # spatial axes (z, y, x = 0, 1, 2) that mirror test-time augmentation flips; None: all of them
    # (an imported nnU-Net model keeps its trainer's choice, e.g. none for nnUNetTrainerNoMirroring)
    mirror_axes: tuple[int, ...] | None = None
    # "medseg", or "nnunet": reproduce nnU-Net v2's inference numerics for an imported model (cubic image
    # resampling clipped to the input's range, nnU-Net's Gaussian tile weights, logits rather than
    # probabilities resampled back to the native grid); see docs/nnunet_import.md
    numerics: str = "medseg"

    @property
    def spatial_dims(self) -> int:
        return len(self.patch_size)


def _orientation(code, source) -> str | None:
    if code is None:
        return None
    from medseg.preprocessing.orientation import orientation_axes

    try:
        orientation_axes(code)
    except ValueError as exc:
        raise PlanError(source, f"invalid plan orientation ({exc})") from None
    return str(code).upper()


@dataclass(frozen=True)
class Plan:
    dataset_name: str
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    normalization: tuple[Normalization, ...]
    configurations: dict[str, Configuration]
    budget: str = "cpu"
    schema_version: int = SCHEMA_VERSION
    file_ending: str = ".nii.gz"
    # canonical voxel orientation every case is brought to before preprocessing and mapped back from
    # on export ("RAS", nibabel's codes, see medseg/preprocessing/orientation.py); None: voxel order as stored
    orientation: str | None = None

    @property
    def num_classes(self) -> int:
        return max(self.labels.values()) + 1

    def configuration(self, name: str) -> Configuration:
        if name not in self.configurations:
            raise PlanError(None, f"plan has no configuration '{name}' (has: {', '.join(self.configurations)})")
        return self.configurations[name]

    @property
    def default_configuration(self) -> str:
        """What preprocess/train use when none is named: ``3d_fullres`` where the plan has it (3D
        datasets), otherwise its first configuration (``2d``, the only one of a plan of 2D images)."""
        if "3d_fullres" in self.configurations or not self.configurations:
            return "3d_fullres"
        return next(iter(self.configurations))

    def with_configuration(self, cfg: Configuration) -> Plan:
        return replace(self, configurations={**self.configurations, cfg.name: cfg})

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict, source: str | Path | None = None) -> Plan:
        try:
            version = d.get("schema_version", 0)
            if version > SCHEMA_VERSION:
                raise PlanError(source, f"plan schema_version {version} is newer than this medseg ({SCHEMA_VERSION})")
            configs = {}
            for name, c in d["configurations"].items():
                c = dict(c)
                for key in ("spacing", "median_shape", "patch_size"):
                    c[key] = tuple(c[key])
                if c.get("mirror_axes") is not None:
                    c["mirror_axes"] = tuple(int(a) for a in c["mirror_axes"])
                configs[name] = Configuration(**c)
            return cls(
                dataset_name=d["dataset_name"],
                channel_names=tuple(d["channel_names"]),
                labels={k: int(v) for k, v in d["labels"].items()},
                normalization=tuple(Normalization(**n) for n in d["normalization"]),
                configurations=configs,
                budget=d.get("budget", "cpu"),
                schema_version=SCHEMA_VERSION,
                file_ending=d.get("file_ending", ".nii.gz"),
                orientation=_orientation(d.get("orientation"), source),
            )
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(source, f"invalid plan ({type(exc).__name__}: {exc})") from None

    def save(self, path: str | Path) -> Path:
        from medseg.io.jsonio import write_json

        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(path, "plan file not found (run `medseg plan` first)")
        from medseg.io.jsonio import read_json_object

        return cls.from_json(read_json_object(path, PlanError, "plan"), path)
