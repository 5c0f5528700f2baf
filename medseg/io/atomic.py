"""Write-then-rename: temporary files and folders beside their final path, with the permissions an
ordinary file gets.

``tempfile.mkstemp``/``mkdtemp`` create private (0600 / 0700) entries; renamed into place they would
make shared model folders and results unreadable for other users and containers. Every temporary
that becomes a user's file goes through here and gets ``0666 & ~umask`` (folders ``0777 & ~umask``),
like any file the user's shell creates.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it
    os.umask(mask)
    return mask


def default_mode(path: str | Path, *, directory: bool = False) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def temp_file_beside(path: str | Path, suffix: str = ".part") -> Path:
    """An empty temporary file in ``path``'s folder (hidden, named after it), ordinary permissions."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    default_mode(tmp)
    return Path(tmp)


def temp_dir_beside(path: str | Path, suffix: str = ".part") -> Path:
    """A temporary folder in ``path``'s folder, ordinary permissions (it may be renamed into place)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))
    default_mode(tmp, directory=True)
    return tmp


def save_npy_atomic(path: str | Path, arr) -> None:
    """``np.save`` to a hidden temporary beside ``path``, then rename: a reader never sees half a file."""
    import numpy as np

    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
    os.replace(tmp, path)


def publish_dir(tmp: str | Path, dest: str | Path) -> None:
    """Move the complete folder ``tmp`` to ``dest``; an existing ``dest`` is swapped out only once
    ``tmp`` is complete (moved aside, replaced, then deleted), so ``dest`` is never half written."""
    import shutil

    tmp, dest = Path(tmp), Path(dest)
    if not dest.exists():
        os.replace(tmp, dest)
        return
    old = dest.with_name(f".{dest.name}.replaced")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
