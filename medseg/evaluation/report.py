"""What a person looks at: structure volume tables (mL) and PNG overlays."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from medseg.io.jsonio import write_text_atomic

PALETTE = [
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
]


def structure_volumes(seg: np.ndarray, spacing, labels: dict[str, int]) -> dict[str, dict]:
    """Voxel count and volume (mm3, mL) for every labelled structure."""
    voxel_mm3 = float(np.prod(spacing))
    counts = np.bincount(seg.ravel().astype(np.int64), minlength=max(labels.values()) + 1)
    return {
        name: {
            "voxels": int(counts[v]),
            "volume_mm3": counts[v] * voxel_mm3,
            "volume_ml": counts[v] * voxel_mm3 / 1000.0,
        }
        for name, v in sorted(labels.items(), key=lambda kv: kv[1])
        if v != 0
    }


def volumes_csv(rows: list[tuple[str, dict[str, dict]]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["case", "structure", "voxels", "volume_ml"])
    for case, vols in rows:
        for name, v in vols.items():
            w.writerow([case, name, v["voxels"], f"{v['volume_ml']:.4f}"])
    return buf.getvalue()


def _window(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [0.5, 99.5])
    return (np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def overlay_png(
    image: np.ndarray,
    seg: np.ndarray,
    spacing,
    path: str | Path,
    *,
    size: int = 256,
    alpha: float = 0.45,
    labels: dict[str, int] | None = None,
) -> Path:
    """Axial, coronal and sagittal slices through the label centroid (a 2D image: the image itself),
    labels blended in colour.

    Slices are resized with the voxel spacing so anatomy keeps its physical aspect ratio. With
    ``labels`` (name -> value), a legend strip names each colour.
    """
    from PIL import Image, ImageDraw

    fg = np.argwhere(seg > 0)
    center = fg.mean(0).round().astype(int) if len(fg) else np.array(seg.shape) // 2
    gray = _window(image.astype(np.float32))
    panels = []
    for axis in range(3) if seg.shape[0] > 1 else (0,):  # a 2D image (1, H, W): its one plane
        sl = [slice(None)] * 3
        sl[axis] = int(center[axis])
        g, s = gray[tuple(sl)], seg[tuple(sl)]
        rgb = np.repeat(g[..., None], 3, axis=2).astype(np.float32)
        for lab in np.unique(s):
            if lab == 0:
                continue
            colour = np.array(PALETTE[int(lab) % len(PALETTE)], np.float32)
            m = s == lab
            rgb[m] = (1 - alpha) * rgb[m] + alpha * colour
        rows_mm = g.shape[0] * [sp for i, sp in enumerate(spacing) if i != axis][0]
        cols_mm = g.shape[1] * [sp for i, sp in enumerate(spacing) if i != axis][1]
        scale = size / max(rows_mm, cols_mm)
        im = Image.fromarray(rgb.astype(np.uint8)[::-1] if axis != 0 else rgb.astype(np.uint8))
        im = im.resize((max(1, int(cols_mm * scale)), max(1, int(rows_mm * scale))), Image.NEAREST)
        panels.append(im)
    legend = [(n, v) for n, v in (labels or {}).items() if int(v) != 0]
    strip = 18 if legend else 0
    canvas = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), size + strip))
    x = 0
    for p in panels:
        canvas.paste(p, (x, (size - p.height) // 2))
        x += p.width + 8
    draw, x = ImageDraw.Draw(canvas), 4
    for name, value in legend:
        colour = tuple(PALETTE[int(value) % len(PALETTE)])
        draw.rectangle((x, size + 4, x + 10, size + 14), fill=colour)
        draw.text((x + 14, size + 3), str(name), fill=(255, 255, 255))
        x += 14 + int(draw.textlength(str(name))) + 12
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part.png")
    canvas.save(tmp)
    tmp.replace(path)
    return path


def write_volumes_table(path: Path, rows) -> Path:
    return write_text_atomic(path, volumes_csv(rows))
