"""Previews and overlays a person reads: one colour per label for 100+ classes, and a legend that
stays on the canvas (wrapped, then "+N more")."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from medseg.ct.class_maps import load_class_map
from medseg.evaluation.report import LEGEND_MAX_ROWS, label_colour, legend_layout, overlay_png


def _distances(values):
    c = np.array([label_colour(v) for v in values], float)
    d = np.sqrt(((c[:, None] - c[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return c, d


def test_colours_do_not_repeat_for_255_labels_and_none_is_black():
    c, d = _distances(range(1, 256))
    assert d.min() > 10  # no two labels of 255 share (or nearly share) a colour
    assert c.sum(1).min() > 150 and c.sum(1).max() < 3 * 250  # never black (the image) nor white
    assert label_colour(0) == (0, 0, 0)
    _, first = _distances(range(1, 13))
    assert first.min() > 40  # small models (hippocampus, 12 structures): clearly different colours
    total = load_class_map("total")  # the old 12-colour list gave liver (5) and hip_left (77) one colour
    assert np.abs(np.subtract(label_colour(total["liver"]), label_colour(total["hip_left"]))).sum() > 60
    assert all(sum(label_colour(v)) > 150 for v in (12, 24, 36, 48, 96))  # multiples of 12 were black


def test_legend_of_117_structures_stays_on_the_canvas():
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries = [(n, v) for n, v in load_class_map("total").items()]
    rows = legend_layout(entries, 700, draw.textlength)
    assert len(rows) == LEGEND_MAX_ROWS
    for row in rows:
        for x, text, value in row:
            right = x + (14 if value is not None else 0) + draw.textlength(text)
            assert 0 <= x and right <= 700 - 4, (x, text)
    shown = [t for row in rows for _, t, v in row if v is not None]
    more = rows[-1][-1]
    assert more[2] is None and more[1] == f"+{len(entries) - len(shown)} more"
    assert shown == [n for n, _ in entries[: len(shown)]]  # the first ones, in the order given
    # few labels: one row, everything named; a name longer than the canvas is cut, not spilled
    (row,) = legend_layout([("a", 1), ("b", 2)], 700, draw.textlength)
    assert [(t, v) for _, t, v in row] == [("a", 1), ("b", 2)]
    (row,) = legend_layout([("x" * 500, 1)], 200, draw.textlength)
    assert row[0][1].endswith("...") and 4 + 14 + draw.textlength(row[0][1]) <= 200 - 4


def test_overlay_with_many_labels_has_a_bounded_legend(tmp_path):
    seg = np.zeros((20, 40, 40), np.uint8)
    for v in range(1, 118):  # 117 little cubes
        z, y, x = divmod(v, 20)[1] % 20, (v * 7) % 38, (v * 13) % 38
        seg[z, y : y + 2, x : x + 2] = v
    image = np.random.default_rng(0).normal(size=seg.shape).astype(np.float32)
    labels = load_class_map("total")
    out = overlay_png(image, seg, (1.0, 1.0, 1.0), tmp_path / "p.png", size=200, labels=labels)
    im = Image.open(out)
    assert im.height <= 200 + 16 * LEGEND_MAX_ROWS + 4  # the legend is capped, not 117 entries long
    assert im.height > 200  # and present
