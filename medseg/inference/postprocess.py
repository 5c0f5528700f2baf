"""Connected-component postprocessing (keep the largest component per class)."""

from __future__ import annotations

import numpy as np


def keep_largest_component(seg: np.ndarray, labels=None) -> np.ndarray:
    """For each label (default: every foreground label) keep only its largest 26-connected part."""
    import cc3d

    out = seg.copy()
    labels = [int(v) for v in np.unique(seg) if v != 0] if labels is None else labels
    for lab in labels:
        mask = seg == lab
        if not mask.any():
            continue
        cc, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
        if n <= 1:
            continue
        sizes = np.bincount(cc.ravel())
        sizes[0] = 0
        out[mask & (cc != int(np.argmax(sizes)))] = 0
    return out
