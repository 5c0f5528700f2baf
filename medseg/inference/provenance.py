"""Which model and options made the predictions in an output folder.

A folder run skips cases whose output exists, so that an interrupted run resumes. That is only
right when the existing outputs came from the same model with the same options: predicting with
model B into a folder of model A's results must not report A's label maps as done (and name them
with B's classes). Each folder run records ``.medseg_predictions.json`` (weights digest, labels,
options that change the result) and a later run into the folder must match it, or pass
``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from medseg.errors import OutputError

RECORD = ".medseg_predictions.json"


def weights_digest(fold_weights: dict[str, dict]) -> dict[str, str]:
    """sha256 per fold over the tensors' names, shapes, dtypes and bytes (whatever file they came from)."""
    out = {}
    for fold, state in fold_weights.items():
        h = hashlib.sha256()
        for name in sorted(state):
            t = state[name].detach().cpu().contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
        out[str(fold)] = h.hexdigest()
    return out


def _differences(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def check_output_folder(out_dir: Path, provenance: dict, *, overwrite: bool, any_existing: bool) -> None:
    """Refuse to resume into a folder whose predictions came from another model or other options."""
    record = Path(out_dir) / RECORD
    if overwrite or not any_existing:
        return
    if not record.is_file():
        raise OutputError(
            out_dir, "holds predictions of an unknown run; pass --overwrite to redo them or choose another folder"
        )
    try:
        old = json.loads(record.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OutputError(record, "is not valid JSON; pass --overwrite to redo the predictions") from None
    diff = _differences(old, provenance)
    if diff:
        raise OutputError(
            out_dir,
            f"holds predictions made with another {'/'.join(diff)}; pass --overwrite to redo them or choose another folder",
        )


def record_output_folder(out_dir: Path, provenance: dict) -> None:
    from medseg.io.jsonio import write_json

    write_json(Path(out_dir) / RECORD, provenance)
