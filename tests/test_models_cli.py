"""Every registered model is a first-class citizen of the real command line, and so is a third-party one.

Generated from the registry at collection time (built-ins plus ``medseg.models`` entry points): each model
is trained for one tiny epoch (its registry ``test_config``) on three real hippocampus cases with
``python -m medseg train --model NAME`` and then run by ``medseg predict`` (the final full-volume
validation is skipped: predict covers inference, and it keeps the file inside its time budget). Models whose optional
dependencies are missing are skipped with the reason. A fake installed distribution checks entry-point
discovery, a broken plugin, and ``medseg models`` (text and JSON).

The CLI runs are subprocesses started two at a time (the file's budget is ~60 s on 2 cores); each
parametrised test waits for its own model's run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import HIPPO, copy_hippo_cases, require
from typer.testing import CliRunner

from medseg.cli import app
from medseg.io.image import read_image
from medseg.models import get_entry, list_models
from medseg.tasks import TASKS

MODELS = list_models()
# models the sliding-window pipeline trains and predicts (prompt models go through `medseg sam`)
TILED = [n for n in MODELS if TASKS.get(get_entry(n).task).sliding_window]
TRAIN_CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004"]  # 2 train / 1 val in fold 0
PREDICT_CASE = "hippocampus_015"  # not trained on
PLUGIN_MODEL = "toy_plugin_net"
TRAIN_TEST, PLUGIN_TEST = "test_train_and_predict_through_cli", "test_third_party_model_trains_and_predicts"


def medseg(*args, cwd: Path, pythonpath: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDSEG_WORKSPACE": str(cwd / "default_ws")}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "medseg", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    if check:
        assert proc.returncode == 0, _report(args, proc)
    return proc


def _report(args, proc) -> str:
    return f"medseg {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def tiny_kwargs(name: str) -> dict:
    """The registry's tiny test configuration, minus the test-only input size."""
    return {k: v for k, v in get_entry(name).test_config.items() if k != "input_size"}


def missing_requirements(name: str) -> list[str]:
    return [m for m, ok in get_entry(name).available().items() if not ok]


# ------------------------------------------------------------------------ a fake installed plugin
PLUGIN_MODULE = '''
import torch.nn as nn

from medseg.models import register_model


@register_model("toy_plugin_net", test_config={"width": 2}, description="toy third-party network")
def build_toy(in_channels, num_classes, *, spatial_dims=3, deep_supervision=True, width=4):
    """Fixed topology, no strides: the trainer must not pass the plan's."""
    conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    return nn.Sequential(conv(in_channels, width, 3, padding=1), nn.LeakyReLU(), conv(width, num_classes, 1))


@register_model("toy_needs_absent_dep", requires=("medseg_test_absent_dependency",), description="needs a dep")
def build_absent(in_channels, num_classes, **kwargs):
    import medseg_test_absent_dependency  # noqa: F401
'''


def _fake_distribution(root: Path, dist: str, module: str, source: str, entry_points: dict[str, str]) -> None:
    """What ``pip install`` leaves on sys.path: the module and a ``*.dist-info`` with its entry points."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[medseg.models]\n{lines}")
    (info / "RECORD").write_text("")


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site")
    _fake_distribution(
        root,
        "toy_medseg_models",
        "toy_medseg_models",
        PLUGIN_MODULE,
        {PLUGIN_MODEL: "toy_medseg_models", "toy_needs_absent_dep": "toy_medseg_models"},
    )
    _fake_distribution(
        root,
        "broken_medseg_models",
        "broken_medseg_models",
        'raise ImportError("needs libfancy, which is not installed")\n',
        {"broken_net": "broken_medseg_models"},
    )
    return root


# ------------------------------------------------------------------------ plan + preprocess once, then train
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A 3-case real dataset, planned and preprocessed by the CLI; one unseen image to predict."""
    require(HIPPO)
    work = tmp_path_factory.mktemp("models_cli")
    data = copy_hippo_cases(work / "Dataset004_Hippocampus", TRAIN_CASES)
    ws = work / "ws"
    for args in (["plan", data, "-w", ws], ["preprocess", data, "-w", ws, "--workers", "1"]):
        res = CliRunner().invoke(app, list(map(str, args)))  # in-process: the subprocesses are for the models
        assert res.exit_code == 0, res.output
    inp = work / "predict_in"
    inp.mkdir()
    shutil.copyfile(HIPPO / "imagesTr" / f"{PREDICT_CASE}_0000.nii.gz", inp / f"{PREDICT_CASE}_0000.nii.gz")
    return work, data, ws, inp


