"""What a person looks at: structure volume tables (mL) and PNG overlays."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from medseg.io.jsonio import write_text_atomic

# three irrational rotations (golden ratio; the plastic number's 1/rho and 1/rho^2, fractional parts):
# each label's hue, lightness and saturation step by a different amount, so no two labels coincide
_HUE, _LIGHT, _SAT = 0.6180339887498949, 0.7548776662466927, 0.5698402909980532


def label_colour(value: int) -> tuple[int, int, int]:
    """RGB of label ``value`` in every preview and overlay (0, background: black).

    The hue steps by the golden ratio, so any run of labels spreads over the colour wheel, and
    lightness (0.35-0.70) and saturation (0.65-1.0) step by other irrational amounts, so labels whose
    hues nearly coincide (values 21, 34, 55 ... apart, the Fibonacci gaps) still differ in shade: 255
    labels, no repeats, none black or white. (A fixed 12-colour list repeated every 12 labels, giving
    TotalSegmentator's liver and hip_left one colour and every 12th label black.)
    """
    import colorsys

    value = int(value)
    if value == 0:
        return (0, 0, 0)
    light = 0.35 + 0.35 * ((value * _LIGHT) % 1.0)
    sat = 0.65 + 0.35 * ((value * _SAT) % 1.0)
    r, g, b = colorsys.hls_to_rgb((value * _HUE) % 1.0, light, sat)
    return (round(r * 255), round(g * 255), round(b * 255))


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


LEGEND_ROW = 16  # pixels per legend line
LEGEND_MAX_ROWS = 6  # more labels than fit: the first ones, then "+N more"


def legend_layout(entries: list[tuple[str, int]], width: int, textlength, max_rows: int = LEGEND_MAX_ROWS) -> list:
    """Rows of (x, text, value) placing each legend entry (a swatch then its name) within ``width``
    pixels, wrapping to a new row; entries beyond ``max_rows`` rows become one "+N more" (value None).
    Names too long for a row are cut with an ellipsis. ``textlength``: pixels of a string."""

    def fit(text: str, room: float) -> str:
        if textlength(text) <= room:
            return text
        while text and textlength(text + "...") > room:
            text = text[:-1]
        return text + "..."

    rows: list[list] = [[]]
    x = 4
    for name, value in entries:
        name = fit(name, width - 4 - 14 - 4)
        need = 14 + int(textlength(name))
        if rows[-1] and x + need > width - 4:
            rows.append([])
            x = 4
        rows[-1].append((x, name, value))
        x += need + 12
    if not entries or len(rows) <= max_rows:
        return rows if entries else []
    rows = rows[:max_rows]
    last = rows[-1]
    while True:  # drop entries from the end of the last row until "+N more" fits after them
        more = f"+{len(entries) - sum(map(len, rows))} more"
        x = last[-1][0] + 14 + int(textlength(last[-1][1])) + 12 if last else 4
        if not last or x + textlength(more) <= width - 4:
            break
        last.pop()
    last.append((x, more, None))
    return rows


def _centre(mask: np.ndarray) -> np.ndarray:
    """The centroid voxel of ``mask`` (the volume's centre when it is empty)."""
    fg = np.argwhere(mask)
    return fg.mean(0).round().astype(int) if len(fg) else np.array(mask.shape) // 2


def _slice_panels(gray: np.ndarray, spacing, center, size: int, colourise) -> list:
    """Axial, coronal, sagittal planes through ``center`` (a 2D image (1, H, W): its one plane), each
    ``colourise(grey plane, index) -> RGB floats`` and resized with the spacing to ``size`` pixels."""
    from PIL import Image

    panels = []
    for axis in range(3) if gray.shape[0] > 1 else (0,):
        sl = [slice(None)] * 3
        sl[axis] = int(center[axis])
        sl = tuple(sl)
        rgb = np.clip(colourise(gray[sl], sl), 0, 255).astype(np.uint8)
        plane = [sp for i, sp in enumerate(spacing) if i != axis]
        rows_mm, cols_mm = rgb.shape[0] * plane[0], rgb.shape[1] * plane[1]
        scale = size / max(rows_mm, cols_mm)
        im = Image.fromarray(rgb[::-1] if axis != 0 else rgb)
        panels.append(im.resize((max(1, int(cols_mm * scale)), max(1, int(rows_mm * scale))), Image.NEAREST))
    return panels


def _save_png(canvas, path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part.png")
    canvas.save(tmp)
    tmp.replace(path)
    return path


def heat_colour(t: np.ndarray) -> np.ndarray:
    """A black-red-yellow-white ramp for values in [0, 1] -> (..., 3) floats in 0-255."""
    t = np.clip(t, 0, 1)[..., None]
    return 255 * np.clip(np.concatenate([3 * t, 3 * t - 1, 3 * t - 2], -1), 0, 1)


def ood_overlay_png(
    image: np.ndarray, score: np.ndarray, spacing, path: str | Path, *, seg: np.ndarray | None = None,
    size: int = 256, name: str = "OOD score",
) -> Path:  # fmt: skip
    """The OOD score map over the image (three planes through the highest-scoring voxel), opacity
    growing with the score, and a colour bar with the map's range, so a person sees where the model
    meets something it was not trained on. ``seg``: the label map, outlined in white."""
    from PIL import Image, ImageDraw

    lo, hi = float(np.nanmin(score)), float(np.nanmax(score))
    norm = (score - lo) / (hi - lo) if hi > lo else np.zeros_like(score)

    def colourise(g: np.ndarray, sl: tuple) -> np.ndarray:
        t = norm[sl][..., None]
        rgb = (1 - 0.8 * t) * np.repeat(g[..., None], 3, axis=2) + 0.8 * t * heat_colour(norm[sl])
        if seg is not None:
            m = seg[sl] > 0
            edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
            rgb[edge] = 255
        return rgb

    centre = np.unravel_index(int(np.nanargmax(score)), score.shape)
    panels = _slice_panels(_window(image.astype(np.float32)), spacing, centre, size, colourise)
    bar_w = 60
    width = sum(p.width for p in panels) + 8 * len(panels) + bar_w
    canvas = Image.new("RGB", (width, size + 18))
    x = 0
    for p in panels:
        canvas.paste(p, (x, (size - p.height) // 2))
        x += p.width + 8
    ramp = heat_colour(np.linspace(1, 0, size - 20))[:, None].repeat(14, 1).astype(np.uint8)
    canvas.paste(Image.fromarray(ramp), (x, 10))
    draw = ImageDraw.Draw(canvas)
    draw.text((x + 18, 6), f"{hi:.3g}", fill=(255, 255, 255))
    draw.text((x + 18, size - 16), f"{lo:.3g}", fill=(255, 255, 255))
    draw.text((4, size + 3), name, fill=(255, 255, 255))
    return _save_png(canvas, path)


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
    ``labels`` (name -> value), a legend under the slices names each colour, wrapped to the image
    width; past :data:`LEGEND_MAX_ROWS` rows it ends in "+N more" (pass the labels most worth naming
    first). Colours come from :func:`label_colour`.
    """
    from PIL import Image, ImageDraw

    def colourise(g: np.ndarray, sl: tuple) -> np.ndarray:
        rgb = np.repeat(g[..., None], 3, axis=2).astype(np.float32)
        s = seg[sl]
        for lab in np.unique(s):
            if lab != 0:
                m = s == lab
                rgb[m] = (1 - alpha) * rgb[m] + alpha * np.array(label_colour(lab), np.float32)
        return rgb

    panels = _slice_panels(_window(image.astype(np.float32)), spacing, _centre(seg > 0), size, colourise)
    width = sum(p.width for p in panels) + 8 * (len(panels) - 1)
    legend = [(str(n), int(v)) for n, v in (labels or {}).items() if int(v) != 0]
    rows = legend_layout(legend, width, ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength)
    canvas = Image.new("RGB", (width, size + (LEGEND_ROW * len(rows) + 4 if rows else 0)))
    x = 0
    for p in panels:
        canvas.paste(p, (x, (size - p.height) // 2))
        x += p.width + 8
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = size + 4 + r * LEGEND_ROW
        for x, name, value in row:
            if value is not None:
                draw.rectangle((x, y + 1, x + 10, y + 11), fill=label_colour(value))
                x += 14
            draw.text((x, y), name, fill=(255, 255, 255))
    return _save_png(canvas, path)


def write_volumes_table(path: Path, rows) -> Path:
    return write_text_atomic(path, volumes_csv(rows))


def metrics_summary_lines(summary: dict, *, max_classes: int = 20) -> list[str]:
    """One screen for an evaluation summary (``evaluate_folder``'s dict): a line per class (the
    first ``max_classes``, then a count), the foreground mean, and how many cases had an undefined
    HD95 (a structure present in only one of prediction and reference: no distance exists, so
    that case is left out of the class's HD95 mean; a mean over fewer cases than the Dice's)."""
    n = summary.get("num_cases", 0)
    tol = summary.get("nsd_tolerance_mm")
    nsd = f"NSD@{tol:g}mm" if tol is not None else "NSD"

    def line(name: str, m: dict) -> str:
        hd = "n/a" if m.get("hd95") is None else f"{m['hd95']:.2f} mm"
        undefined = m.get("n_undefined_hd95", 0)
        note = f"  (HD95 undefined in {undefined} of {n} cases)" if undefined else ""
        return f"{name:20s} Dice {m['dice']:.4f}  IoU {m['iou']:.4f}  HD95 {hd:>9s}  {nsd} {m['nsd']:.4f}{note}"

    items = list(summary["mean"].items())
    out = [line(name, m) for name, m in items[:max_classes]]
    if len(items) > max_classes:
        out.append(f"... and {len(items) - max_classes} more classes")
    if len(items) > 1 and summary.get("foreground_mean", {}).get("dice") is not None:
        out.append(line("mean (foreground)", {**summary["foreground_mean"], "n_undefined_hd95": 0}))
    per_case = summary.get("per_case", {})
    cases = sum(any(m.get("hd95") is None for m in classes.values()) for classes in per_case.values())
    n_cases = f"{n} case{'s' if n != 1 else ''}"
    out.append(
        f"{n_cases}; HD95 undefined in {cases} of them for at least one class (a structure in only one of "
        "prediction and reference), left out of those HD95 means"
        if cases
        else f"{n_cases}; HD95 defined for every case and class"
    )
    return out
