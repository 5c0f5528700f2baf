"""Out-of-distribution (OOD) localisation: how well a voxel-wise OOD score map (higher = more OOD)
singles out the lesions of OOD cases, at voxel level (AUROC, AUPR, FPR at 95 % TPR) and case level.

Positives are the reference lesion voxels (label > 0) of the cases named OOD; negatives are every
other voxel of every evaluated volume: background everywhere, and the lesions of inlier cases, which
a good OOD map must not flag merely for being lesions. The metrics are computed exactly from sorted
scores (no histogram binning, as some benchmark scripts do), so tied scores count as ties and tens
of millions of voxels take seconds.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from medseg.errors import DatasetError
from medseg.io.image import image_suffix, read_image, strip_suffix
from medseg.io.verify import grid_problem, nonfinite_problem

DEFAULT_GROUP = "ood"  # the one group of an OOD case list without groups
PIXEL_METRICS = ("auroc", "aupr", "fpr95")
# 8-bit pictures, never a score map: `predict --overlay` writes CASE_ood.png (the map drawn over the
# image) beside CASE_ood.nii.gz, and a natural-image dataset's float maps go to TIFF
PICTURES = (".png", ".bmp")


def _checked(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Flat scores (floating, NaN refused) and boolean labels with both classes present."""
    s = np.asarray(scores).ravel()
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    y = np.asarray(labels).ravel().astype(bool, copy=False)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if np.isnan(s).any():
        raise ValueError(f"{int(np.isnan(s).sum())} scores are NaN")
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0:
        raise ValueError("no positives: the metric is undefined without OOD (positive) samples")
    if n_pos == y.size:
        raise ValueError("no negatives: the metric is undefined without inlier (negative) samples")
    return s, y


def _auroc(s: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos n_neg): tied scores get their average rank, so a tied pair counts 1/2."""
    n_pos = int(np.count_nonzero(y))
    n_neg = y.size - n_pos
    u = rankdata(s)[y].sum(dtype=np.float64) - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def _curve(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (true, false) positive counts for "score >= t" at each distinct score t, highest t
    first: tied scores enter together, so no order among ties can change a metric."""
    order = np.argsort(s)[::-1]
    s_sorted = s[order]
    ends = np.append(np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s_sorted.size - 1)  # `!=`: inf == inf
    tps = np.cumsum(y[order], dtype=np.int64)[ends]
    return tps, ends + 1 - tps


def _average_precision(tps: np.ndarray, fps: np.ndarray) -> float:
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _fpr_at_tpr(tps: np.ndarray, fps: np.ndarray, tpr: float) -> float:
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    first = int(np.argmax(tps / tps[-1] >= tpr))  # the highest threshold reaching it (the lowest always does)
    return float(fps[first] / fps[-1])


