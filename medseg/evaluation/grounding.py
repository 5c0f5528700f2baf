"""Grounding metrics as ConTEXTual Net reports them: was the lesion a sentence names found?

For one sentence, its predicted mask and the reference lesion (the label) on the SUV PET:

* every 6-connected component of the prediction is a **true positive** when it overlaps the label
  and its SUVmax is within ``tol`` (0.1 SUV, the paper's rule) of the label's SUVmax; the other
  components are **false positives** (a second matching component is a duplicate, counted as
  neither: the sentence names one lesion);
* a sentence whose lesion no component matches adds one **false negative**.

F1 = 2 TP / (2 TP + FP + FN), pooled over sentences (not averaged per sentence). Alongside it the
Dice of the whole prediction against the label, and ``hit``: the prediction overlaps the label at all.
"""

from __future__ import annotations

import numpy as np

SUV_TOL = 0.1


def match_components(pred: np.ndarray, label: np.ndarray, pet: np.ndarray, tol: float = SUV_TOL) -> dict:
    """``{"tp", "fp", "fn", "dice", "hit", "components", "suvmax_label", "suvmax_pred"}`` of one
    sentence; ``pred``, ``label`` (non-zero = lesion) and ``pet`` on one grid."""
    import cc3d

    pred, label = np.asarray(pred) > 0, np.asarray(label) > 0
    if pred.shape != label.shape or pet.shape != label.shape:
        raise ValueError(f"shapes differ: prediction {pred.shape}, label {label.shape}, PET {pet.shape}")
    if not label.any():
        raise ValueError("the label is empty: a grounding sentence names a lesion")
    ref_max = float(pet[label].max())
    cc, n = cc3d.connected_components(pred, connectivity=6, return_N=True)
    matched = fp = 0
    for i in range(1, n + 1):
        comp = cc == i
        if (comp & label).any() and abs(float(pet[comp].max()) - ref_max) <= tol + 1e-6:
            matched += 1
        else:
            fp += 1
    inter = int((pred & label).sum())
    return {"tp": int(matched > 0), "fp": fp, "fn": int(matched == 0), "components": int(n),
            "dice": 2 * inter / (int(pred.sum()) + int(label.sum())), "hit": inter > 0,
            "suvmax_label": round(ref_max, 3),
            "suvmax_pred": round(float(pet[pred].max()), 3) if pred.any() else None}  # fmt: skip


def pooled_f1(tp: int, fp: int, fn: int) -> float | None:
    """2 TP / (2 TP + FP + FN); None when there is nothing to count."""
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else None
