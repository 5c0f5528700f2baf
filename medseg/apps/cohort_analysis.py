"""The TotalSegmentator-paper cohort analysis: for every structure, how its volume and mean
attenuation vary with a covariate (age, typically).

Per structure and measure: Pearson r and Spearman rho with their two-sided p-values (scipy.stats),
then a multiple-testing correction over all tests of the run (Benjamini-Hochberg FDR by default,
Bonferroni reported too), and a PNG scatter plot with the least-squares line per structure.
Structures are only analysed where they were found (volume > 0) and complete (not touching the
image border, which would truncate volume) in at least ``min_cases`` cases.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from medseg.errors import DatasetError


def _float(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _truthy(v) -> bool:
    return str(v).strip().lower() in ("true", "1", "yes")


def read_table(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "cohort table not found")
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def correlations(
    rows: list[dict],
    covariate: str,
    *,
    measures: tuple[str, ...] = ("volume_ml", "hu_mean"),
    min_cases: int = 5,
    include_incomplete: bool = False,
    alpha: float = 0.05,
) -> list[dict]:
    """One record per (structure, measure) with n, Pearson/Spearman statistics and corrected p-values."""
    from scipy import stats

    if rows and covariate not in rows[0]:
        raise DatasetError(None, f"covariate {covariate!r} is not a column of the cohort table")
    series: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    for r in rows:
        x, vol = _float(r.get(covariate)), _float(r.get("volume_ml"))
        if x is None or not vol or (not include_incomplete and _truthy(r.get("touches_border"))):
            continue
        for m in measures:
            y = _float(r.get(m))
            if y is not None:
                xs, ys = series.setdefault((r["structure"], m), ([], []))
                xs.append(x)
                ys.append(y)
    out = []
    for (structure, measure), (xs, ys) in series.items():
        x, y = np.asarray(xs), np.asarray(ys)
        if len(x) < min_cases or np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        pr, sr = stats.pearsonr(x, y), stats.spearmanr(x, y)
        slope, intercept = np.polyfit(x, y, 1)
        out.append({
            "structure": structure, "measure": measure, "n": len(x),
            "pearson_r": float(pr.statistic), "pearson_p": float(pr.pvalue),
            "spearman_rho": float(sr.statistic), "spearman_p": float(sr.pvalue),
            "slope": float(slope), "intercept": float(intercept),
        })  # fmt: skip
    if out:
        for key in ("pearson_p", "spearman_p"):
            p = np.array([o[key] for o in out])
            fdr = stats.false_discovery_control(p, method="bh")
            for o, q, b in zip(out, fdr, np.minimum(1.0, p * len(p))):
                o[f"{key}_fdr"], o[f"{key}_bonferroni"] = float(q), float(b)
        for o in out:
            o["significant_fdr"] = o["pearson_p_fdr"] < alpha
    return sorted(out, key=lambda o: (o["measure"], o["pearson_p"]))


def scatter_plots(
    rows: list[dict], results: list[dict], covariate: str, folder: str | Path, *, include_incomplete: bool = False
) -> list[Path]:
    """One PNG per structure: each analysed measure against the covariate, with its fitted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    by_structure: dict[str, list[dict]] = {}
    for res in results:
        by_structure.setdefault(res["structure"], []).append(res)
    paths = []
    for structure, res_list in sorted(by_structure.items()):
        res_list = sorted(res_list, key=lambda r: (r["measure"] != "volume_ml", r["measure"]))
        fig, axes = plt.subplots(1, len(res_list), figsize=(4.2 * len(res_list), 3.6), squeeze=False)
        for ax, res in zip(axes[0], res_list):
            pts = [
                (_float(r[covariate]), _float(r[res["measure"]]))
                for r in rows
                if r["structure"] == structure
                and _float(r.get("volume_ml"))
                and (include_incomplete or not _truthy(r.get("touches_border")))
            ]
            pts = [(a, b) for a, b in pts if a is not None and b is not None]
            xs, ys = np.array(pts).T
            ax.scatter(xs, ys, s=14, alpha=0.75)
            grid = np.linspace(xs.min(), xs.max(), 2)
            ax.plot(grid, res["slope"] * grid + res["intercept"], color="crimson")
            ax.set_xlabel(covariate)
            ax.set_ylabel(res["measure"])
            ax.set_title(f"r={res['pearson_r']:.2f} q={res['pearson_p_fdr']:.2g} n={res['n']}", fontsize=9)
        fig.suptitle(structure)
        fig.tight_layout()
        path = folder / f"{structure}.png"
        tmp = folder / f".{structure}.part.png"
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        tmp.replace(path)
        paths.append(path)
    return paths


def analyse_cohort(
    table: str | Path | list[dict], covariate: str, output: str | Path, *, plots: bool = True, **kwargs
) -> dict:
    """Correlation table (``correlations_<covariate>.csv``) and scatter plots (``plots_<covariate>/``)."""
    from medseg.apps.cohort import write_table
    from medseg.io.image import check_writable_dir

    rows = table if isinstance(table, list) else read_table(table)
    out_dir = check_writable_dir(output)
    results = correlations(rows, covariate, **kwargs)
    if not results:
        raise DatasetError(None, f"no structure has enough cases with a numeric {covariate!r} to correlate")
    csv_path = write_table(results, out_dir / f"correlations_{covariate}.csv", parquet=False)[0]
    pngs: list[Path] = []
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            import sys

            print(
                "medseg: warning: matplotlib not installed; plots skipped (pip install 'medseg[cohort]')",
                file=sys.stderr,
            )
        else:
            incomplete = kwargs.get("include_incomplete", False)
            pngs = scatter_plots(
                rows, results, covariate, out_dir / f"plots_{covariate}", include_incomplete=incomplete
            )
    return {"table": csv_path, "results": results, "plots": pngs}
