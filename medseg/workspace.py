"""An explicit workspace path object: where preprocessed data and trained models live.

No environment variable is required: pass ``--workspace`` (or ``Workspace(path)``). For
convenience ``MEDSEG_WORKSPACE`` is read when no flag is given, then ``./medseg_workspace``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "dataset"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def resolve(cls, path: str | Path | None = None) -> Workspace:
        return cls(Path(path or os.environ.get("MEDSEG_WORKSPACE") or "medseg_workspace").resolve())

    def preprocessed(self, dataset_name: str) -> Path:
        return self.root / "preprocessed" / safe_name(dataset_name)

    def plan_path(self, dataset_name: str) -> Path:
        return self.preprocessed(dataset_name) / "plan.json"

    def fingerprint_path(self, dataset_name: str) -> Path:
        return self.preprocessed(dataset_name) / "fingerprint.json"

    def results(self, dataset_name: str, configuration: str, model: str) -> Path:
        return self.root / "results" / safe_name(dataset_name) / f"{model}__{configuration}"
