"""Atomic JSON writing (write to a temp file, fsync, rename)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from medseg.errors import OutputError
from medseg.io.atomic import temp_file_beside


def _default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_file_beside(path)
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(path, f"cannot write ({exc.strerror or exc})") from None
    return path


def write_json(path: str | Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, default=_default) + "\n")


def read_json_object(path: str | Path, error: type, what: str) -> dict:
    """The JSON object in ``path``; unreadable text, invalid JSON or a non-object raise ``error(path, one line)``
    (``error`` is a :class:`medseg.errors.MedsegError` subclass, ``what`` names the file in the message)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(path, f"{what} is not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise error(path, f"{what} is not a JSON object")
    return d