def auroc(scores, labels) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting one half."""
    return _auroc(*_checked(scores, labels))


def average_precision(scores, labels) -> float:
    """AUPR as average precision, sum of (R_n - R_{n-1}) P_n over the distinct score thresholds
    (highest first); unlike the trapezoidal area, it never interpolates precision optimistically."""
    return _average_precision(*_curve(*_checked(scores, labels)))


def fpr_at_tpr(scores, labels, tpr: float = 0.95) -> float:
    """False-positive rate at the highest threshold (a distinct score) whose true-positive rate is at
    least ``tpr``: the share of negatives flagged when ``tpr`` of the positives must be found."""
    return _fpr_at_tpr(*_curve(*_checked(scores, labels)), tpr)


def pixel_metrics(scores, labels) -> dict[str, float]:
    """AUROC, AUPR and FPR95 together, sorting the scores once for AUPR and FPR95."""
    s, y = _checked(scores, labels)
    tps, fps = _curve(s, y)
    return {"auroc": _auroc(s, y), "aupr": _average_precision(tps, fps), "fpr95": _fpr_at_tpr(tps, fps, 0.95)}


def read_ood_cases(path: str | Path) -> dict[str, str]:
    """Case id -> group from a text file: one case id a line (all in group "ood"), or CSV whose header
    has ``case`` and ``group`` columns. ``#`` starts a comment; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "OOD case list not found")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DatasetError(path, "OOD case list is not a text file") from None
    lines = [(n, line.split("#", 1)[0].strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line]
    if not lines:
        raise DatasetError(path, "OOD case list holds no case ids (one a line, or CSV with case,group columns)")
    if "," in lines[0][1]:
        return _csv_cases(path, lines)
    cases = {}
    for n, line in lines:
        if "," in line or len(line.split()) != 1:
            raise DatasetError(path, f"line {n}: expected one case id, got {line!r}")
        cases[line] = DEFAULT_GROUP
    return cases


def _csv_cases(path: Path, lines: list[tuple[int, str]]) -> dict[str, str]:
    rows = list(csv.reader(line for _, line in lines))
    header = [h.strip().lower() for h in rows[0]]
    if "case" not in header or "group" not in header:
        raise DatasetError(
            path, f"line {lines[0][0]}: a CSV header needs 'case' and 'group' columns, got {lines[0][1]!r}"
        )
    ci, gi = header.index("case"), header.index("group")
    cases: dict[str, str] = {}
    for (n, _), row in zip(lines[1:], rows[1:]):
        if len(row) != len(header):
            raise DatasetError(path, f"line {n}: {len(row)} fields, the header has {len(header)}")
        case, group = row[ci].strip(), row[gi].strip()
        if not case or not group:
            raise DatasetError(path, f"line {n}: empty case or group")
        if cases.get(case, group) != group:
            raise DatasetError(path, f"line {n}: case {case} is already in group {cases[case]}")
        cases[case] = group
    if not cases:
        raise DatasetError(path, "no cases below the CSV header")
    return cases


def _group_map(ood_cases: Mapping[str, str] | Iterable[str]) -> dict[str, str]:
    if isinstance(ood_cases, (str, bytes, Path)):
        raise ValueError("ood_cases: expected case ids (a list, a set or a {case: group} mapping), got one string")
    if isinstance(ood_cases, Mapping):
        return {str(c): str(g) for c, g in ood_cases.items()}
    return {str(c): DEFAULT_GROUP for c in ood_cases}


def _images_by_case(folder: Path) -> dict[str, list[Path]]:
    """The image files in ``folder`` by case id (the name without its image ending); hidden files and
    non-images (volumes.csv, .npz probabilities) are skipped."""
    if not folder.is_dir():
        raise DatasetError(folder, "folder not found")
    found: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if not p.name.startswith(".") and p.is_file() and image_suffix(p) is not None:
            found.setdefault(strip_suffix(p), []).append(p)
    return found


def _one(case: str, paths: list[Path]) -> Path:
    if len(paths) > 1:
        raise DatasetError(paths[1], f"a second image for {case} (also {paths[0].name}); keep one")
    return paths[0]


def _matched_files(pred_dir: Path, ref_dir: Path, cases, suffix: str) -> list[tuple[str, Path, Path]]:
    """(case, score map, reference) for ``cases`` (default: every case with a label map or a score map
    in ``pred_dir``), pairing ``pred_dir/CASE_ood.ext`` with ``ref_dir/CASE.ext`` as ``evaluate``
    pairs label maps."""
    preds = _images_by_case(pred_dir)
    maps = {c[: -len(suffix)]: ps for c, ps in preds.items() if c.endswith(suffix)}
    scores = {c: kept for c, ps in maps.items() if (kept := [p for p in ps if image_suffix(p) not in PICTURES])}
    # predict's side outputs beside CASE (CASE_overlay.png, CASE_ood*, ...) are not cases
    from medseg.evaluation.metrics import _side_output

    labels = {c for c in preds if not c.endswith(suffix) and not _side_output(c, set(preds))}
    names = sorted(labels | set(scores)) if cases is None else sorted(dict.fromkeys(map(str, cases)))
    if not names:
        raise ValueError(f"{pred_dir}: no OOD score maps (CASE{suffix}.nii.gz) to evaluate")
    missing = [n for n in names if n not in scores]
    if missing:
        ending = image_suffix(preds[missing[0]][0]) if missing[0] in preds else ".nii.gz"
        first = pred_dir / f"{missing[0]}{suffix}{'.tif' if ending in PICTURES else ending}"
        raise DatasetError(first, f"OOD score map missing ({len(missing)} of {len(names)} cases have none)")
    refs = _images_by_case(ref_dir)
    for n in names:
        if n not in refs:
            ending = image_suffix((preds.get(n) or scores[n])[0])
            raise DatasetError(ref_dir / f"{n}{ending}", "reference label map missing for this case")
    return [(n, _one(n + suffix, scores[n]), _one(n, refs[n])) for n in names]


def _read_case(score_path: Path, ref_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Flat scores and lesion mask (reference label > 0) of one case, on one voxel grid."""
    score, sm = read_image(score_path)
    ref, rm = read_image(ref_path)
    reason = grid_problem(sm, rm, f"reference {ref_path.name}") or nonfinite_problem(score)
    if reason:
        raise DatasetError(score_path, reason)
    return score.ravel(), (ref > 0).ravel()


def _case_auroc(per_case: dict[str, dict], group: str | None = None) -> dict:
    """Case-level AUROC of the maximum score per volume: OOD cases (of ``group``, if given; other
    groups' cases left out) against inlier cases."""
    rows = [c for c in per_case.values() if group is None or c["group"] in (None, group)]
    is_ood = np.array([c["group"] is not None for c in rows], bool)
    if is_ood.all() or not is_ood.any():
        return {"case_auroc": None, "case_auroc_reason": f"no {'inlier' if is_ood.all() else 'OOD'} cases evaluated"}
    return {"case_auroc": auroc([c["max_score"] for c in rows], is_ood)}


def _group_metrics(s: np.ndarray, code: np.ndarray, index: int) -> dict:
    """Pixel metrics with group ``index``'s lesion voxels as positives and all negatives (code -1)."""
    mine = code == index
    positives = int(np.count_nonzero(mine))
    if positives == 0:
        return {**dict.fromkeys(PIXEL_METRICS), "positives": 0, "reason": "no lesion voxels in this group's cases"}
    keep = mine | (code < 0)  # other groups' lesions are neither positive nor negative here
    return {**pixel_metrics(s[keep], mine[keep]), "positives": positives}


def evaluate_ood(
    pred_dir: str | Path,
    ref_dir: str | Path,
    ood_cases: Mapping[str, str] | Iterable[str],
    *,
    cases: Iterable[str] | None = None,
    score_suffix: str = "_ood",
) -> dict:
    """Pixel AUROC / AUPR / FPR95 and case AUROC of the score maps ``pred_dir/CASE{score_suffix}.ext``
    against the lesions of ``ref_dir/CASE.ext``, overall and per group of ``ood_cases`` (case ids, all
    in group "ood", or a {case: group} mapping). Writes nothing."""
    if not score_suffix:
        raise ValueError("score_suffix must not be empty (score maps are CASE_ood.nii.gz beside CASE.nii.gz)")
    groups = _group_map(ood_cases)
    if isinstance(cases, str):
        raise ValueError("cases: expected a list of case ids, got one string")
    names = sorted(set(groups.values()))
    scores, codes, per_case = [], [], {}
    for case, score_path, ref_path in _matched_files(Path(pred_dir), Path(ref_dir), cases, score_suffix):
        s, lesion = _read_case(score_path, ref_path)
        group = groups.get(case)
        code = np.full(s.size, -1, np.int16)
        if group is not None:
            code[lesion] = names.index(group)
        scores.append(s)
        codes.append(code)
        per_case[case] = {"group": group, "max_score": float(s.max()), "lesion_voxels": int(lesion.sum())}
    s, code = np.concatenate(scores), np.concatenate(codes)
    positives = int(np.count_nonzero(code >= 0))
    if positives == 0:
        raise ValueError(
            f"no OOD lesion voxels: none of the {len(per_case)} evaluated cases is an OOD case with a lesion"
        )
    ood = [c for c in per_case if per_case[c]["group"] is not None]
    result = {
        "n_cases": len(per_case),
        "n_ood_cases": len(ood),
        "positives": positives,
        "negatives": s.size - positives,
    }
    result |= pixel_metrics(s, code >= 0) | _case_auroc(per_case)
    result["groups"] = {
        name: {**_group_metrics(s, code, i), "n_cases": sum(per_case[c]["group"] == name for c in ood)}
        | _case_auroc(per_case, name)
        for i, name in enumerate(names)
    }
    result["ood_cases_not_evaluated"] = sorted(set(groups) - set(per_case))
    result["score_suffix"] = score_suffix
    result["per_case"] = per_case
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def summary_lines(summary: dict) -> list[str]:
    """One screen: the counts, then AUROC / AUPR / FPR95 / case AUROC overall and per group."""
    lines = [
        f"{summary['n_cases']} cases ({summary['n_ood_cases']} OOD): {summary['positives']} OOD lesion voxels, "
        f"{summary['negatives']} others"
    ]
    rows = {"all": summary, **(summary["groups"] if len(summary["groups"]) > 1 else {})}
    width = max(map(len, rows))
    for name, m in rows.items():
        lines.append(
            f"{name:{width}s}  AUROC {_fmt(m['auroc'])}  AUPR {_fmt(m['aupr'])}  FPR95 {_fmt(m['fpr95'])}  "
            f"case AUROC {_fmt(m['case_auroc'])}  ({m['positives']} lesion voxels)"
        )
    return lines