def _train_and_predict(prepared, name: str, kwargs: dict, pythonpath: Path | None = None) -> dict:
    work, data, ws, inp = prepared
    out, pred = work / f"model_{name}", work / f"pred_{name}"
    train_args = [
        "train", data, "-w", ws, "--arch", name, "--model-kwargs", json.dumps(kwargs),
        "--epochs", "1", "--iterations", "2", "--val-iterations", "1", "--checkpoint-every", "1",
        "--threads", "1", "--no-validation", "-o", out,
    ]  # fmt: skip
    if kwargs.get("spatial_dims") == 2:  # a 2D-only model trains in the plan's 2d configuration
        train_args += ["-c", "2d"]
    train = medseg(*train_args, cwd=work, pythonpath=pythonpath, check=False)
    result = {"train": train, "train_args": train_args, "out": out, "pred": pred, "predict": None}
    if train.returncode == 0:
        result["predict_args"] = ["predict", "-m", out, "-i", inp, "-o", pred, "--no-tta"]
        result["predict"] = medseg(*result["predict_args"], cwd=work, pythonpath=pythonpath, check=False)
    return result


def _selected(session, test_name: str) -> list:
    return [
        getattr(item, "callspec", None) and item.callspec.params.get("name")
        for item in session.items
        if getattr(item, "originalname", item.name) == test_name
    ]


@pytest.fixture(scope="module")
def cli_runs(request, prepared, plugin_path):
    """One train + predict job per model this session selected, two subprocesses at a time."""
    jobs = {
        n: (tiny_kwargs(n), None)
        for n in _selected(request.session, TRAIN_TEST)
        if n in MODELS and not missing_requirements(n)
    }
    if _selected(request.session, PLUGIN_TEST):
        jobs[PLUGIN_MODEL] = ({"width": 2}, plugin_path)
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {n: pool.submit(_train_and_predict, prepared, n, kw, path) for n, (kw, path) in jobs.items()}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _check_run(name: str, run: dict, kwargs: dict) -> None:
    train, predict = run["train"], run["predict"]
    assert train.returncode == 0, _report(run["train_args"], train)
    assert f"training {name} " in train.stderr
    spec = json.loads((run["out"] / "model.json").read_text())
    assert spec["model"] == name, "model.json records the registry name"
    assert {k: spec["model_kwargs"].get(k) for k in kwargs} == kwargs
    fold = run["out"] / "fold_0"
    assert (fold / "model.safetensors").is_file() and (fold / "checkpoint.json").is_file()
    assert (fold / "training_state.pt").is_file()  # --checkpoint-every 1: resumable
    assert [json.loads(line)["epoch"] for line in (fold / "training_log.jsonl").read_text().splitlines()] == [1]

    assert predict.returncode == 0, _report(run["predict_args"], predict)
    seg, seg_meta = read_image(run["pred"] / f"{PREDICT_CASE}.nii.gz")
    img, img_meta = read_image(HIPPO / "imagesTr" / f"{PREDICT_CASE}_0000.nii.gz")
    assert seg.shape == img.shape, "label map on the input's grid"
    np.testing.assert_allclose(seg_meta.spacing, img_meta.spacing)
    assert np.issubdtype(seg.dtype, np.integer) and set(np.unique(seg)) <= {0, 1, 2}


@pytest.mark.parametrize("name", TILED)
def test_train_and_predict_through_cli(name, cli_runs):
    missing = missing_requirements(name)
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)} (optional dependency not installed)")
    _check_run(name, cli_runs[name].result(), tiny_kwargs(name))


def test_third_party_model_trains_and_predicts(cli_runs):
    """An entry-point model without strides in its signature trains on a plan made for the U-Net."""
    _check_run(PLUGIN_MODEL, cli_runs[PLUGIN_MODEL].result(), {"width": 2})


