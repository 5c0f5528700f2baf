"""The shipped ``hippocampus`` model: loads by name, verifies its files, segments the bundled
sample MRIs (held out from its training fold) at nnU-Net's level, through the CLI as a user runs it."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "hippocampus"


def test_bundled_model_is_self_describing():
    from medseg.io.checkpoint import available_folds, load_spec, load_weights, resolve_model

    folder = resolve_model("hippocampus")
    spec = load_spec(folder)
    assert spec.labels == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert available_folds(folder) == ["0"]
    weights = load_weights(folder / "fold_0")  # sha256-checked, no pickle
    assert sum(v.numel() for v in weights.values()) < 2_000_000
    summary = json.loads((folder / "fold_0" / "validation_summary.json").read_text())
    assert summary["num_cases"] == 42 and summary["foreground_mean"]["dice"] > 0.88
    # the sample cases were validation cases of fold 0, never trained on
    assert {"hippocampus_001", "hippocampus_035", "hippocampus_051"} <= set(summary["per_case"])


def test_demo_cli_segments_samples_at_nnunet_level(tmp_path):
    out = tmp_path / "demo"
    cli = [sys.executable, "-m", "medseg"]
    run = subprocess.run(
        cli + ["predict", "-m", "hippocampus", "-i", str(EXAMPLES / "images"), "-o", str(out), "--overlay"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "3 case(s)" in run.stdout and "Anterior (mL)" in run.stdout
    run = subprocess.run(
        cli
        + [
            "evaluate",
            "--pred",
            str(out),
            "--ref",
            str(EXAMPLES / "labels"),
            "--labels",
            str(EXAMPLES / "dataset.json"),
            "-o",
            str(out / "metrics.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("Anterior", "Posterior"):
        assert metrics["mean"][name]["dice"] > 0.85, metrics["mean"]
    rows = list(csv.DictReader((out / "volumes.csv").open()))
    cases = sorted({r["case"] for r in rows})
    assert cases == ["hippocampus_001", "hippocampus_035", "hippocampus_051"]
    assert {r["structure"] for r in rows} == {"Anterior", "Posterior"}
    for r in rows:  # each part of a human hippocampus is ~1-2.5 mL
        assert 0.8 < float(r["volume_ml"]) < 3.0, r
    from PIL import Image

    for case in cases:
        im = Image.open(out / f"{case}_overlay.png")
        assert im.width > 300 and im.height > 256


def test_export_model_copies_inference_files_and_refuses_to_clobber(tmp_path):
    from medseg.io.checkpoint import resolve_model

    src = resolve_model("hippocampus")
    cli = [sys.executable, "-m", "medseg", "export-model", "-i", str(src), "-o", str(tmp_path / "m")]
    assert subprocess.run(cli, capture_output=True, text=True).returncode == 0
    names = sorted(p.relative_to(tmp_path / "m").as_posix() for p in (tmp_path / "m").rglob("*") if p.is_file())
    assert names == [
        "fold_0/checkpoint.json",
        "fold_0/model.safetensors",
        "fold_0/training_log.jsonl",
        "fold_0/validation_summary.json",
        "model.json",
    ]
    assert (tmp_path / "m/fold_0/model.safetensors").read_bytes() == (src / "fold_0/model.safetensors").read_bytes()
    again = subprocess.run(cli, capture_output=True, text=True)
    assert again.returncode != 0 and "exists and is not empty" in again.stderr and "Traceback" not in again.stderr
    # the records a model kind reads (texture clusters, an adaptation record, a model card) travel with it
    rec = tmp_path / "rec"
    shutil.copytree(src, rec)
    for name in ("textures.json", "adaptation.json", "README.md"):
        (rec / name).write_text("{}")
    subprocess.run(cli[:4] + ["-i", str(rec), "-o", str(tmp_path / "rec_out")], check=True, capture_output=True)
    assert all(
        (tmp_path / "rec_out" / n).read_text() == "{}" for n in ("textures.json", "adaptation.json", "README.md")
    )
    # a tampered source is refused and leaves no half-written destination
    bad = tmp_path / "bad"
    subprocess.run(cli[:4] + ["-i", str(src), "-o", str(bad)], check=True, capture_output=True)
    (bad / "fold_0/model.safetensors").write_bytes(b"0" * 100)
    out = subprocess.run(cli[:4] + ["-i", str(bad), "-o", str(tmp_path / "new")], capture_output=True, text=True)
    assert out.returncode != 0 and "model.safetensors" in out.stderr
    assert not (tmp_path / "new").exists() and not (tmp_path / ".new.part").exists()
