"""Cohort mode: resumable per-case measurement (model loaded once, crash loses nothing written),
the cohort table (CSV + Parquet), and the volume/attenuation-vs-covariate analysis.

The covariate used here, ``age_made_up``, is MADE UP FOR THE TEST: a linear function of each
case's anterior-hippocampus volume plus noise, so the analysis has a real signal to find in
real images and manual labels. It says nothing about real ageing."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import HIPPO_SHARED as HIPPO  # 30 cases: more than tests/fixtures ships
from conftest import require

from medseg.apps.cohort import read_cohort, run_cohort
from medseg.apps.cohort_analysis import analyse_cohort, correlations
from medseg.errors import DatasetError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "hippocampus"
CLI = [sys.executable, "-m", "medseg"]


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def made_up_cohort(tmp_path_factory) -> Path:
    """30 real cases with manual labels and a MADE-UP age that tracks anterior volume."""
    from medseg.io.image import read_image

    require(HIPPO)
    rng = np.random.default_rng(0)
    rows = []
    for label in sorted((HIPPO / "labelsTr").glob("*.nii.gz"))[:30]:
        case = label.name[: -len(".nii.gz")]
        seg, meta = read_image(label)
        anterior_ml = (seg == 1).sum() * np.prod(meta.spacing) / 1000
        rows.append(
            {
                "path": str(HIPPO / "imagesTr" / f"{case}_0000.nii.gz"),
                "case": case,
                "seg": str(label),
                "age_made_up": round(20 + 40 * (anterior_ml - 1.0) + rng.normal(0, 4), 1),
                "sex": "F",
            }
        )
    return _write_csv(tmp_path_factory.mktemp("cohort") / "cohort.csv", rows)


def test_table_and_analysis_find_the_planted_correlation(made_up_cohort, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        CLI
        + [
            "cohort",
            "-i",
            str(made_up_cohort),
            "-o",
            str(out),
            "--class-map",
            str(HIPPO / "dataset.json"),
            "--analyse",
            "age_made_up",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    rows = list(csv.DictReader((out / "cohort.csv").open()))
    assert len(rows) == 60 and {r["structure"] for r in rows} == {"Anterior", "Posterior"}
    assert {"case", "age_made_up", "sex", "volume_ml", "hu_mean", "touches_border"} <= set(rows[0])
    pq = pytest.importorskip("pyarrow.parquet")
    assert pq.read_table(out / "cohort.parquet").num_rows == 60
    res = {(r["structure"], r["measure"]): r for r in csv.DictReader((out / "correlations_age_made_up.csv").open())}
    ant = res[("Anterior", "volume_ml")]
    assert float(ant["pearson_r"]) > 0.8 and float(ant["pearson_p_fdr"]) < 1e-6 and ant["significant_fdr"] == "True"
    for r in res.values():  # corrections never make a p-value smaller; Bonferroni is the stricter one
        assert float(r["pearson_p"]) <= float(r["pearson_p_fdr"]) <= float(r["pearson_p_bonferroni"]) + 1e-12
    assert (out / "plots_age_made_up" / "Anterior.png").stat().st_size > 5000
    assert "Anterior" in run.stdout and "significant at FDR" in run.stdout


def test_correlations_match_scipy_directly(made_up_cohort):
    from scipy import stats

    res = run_cohort(
        made_up_cohort, made_up_cohort.parent / "direct", class_map=str(HIPPO / "dataset.json"), echo=lambda *_: None
    )
    out = {(r["structure"], r["measure"]): r for r in correlations(res["rows"], "age_made_up")}
    pts = [(float(r["age_made_up"]), r["volume_ml"]) for r in res["rows"] if r["structure"] == "Posterior"]
    x, y = np.array(pts).T
    assert out[("Posterior", "volume_ml")]["spearman_rho"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert out[("Posterior", "volume_ml")]["n"] == 30


def test_model_run_is_resumable_and_loses_nothing_on_failure(tmp_path):
    images = sorted((EXAMPLES / "images").glob("*.nii.gz"))
    bad = tmp_path / "broken_0000.nii.gz"
    bad.write_bytes(images[0].read_bytes()[:2000])  # a truncated copy: this case must fail alone
    rows = [{"path": str(p), "age_made_up": 30 + 10 * i} for i, p in enumerate(images[:2])]
    out = tmp_path / "out"
    first = run_cohort(
        _write_csv(tmp_path / "a.csv", rows + [{"path": str(bad), "age_made_up": 99}]),
        out,
        model="hippocampus",
        tta=False,
        echo=lambda *_: None,
    )
    assert first["ran"] == 3 and list(first["failed"]) == ["broken"] and "broken" in first["failed"]["broken"]
    assert sorted(p.name for p in (out / "cases").iterdir()) == ["hippocampus_001.json", "hippocampus_035.json"]
    assert (out / "segmentations" / "hippocampus_001.nii.gz").exists()
    rows.append({"path": str(images[2]), "age_made_up": 50})
    second = run_cohort(_write_csv(tmp_path / "b.csv", rows), out, model="hippocampus", tta=False, echo=lambda *_: None)
    assert second["skipped"] == 2 and second["ran"] == 1 and not second["failed"]
    table = list(csv.DictReader((out / "cohort.csv").open()))
    assert sorted({r["case"] for r in table}) == ["hippocampus_001", "hippocampus_035", "hippocampus_051"]
    assert json.loads((out / "failed.json").read_text()) == {}
    assert all(0.8 < float(r["volume_ml"]) < 3.0 for r in table)


def test_parallel_workers_give_the_same_table(made_up_cohort, tmp_path):
    serial = run_cohort(made_up_cohort, tmp_path / "s", class_map=str(HIPPO / "dataset.json"), echo=lambda *_: None)
    parallel = run_cohort(
        made_up_cohort, tmp_path / "p", class_map=str(HIPPO / "dataset.json"), workers=2, echo=lambda *_: None
    )
    assert parallel["rows"] == serial["rows"]


def test_ray_backend_same_code_path(made_up_cohort, tmp_path):
    pytest.importorskip("ray")
    ray_res = run_cohort(
        made_up_cohort,
        tmp_path / "r",
        class_map=str(HIPPO / "dataset.json"),
        backend="ray",
        workers=2,
        echo=lambda *_: None,
    )
    local = run_cohort(made_up_cohort, tmp_path / "l", class_map=str(HIPPO / "dataset.json"), echo=lambda *_: None)
    assert ray_res["rows"] == local["rows"]


def test_bad_cohort_csv_is_a_one_line_error(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("file,age\nx.nii.gz,3\n")
    with pytest.raises(DatasetError, match="'path' column"):
        read_cohort(f)
    f.write_text("path,age\nmissing.nii.gz,3\n")
    run = subprocess.run(
        CLI + ["cohort", "-i", str(f), "-o", str(tmp_path / "o"), "-m", "hippocampus"], capture_output=True, text=True
    )
    assert run.returncode != 0 and "line 2" in run.stderr and "Traceback" not in run.stderr


def test_analysis_needs_numeric_covariate(made_up_cohort, tmp_path):
    res = run_cohort(made_up_cohort, tmp_path / "o", class_map=str(HIPPO / "dataset.json"), echo=lambda *_: None)
    with pytest.raises(DatasetError, match="sex"):
        analyse_cohort(res["rows"], "sex", tmp_path / "a")