# ------------------------------------------------------------------------ discovery and `medseg models`
def _one_warning(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "broken_net" in lines[0] and "ImportError" in lines[0] and "libfancy" in lines[0]
    return lines[0]


JSON_KEYS = {
    "name", "description", "task", "encoder", "head", "requires", "available", "patch", "in_channels", "num_classes",
    "params", "flops", "macs", "topology", "test_config_params", "error",
}  # fmt: skip


def test_models_command_json_with_entry_point_plugins(plugin_path, tmp_path):
    """The fake distribution's models are listed (and built: ``test_config_params`` comes from
    ``create_model``; the plugin's train/predict test builds it through the trainer and predictor); the
    broken plugin is one warning line and everything else still works."""
    js = medseg(
        "models", "--patch", "40", "56", "40", "--num-classes", "3", "--json", cwd=tmp_path, pythonpath=plugin_path
    )
    _one_warning(js.stderr)
    rows = {r["name"]: r for r in json.loads(js.stdout)}
    assert {*MODELS, PLUGIN_MODEL, "toy_needs_absent_dep"} <= set(rows) and "broken_net" not in rows
    for name, r in rows.items():
        assert set(r) == JSON_KEYS, name
        assert r["patch"] == [40, 56, 40] and r["num_classes"] == 3 and r["in_channels"] == 1
        if not r["available"]:
            continue
        assert r["error"] is None, (name, r["error"])
        assert r["params"] > 0 and r["flops"] > 0 and r["flops"] == 2 * r["macs"], name
        fixed = name in MODELS and get_entry(name).input_shape  # SAM models: measured at their own input
        expected = (f"fixed input {'x'.join(map(str, fixed))}",) if fixed else ("default", "planned")
        assert r["topology"] in expected and r["test_config_params"] > 0, name
    absent = rows["toy_needs_absent_dep"]
    assert absent["requires"] == {"medseg_test_absent_dependency": False} and not absent["available"]
    assert absent["params"] is None and absent["flops"] is None
    toy = rows[PLUGIN_MODEL]
    assert toy["requires"] == {} and toy["available"] and toy["description"] == "toy third-party network"
    assert toy["params"] == 1 * 4 * 27 + 4 + 4 * 3 + 3  # default width 4, 3 classes, on the meta device
    assert toy["test_config_params"] == 1 * 2 * 27 + 2 + 2 * 2 + 2  # create_model(..., 1, 2, width=2)
    assert toy["task"] == "segmentation" and toy["encoder"] == [] and toy["head"] == []  # registry defaults
    assert rows["unet"]["task"] == "segmentation" and rows["unet"]["encoder"] == ["encoder"]
    assert rows["unet"]["head"] == ["heads"]
    # ResEnc's default 6-stage topology cannot take 40x56x40: it is measured as planned for the patch
    assert rows["resenc_m"]["topology"] == "planned" and rows["unet"]["topology"] == "default"


def test_models_command_text(monkeypatch):
    """Columns: name, parameters, GFLOPs at --patch, optional dependencies, description (in-process: the
    subprocess path is covered by the JSON test)."""
    from medseg.models import register_model, registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_model("needs_absent_dep", requires=("medseg_test_absent_dependency",), description="x")(lambda *a: None)
    res = CliRunner().invoke(app, ["models", "--patch", "40", "56", "40", "--num-classes", "3"])
    assert res.exit_code == 0, res.output
    header, *lines = res.stdout.splitlines()
    assert re.match(r"name\s+params\s+GFLOPs\s+requires\s+description", header) and "patch 40x56x40" in header
    by_name = {line.split()[0]: line for line in lines}
    assert set(by_name) == {*MODELS, "needs_absent_dep"}
    from medseg.models.flops import measure

    unet = measure("unet", (40, 56, 40), num_classes=3)
    assert re.match(rf"unet\s+{unet.params / 1e6:.2f}M\s+{unet.flops / 1e9:.1f}\s+-\s+nnU-Net", by_name["unet"])
    assert re.match(
        r"needs_absent_dep\s+n/a\s+n/a\s+medseg_test_absent_dependency MISSING\s+x", by_name["needs_absent_dep"]
    )
    for name in MODELS:
        deps = ", ".join(f"{m} {'ok' if ok else 'MISSING'}" for m, ok in get_entry(name).available().items()) or "-"
        assert re.match(rf"{name}\s+(\d+\.\d\dM|n/a)\s+(\d+\.\d|n/a)\s+{re.escape(deps)}\s", by_name[name])
    assert "[topology planned for the patch]" in by_name["resenc"]


def test_plan_preset_adds_a_resenc_configuration(prepared, tmp_path):
    """`medseg plan --preset resenc_m` adds 3d_fullres_resenc_m, planned for ResEnc M (in-process CLI)."""
    from medseg.planning.plan import Plan

    _, data, _, _ = prepared
    ws = tmp_path / "ws"
    res = CliRunner().invoke(app, ["plan", str(data), "-w", str(ws), "--preset", "resenc_m"])
    assert res.exit_code == 0, res.output
    assert re.search(r"^3d_fullres_resenc_m .*model resenc_m$", res.stdout, re.M)
    plan = Plan.load(next(ws.glob("preprocessed/*/plan.json")))
    cfg, full = plan.configuration("3d_fullres_resenc_m"), plan.configuration("3d_fullres")
    assert cfg.model == "resenc_m" and cfg.spacing == full.spacing
    assert cfg.model_kwargs["blocks_per_stage"] == [1, 3, 4, 6][: len(cfg.model_kwargs["strides"])]
    bad = CliRunner().invoke(app, ["plan", str(data), "-w", str(ws), "--preset", "resenc_xl"])
    assert bad.exit_code == 2 and "--preset: unknown resenc_xl" in bad.stderr


def test_unknown_model_is_a_one_line_error(prepared):
    _, data, ws, _ = prepared
    res = CliRunner().invoke(app, ["train", str(data), "-w", str(ws), "--arch", "no_such_net", "--epochs", "1"])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith("medseg: error: --arch: unknown model 'no_such_net'") and "unet" in res.stderr
