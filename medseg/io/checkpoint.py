"""Self-describing model folders: safetensors weights + a JSON model spec.

    MODEL/model.json                 registry name, kwargs, plan, label map, medseg version
    MODEL/fold_K/model.safetensors   weights of fold K (no pickle anywhere)
    MODEL/fold_K/checkpoint.json     sha256 of the weights, epoch, validation metrics

Inference needs only these files and never imports training code. A missing or tampered
file is a CheckpointError naming that file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from medseg import __version__
from medseg.errors import CheckpointError
from medseg.io.jsonio import read_json_object, write_json
from medseg.planning.plan import Plan

FORMAT = "medseg-model"
FORMAT_VERSION = 1
PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"  # models shipped with medseg


@dataclass
class ModelSpec:
    model: str
    model_kwargs: dict
    in_channels: int
    num_classes: int
    labels: dict[str, int]
    plan: Plan
    configuration: str
    medseg_version: str = __version__
    description: str = ""
    pretrained: dict | None = None  # fine-tuned models: {"source", "weights", "sha256"} of the initialisation
    task: str = "segmentation"  # medseg.tasks registry name: what a batch holds, what inference returns
    training: dict | None = None  # the recipe's registry names (loss, optimizer, schedule, EMA, augmentation)
    # range of the training cases (spacing, extent, intensity, orientation; medseg.planning.ood): predict
    # warns on a case far outside it. None (older model folders, imported models): no check
    training_data: dict | None = None

    def to_json(self) -> dict:
        extra = {"pretrained": self.pretrained} if self.pretrained else {}
        if self.training:
            extra["training"] = self.training
        if self.training_data:
            extra["training_data"] = self.training_data
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "medseg_version": self.medseg_version,
            "model": self.model,
            "model_kwargs": self.model_kwargs,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "labels": self.labels,
            "configuration": self.configuration,
            "task": self.task,
            "description": self.description,
            "plan": self.plan.to_json(),
            **extra,
        }

    @classmethod
    def from_json(cls, d: dict, source: Path) -> ModelSpec:
        if d.get("format") != FORMAT:
            raise CheckpointError(source, 'not a medseg model spec (missing "format": "medseg-model")')
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(source, "model folder written by a newer medseg; upgrade medseg")
        try:
            return cls(
                model=d["model"],
                model_kwargs=d["model_kwargs"],
                in_channels=int(d["in_channels"]),
                num_classes=int(d["num_classes"]),
                labels={k: int(v) for k, v in d["labels"].items()},
                plan=Plan.from_json(d["plan"], source),
                configuration=d["configuration"],
                medseg_version=d.get("medseg_version", "?"),
                description=d.get("description", ""),
                pretrained=d.get("pretrained"),
                task=d.get("task", "segmentation"),  # model folders before tasks existed: segmentation
                training=d.get("training"),
                training_data=d.get("training_data"),
            )
        except KeyError as exc:
            raise CheckpointError(source, f"model spec lacks key {exc}") from None

    def build(self, deep_supervision: bool = False) -> torch.nn.Module:
        from medseg.models import create_model

        kwargs = {**self.model_kwargs, "deep_supervision": deep_supervision}
        return create_model(self.model, self.in_channels, self.num_classes, **kwargs)


def resolve_model(model: str | Path) -> Path:
    """A model folder path, or the name of a model shipped with medseg (e.g. ``hippocampus``)."""
    p = Path(model)
    if p.is_dir():
        return p
    shipped = PRETRAINED_DIR / str(model)
    if shipped.is_dir():
        return shipped
    names = sorted(d.name for d in PRETRAINED_DIR.iterdir() if d.is_dir()) if PRETRAINED_DIR.is_dir() else []
    raise CheckpointError(model, f"not a model folder nor a shipped model (shipped: {', '.join(names) or 'none'})")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_spec(folder: Path, spec: ModelSpec) -> Path:
    return write_json(Path(folder) / "model.json", spec.to_json())


def load_spec(folder: str | Path) -> ModelSpec:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, "model folder not found")
    path = folder / "model.json"
    if not path.is_file():
        raise CheckpointError(path, "missing model.json (not a medseg model folder)")
    return ModelSpec.from_json(read_json_object(path, CheckpointError, "model.json"), path)


def save_weights(fold_dir: Path, state_dict: dict, *, info: dict | None = None) -> Path:
    """Write fold weights + checkpoint.json atomically (weights first, hash record last)."""
    from safetensors.torch import save_file

    fold_dir.mkdir(parents=True, exist_ok=True)
    target = fold_dir / "model.safetensors"
    from medseg.io.atomic import default_mode, temp_file_beside

    tmp = temp_file_beside(target, ".safetensors.part")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, tmp, metadata={"format": FORMAT})
    default_mode(tmp)  # safetensors writes its file private (0600)
    os.replace(tmp, target)
    write_json(fold_dir / "checkpoint.json", {**(info or {}), "weights": target.name, "sha256": sha256(target)})
    return target


def available_folds(folder: Path) -> list[str]:
    return sorted(
        p.name[len("fold_") :]
        for p in Path(folder).glob("fold_*")
        if (p / "model.safetensors").exists() or (p / "checkpoint.json").exists()
    )


def load_weights(fold_dir: Path) -> dict[str, torch.Tensor]:
    """Load a fold's weights after checking their sha256 against checkpoint.json."""
    from safetensors.torch import load_file

    record = fold_dir / "checkpoint.json"
    weights = fold_dir / "model.safetensors"
    if not record.is_file():
        raise CheckpointError(record, "missing checkpoint.json (cannot verify weights)")
    if not weights.is_file():
        raise CheckpointError(weights, "missing weights file")
    try:
        expected = json.loads(record.read_text())["sha256"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        raise CheckpointError(record, "checkpoint.json is corrupt (no sha256)") from None
    if sha256(weights) != expected:
        raise CheckpointError(weights, "sha256 mismatch: weights were modified or truncated after saving")
    try:
        return load_file(str(weights))
    except Exception as exc:  # safetensors raises SafetensorError
        raise CheckpointError(weights, f"cannot read safetensors ({exc})") from None
