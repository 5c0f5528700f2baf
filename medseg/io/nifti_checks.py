"""NIfTI integrity checks: what SimpleITK does not say about a NIfTI file.

niftilib inside SimpleITK (1) zero-fills the missing voxels of a truncated file (plain or gzipped)
without any error, and (2) silently turns NaN/Inf voxels of float images into 0. The first makes a
half-copied file a half-black image; the second hides broken intensities from verify. Both are
checked here against the header; used by :func:`medseg.io.image.read_image`.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import ImageReadError


@dataclass(frozen=True)
class _NiftiLayout:
    data_start: int  # byte offset of the voxel data (vox_offset)
    data_end: int  # byte offset where the voxel data end
    float_dtype: str | None  # numpy dtype of float voxels ("<f4", ">f8"); None for other types


def _nifti_layout(header: bytes) -> _NiftiLayout | None:
    """Where the voxel data of a NIfTI-1/2 file lie, from its header; None if not a NIfTI header."""
    for e in "<>":
        if len(header) >= 348 and struct.unpack(e + "i", header[:4])[0] == 348:
            datatype, bitpix = struct.unpack(e + "2h", header[70:74])
            dim = struct.unpack(e + "8h", header[40:56])
            offset = max(int(struct.unpack(e + "f", header[108:112])[0]), 352)
        elif len(header) >= 540 and struct.unpack(e + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(e + "2h", header[12:16])
            dim = struct.unpack(e + "8q", header[16:80])
            offset = max(struct.unpack(e + "q", header[168:176])[0], 544)
        else:
            continue
        if not 1 <= dim[0] <= 7 or bitpix <= 0:
            return None
        n = 1
        for d in dim[1 : dim[0] + 1]:
            n *= max(int(d), 1)
        kind = {16: "f4", 64: "f8"}.get(datatype)
        return _NiftiLayout(offset, offset + n * bitpix // 8, e + kind if kind else None)
    return None


def _gzip_chunks(path: Path):
    """Decompressed bytes of a (possibly multi-member) gzip file, chunk by chunk in bounded
    memory; raises ValueError if the compressed stream is damaged or ends early."""
    fed = False
    d = zlib.decompressobj(wbits=31)
    with open(path, "rb") as fh:
        pending = b""
        while True:
            if not pending:
                pending = fh.read(1 << 20)
                if not pending:
                    break
            if not fed:  # between members: some writers pad with zeros
                pending = pending.lstrip(b"\0")
                if not pending:
                    continue
            try:
                out = d.decompress(pending, 1 << 24)
            except zlib.error as exc:
                raise ValueError(f"compressed data are damaged ({exc})") from None
            fed = True
            if out:
                yield out
            if d.eof:  # one member ended; what follows may be another member
                pending, d, fed = d.unused_data, zlib.decompressobj(wbits=31), False
            else:
                pending = d.unconsumed_tail
    if fed and not d.eof:
        raise ValueError("compressed data end early")


def _file_chunks(path: Path):
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            yield chunk


def _restore_nonfinite(chunks, layout: _NiftiLayout, arr: np.ndarray) -> np.ndarray:
    """Put back the NaN/Inf voxels niftilib replaced by 0 (only those positions are touched)."""
    item = np.dtype(layout.float_dtype).itemsize
    if arr.size * item != layout.data_end - layout.data_start:
        return arr
    offset, pending = 0, b""  # offset: stream position of pending[0]
    found_idx, found_val = [], []
    for chunk in chunks:
        pending = pending + chunk if pending else chunk
        lo = max(layout.data_start - offset, 0)
        hi = min(len(pending), layout.data_end - offset)
        if lo >= hi:
            offset, pending = offset + len(pending), b""
            if offset >= layout.data_end:
                break
            continue
        usable = lo + (hi - lo) // item * item
        vals = np.frombuffer(memoryview(pending)[lo:usable], dtype=layout.float_dtype)
        bad = np.flatnonzero(~np.isfinite(vals))
        if bad.size:
            found_idx.append(bad + (offset + lo - layout.data_start) // item)
            found_val.append(vals[bad].copy())
        offset, pending = offset + usable, pending[usable:]
        if offset >= layout.data_end:
            break
    if found_idx:
        arr = np.ascontiguousarray(arr)
        arr.reshape(-1)[np.concatenate(found_idx)] = np.concatenate(found_val).astype(arr.dtype)
    return arr


def _gzip_head(path: Path, n: int = 544) -> bytes:
    """Up to ``n`` decompressed bytes from the start of a gzip file, also when the file is cut short
    (``gzip.open(...).read`` raises then, and a cut header must be judged, not skipped)."""
    with open(path, "rb") as fh:
        raw = fh.read(1 << 16)
    try:
        return zlib.decompressobj(wbits=31).decompress(raw, n)
    except zlib.error:
        return b""


def check_nifti(path: Path, arr: np.ndarray) -> np.ndarray:
    """Raise ImageReadError for a truncated NIfTI; return ``arr`` with any NaN/Inf restored."""
    name = path.name.lower()
    gz = name.endswith(".nii.gz")
    if not (gz or name.endswith(".nii")):
        return arr
    try:
        head = _gzip_head(path) if gz else path.open("rb").read(544)
    except OSError:
        return arr  # ITK read it, so leave the judgement to ITK
    layout = _nifti_layout(head)
    if layout is None:
        if gz and len(head) < 348:  # ITK made an image of a cut-off header: mostly zeros, never data
            raise ImageReadError(
                path, f"truncated: only {len(head)} bytes after decompression, a NIfTI header needs 348"
            )
        return arr
    if not gz:
        size = path.stat().st_size
        if size < layout.data_end:
            raise ImageReadError(path, f"truncated: file has {size} bytes, its header needs {layout.data_end}")
    else:
        with open(path, "rb") as fh:  # gzip trailer: uncompressed size mod 2**32 (cheap check first)
            fh.seek(-4, os.SEEK_END)
            complete = struct.unpack("<I", fh.read(4))[0] == layout.data_end % (1 << 32)
        if not complete:
            try:
                size = sum(len(c) for c in _gzip_chunks(path))
            except ValueError as exc:
                raise ImageReadError(path, f"truncated or corrupt: {exc}") from None
            if size < layout.data_end:
                raise ImageReadError(
                    path, f"truncated: {size} bytes after decompression, its header needs {layout.data_end}"
                )
    if layout.float_dtype and np.issubdtype(arr.dtype, np.floating):
        try:
            arr = _restore_nonfinite(_gzip_chunks(path) if gz else _file_chunks(path), layout, arr)
        except ValueError as exc:
            raise ImageReadError(path, f"truncated or corrupt: {exc}") from None
    return arr


def unreadable_reason(path: Path, itk_message: str) -> str:
    """A one-line reason for an image ITK refused, without ITK's source paths and pointers."""
    if not path.is_file():
        return "cannot read image folder"
    with open(path, "rb") as fh:
        head = fh.read(544)
    name = path.name.lower()
    if name.endswith(".gz") and not head.startswith(b"\x1f\x8b"):
        return "not an image: the content is not gzip data despite the .gz name"
    if name.endswith(".nii.gz"):
        try:
            with gzip.open(path, "rb") as fh:
                header = fh.read(544)
        except (OSError, EOFError, zlib.error):
            return "cannot read image (truncated or corrupt: compressed data are damaged)"
        if _nifti_layout(header) is None:
            return "not an image: no NIfTI header inside the compressed data"
        try:
            sum(len(c) for c in _gzip_chunks(path))
        except ValueError as exc:
            return f"truncated or corrupt: {exc}"
    elif name.endswith(".nii") and _nifti_layout(head) is None:
        return "not an image: no NIfTI header"
    if "Unable to determine ImageIO reader" in itk_message:
        return "cannot read image (truncated or corrupt, or not an image of this type)"
    return "cannot read image (truncated or corrupt)"
