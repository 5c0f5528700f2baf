"""Bad input: every row of docs/bad_input.md has a test here.

Each broken input is built under a temporary folder from real hippocampus cases and fed to the
real CLI (``python -m medseg.cli``) in a subprocess. Every failure must: exit non-zero, print no
traceback, name the offending file and the problem on stderr (exactly one line, except
``verify``, which lists every problem), leave every input byte-identical, and leave no partial
output behind. A control run on undamaged copies shows each failure is due to the damage.

The ~50 CLI runs are independent, so one module fixture builds every scenario first and runs
them a few at a time; each test then checks its own scenario.
"""

from __future__ import annotations

import dataclasses
import hashlib
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

pytestmark = pytest.mark.realdata

CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
PARALLEL = 4  # concurrent CLI runs (each mostly waits on imports and I/O)


# --------------------------------------------------------------------------------------------
# helpers


def make_dataset(root: Path, cases=CASES) -> Path:
    """A copy of a few real cases in nnU-Net layout (the shared source is only read)."""
    return copy_hippo_cases(root, cases)


def run_cli(args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDSEG_WORKSPACE": str(cwd / "default_ws"), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "medseg.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (a file root is hashed itself)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_one_line_error(res: subprocess.CompletedProcess, path: Path | str, reason: str) -> str:
    """Exit code != 0, no traceback, exactly one stderr line naming ``path`` and matching ``reason``."""
    assert res.returncode != 0, f"expected failure, got rc 0\nstdout: {res.stdout}\nstderr: {res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{res.stderr}"
    line = lines[0]
    assert line.startswith("medseg: error: "), line
    assert str(path) in line, f"{path} not named in: {line}"
    assert re.search(reason, line, re.IGNORECASE), f"reason /{reason}/ not in: {line}"
    return line


def assert_verify_reports(res: subprocess.CompletedProcess, expected: list[tuple[Path, str]]) -> None:
    """``verify``: exit != 0, no traceback, every (file, reason) on a stderr line of its own."""
    assert res.returncode != 0, f"expected failure, got rc 0\nstdout: {res.stdout}\nstderr: {res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    for path, reason in expected:
        hits = [ln for ln in lines if f"{path}:" in ln and re.search(reason, ln, re.IGNORECASE)]
        assert hits, f"no stderr line names {path} with /{reason}/:\n{res.stderr}"


@dataclasses.dataclass
class Scenario:
    """CLI runs on one broken input; ``inputs`` must stay byte-identical, ``out`` must stay clean."""

    cwd: Path
    runs: dict[str, list]  # label -> CLI arguments
    inputs: list[Path]
    expected: list[tuple[Path, str]] = dataclasses.field(default_factory=list)  # (offending path, reason)
    out: Path | None = None
    before: dict = dataclasses.field(default_factory=dict)
    after: dict = dataclasses.field(default_factory=dict)
    results: dict[str, subprocess.CompletedProcess] = dataclasses.field(default_factory=dict)

    def assert_inputs_unchanged(self) -> None:
        assert self.before, "nothing snapshotted"
        assert self.after == self.before, "an input file was modified, added or removed"


def run_scenarios(scenarios: dict[str, Scenario]) -> dict[str, Scenario]:
    for sc in scenarios.values():
        sc.before = snapshot(*sc.inputs)
    jobs = [(name, label, args, sc.cwd) for name, sc in scenarios.items() for label, args in sc.runs.items()]
    with ThreadPoolExecutor(PARALLEL) as pool:
        done = list(pool.map(lambda j: (j[0], j[1], run_cli(j[2], j[3])), jobs))
    for name, label, res in done:
        scenarios[name].results[label] = res
    for sc in scenarios.values():
        sc.after = snapshot(*sc.inputs)
    return scenarios


# --------------------------------------------------------------------------------------------
# ways to break a file (all write only inside tmp_path)


def _sitk():
    import SimpleITK as sitk

    return sitk


def _write_array_like(arr: np.ndarray, ref, path: Path, spacing=None) -> None:
    sitk = _sitk()
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing or ref.GetSpacing())
    img.SetOrigin(ref.GetOrigin())
    img.SetDirection(ref.GetDirection())
    sitk.WriteImage(img, str(path))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    path.write_bytes(bytes(data))


def not_an_image(path: Path) -> None:
    path.write_text("patient notes: this is a text file, not an image\n")


def crop_shape(path: Path) -> None:
    sitk = _sitk()
    img = sitk.ReadImage(str(path))
    _write_array_like(sitk.GetArrayFromImage(img)[:-3], img, path)


def change_spacing(path: Path) -> None:
    sitk = _sitk()
    img = sitk.ReadImage(str(path))
    img.SetSpacing(tuple(s * f for s, f in zip(img.GetSpacing(), (1.0, 1.0, 2.5))))
    sitk.WriteImage(img, str(path))


def put_value(path: Path, value, dtype=None) -> None:
    sitk = _sitk()
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    if dtype is not None:
        arr = arr.astype(dtype)
    arr[tuple(s // 2 for s in arr.shape)] = value
    _write_array_like(arr, img, path)


def shift_origin(path: Path) -> None:
    """The same array 5 mm further along the first axis: it fits the image's grid, not its place."""
    sitk = _sitk()
    img = sitk.ReadImage(str(path))
    img.SetOrigin(tuple(o + d for o, d in zip(img.GetOrigin(), (5.0, 0.0, 0.0))))
    sitk.WriteImage(img, str(path))


def flip_direction(path: Path) -> None:
    """The first axis pointing the other way (a left-right flipped label), origin and array kept."""
    sitk = _sitk()
    img = sitk.ReadImage(str(path))
    d = list(img.GetDirection())
    d[0], d[3], d[6] = -d[0], -d[3], -d[6]
    img.SetDirection(d)
    sitk.WriteImage(img, str(path))


def make_2d(path: Path) -> None:
    sitk = _sitk()
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    sitk.WriteImage(sitk.GetImageFromArray(arr[arr.shape[0] // 2]), str(path))


def make_4d(path: Path) -> None:
    sitk = _sitk()
    img = sitk.ReadImage(str(path))
    sitk.WriteImage(sitk.JoinSeries([img, img]), str(path))


def img(ds: Path, case: str, ch: int = 0) -> Path:
    return ds / "imagesTr" / f"{case}_{ch:04d}.nii.gz"


def lab(ds: Path, case: str) -> Path:
    return ds / "labelsTr" / f"{case}.nii.gz"


def _break_missing_channel(ds: Path) -> list[tuple[Path, str]]:
    d = json.loads((ds / "dataset.json").read_text())
    d["channel_names"] = {"0": "T1", "1": "T2"}
    (ds / "dataset.json").write_text(json.dumps(d, indent=2))
    for c in CASES[:2]:
        shutil.copyfile(img(ds, c), img(ds, c, 1))
    return [(img(ds, CASES[2], 1), "missing channel")]


def _break_empty(ds: Path) -> list[tuple[Path, str]]:
    for f in (ds / "imagesTr").iterdir():
        f.unlink()
    return [(ds / "imagesTr", "empty|no images")]


def _one(fn, where, case, reason):
    def breaker(ds: Path) -> list[tuple[Path, str]]:
        target = where(ds, case)
        fn(target)
        return [(target, reason)]

    return breaker


def _missing_label(ds: Path) -> list[tuple[Path, str]]:
    lab(ds, CASES[2]).unlink()
    return [(lab(ds, CASES[2]), "missing label")]


# name -> breaker(ds) returning [(offending path, reason regex)]
DATASET_BREAKERS = {
    "truncated_image": _one(truncate, img, CASES[1], "truncated or corrupt"),
    "truncated_label": _one(truncate, lab, CASES[0], "truncated or corrupt"),
    "corrupt_image": _one(corrupt_middle, img, CASES[2], "truncated or corrupt"),
    "text_with_image_extension": _one(not_an_image, lab, CASES[2], "not an image|cannot read"),
    "label_shape_mismatch": _one(crop_shape, lab, CASES[1], r"shape .* differs"),
    "label_spacing_mismatch": _one(change_spacing, lab, CASES[1], r"spacing .* differs"),
    "missing_label": _missing_label,
    "missing_channel": _break_missing_channel,
    "label_value_not_in_dataset_json": _one(lambda p: put_value(p, 7), lab, CASES[0], r"label value.*\b7\b"),
    "fractional_label_value": _one(
        lambda p: put_value(p, 0.5, np.float32), lab, CASES[1], r"label values \[0\.5\] not in dataset.json"
    ),
    "negative_label_value": _one(
        lambda p: put_value(p, -1, np.int16), lab, CASES[2], r"label values \[-1\] not in dataset.json"
    ),
    "label_origin_shifted": _one(shift_origin, lab, CASES[0], r"origin .* differs from hippocampus_001_0000"),
    "label_direction_flipped": _one(flip_direction, lab, CASES[1], r"orientation \(direction .*\) differs"),
    "nan_in_image": _one(lambda p: put_value(p, np.nan, np.float32), img, CASES[1], "NaN"),
    "inf_in_image": _one(lambda p: put_value(p, np.inf, np.float32), img, CASES[2], "Inf"),
    "image_2d": _one(make_2d, img, CASES[0], r"\b2D\b"),
    "image_4d": _one(make_4d, img, CASES[1], r"\b4D\b"),
    "empty_images_folder": _break_empty,
}


# --------------------------------------------------------------------------------------------
# verify and plan on broken datasets


def _verify_plan(d: Path, ds: Path) -> dict[str, list]:
    return {"verify": ["verify", ds], "plan": ["plan", ds, "-w", d / "ws"]}


@pytest.fixture(scope="module")
def dataset_runs(tmp_path_factory) -> dict[str, Scenario]:
    root = tmp_path_factory.mktemp("bad_datasets")
    scenarios = {}
    d = root / "control"
    ds = make_dataset(d / "ds")
    scenarios["control"] = Scenario(d, _verify_plan(d, ds), [ds], out=d / "ws")
    for name, breaker in DATASET_BREAKERS.items():
        d = root / name
        ds = make_dataset(d / "ds")
        scenarios[name] = Scenario(d, _verify_plan(d, ds), [ds], breaker(ds), out=d / "ws")
    d = root / "all_at_once"
    ds = make_dataset(d / "ds")
    expected = [
        e
        for k in ("truncated_image", "label_value_not_in_dataset_json", "missing_label")
        for e in DATASET_BREAKERS[k](ds)
    ]
    scenarios["all_at_once"] = Scenario(d, {"verify": ["verify", ds]}, [ds], expected)
    d = root / "unwritable_workspace"
    ds = make_dataset(d / "ds")
    blocker = d / "a_file"  # a regular file as the parent: not writable even for root
    blocker.write_text("not a folder")
    scenarios["unwritable_workspace"] = Scenario(
        d,
        {"plan": ["plan", ds, "-w", blocker / "ws"]},
        [ds, blocker],
        [(blocker, "not writable|cannot write|not a directory")],
    )
    return run_scenarios(scenarios)


def test_verify_and_plan_accept_the_unbroken_copy(dataset_runs):
    sc = dataset_runs["control"]
    for label in ("verify", "plan"):
        assert sc.results[label].returncode == 0, sc.results[label].stderr
    assert list(sc.out.rglob("plan.json"))
    sc.assert_inputs_unchanged()


@pytest.mark.parametrize("problem", list(DATASET_BREAKERS))
def test_verify_reports(problem, dataset_runs):
    sc = dataset_runs[problem]
    assert_verify_reports(sc.results["verify"], sc.expected)
    sc.assert_inputs_unchanged()


@pytest.mark.parametrize("problem", list(DATASET_BREAKERS))
def test_plan_rejects(problem, dataset_runs):
    sc = dataset_runs[problem]
    path, reason = sc.expected[0]
    assert_one_line_error(sc.results["plan"], path, reason)
    assert files_under(sc.out) == [], "plan left files behind after failing"
    sc.assert_inputs_unchanged()


def test_verify_reports_every_problem_at_once(dataset_runs):
    sc = dataset_runs["all_at_once"]
    assert len(sc.expected) == 3
    assert_verify_reports(sc.results["verify"], sc.expected)
    sc.assert_inputs_unchanged()


def test_plan_unwritable_workspace(dataset_runs):
    sc = dataset_runs["unwritable_workspace"]
    assert_one_line_error(sc.results["plan"], *sc.expected[0])
    sc.assert_inputs_unchanged()


def test_preprocess_and_train_refuse_a_label_broken_after_plan(tmp_path):
    """plan, preprocess and train run verify's checks (medseg.io.verify.check_dataset): a label
    changed after a good plan and preprocess is refused by both, in one line, before any work."""
    ds = make_dataset(tmp_path / "ds")
    ws = tmp_path / "ws"
    for args in (["plan", ds, "-w", ws], ["preprocess", ds, "-w", ws]):
        res = run_cli(args, tmp_path)
        assert res.returncode == 0, res.stderr
    record = next(ws.rglob("checked_cases.json"))
    checked = json.loads(record.read_text())
    assert sorted(checked["cases"]) == CASES
    broken = lab(ds, CASES[1])
    put_value(broken, 0.5, np.float32)
    before, cache_before = snapshot(ds), files_under(ws)
    for args in (["preprocess", ds, "-w", ws], ["train", ds, "-w", ws, "-f", "all", "--epochs", "1"]):
        assert_one_line_error(run_cli(args, tmp_path), broken, r"label values \[0\.5\] not in dataset.json")
    assert snapshot(ds) == before
    assert files_under(ws) == cache_before, "a refused command changed the workspace"
    assert json.loads(record.read_text()) == checked, "the record of checked cases took in the broken case"


# --------------------------------------------------------------------------------------------
# predict: tiny randomly initialised model folders (no training)


def build_tiny_models(root: Path) -> dict[str, Path]:
    """A 1-channel and a 2-channel model folder from a real plan, with 4..32 features."""
    from medseg import api
    from medseg.io.checkpoint import ModelSpec, save_spec, save_weights

    ds = make_dataset(root / "ds")
    plan = api.plan(ds, root / "ws", progress=False)
    conf = plan.configuration("3d_fullres")
    kwargs = {**conf.model_kwargs, "features": [4, 8, 16, 32]}
    models = {}
    for name, channels in (("model_1ch", 1), ("model_2ch", 2)):
        p = dataclasses.replace(
            plan,
            channel_names=tuple(f"ch{i}" for i in range(channels)),
            normalization=tuple(plan.normalization) * channels,
        )
        spec = ModelSpec(
            model=conf.model,
            model_kwargs=kwargs,
            in_channels=channels,
            num_classes=p.num_classes,
            labels=dict(p.labels),
            plan=p,
            configuration="3d_fullres",
        )
        save_spec(root / name, spec)
        save_weights(root / name / "fold_0", spec.build(deep_supervision=False).state_dict())
        models[name] = root / name
    return models


def _case_image(d: Path, case=CASES[0]) -> Path:
    require(HIPPO)
    (d / "in").mkdir(parents=True, exist_ok=True)
    dst = d / "in" / f"{case}_0000.nii.gz"
    shutil.copyfile(HIPPO / "imagesTr" / f"{case}_0000.nii.gz", dst)
    return dst


def _predict_args(model: Path, inp: Path, out: Path) -> list:
    return ["predict", "-m", model, "-i", inp, "-o", out, "--no-tta", "--device", "cpu"]


def _tamper_weights(model: Path) -> Path:
    w = model / "fold_0" / "model.safetensors"
    data = bytearray(w.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    w.write_bytes(bytes(data))
    return w


def _tamper_spec(model: Path) -> Path:
    spec = model / "model.json"
    d = json.loads(spec.read_text())
    d["model_kwargs"]["features"] = [8, 16, 32, 64]
    spec.write_text(json.dumps(d))
    return spec


def _truncate_spec(model: Path) -> Path:
    truncate(model / "model.json")
    return model / "model.json"


def _delete(rel: str):
    def breaker(model: Path) -> Path:
        (model / rel).unlink()
        return model / rel

    return breaker


# name -> (breaker(model folder) -> offending path, reason regex)
CHECKPOINT_BREAKERS = {
    "missing_model_json": (_delete("model.json"), "missing model.json"),
    "missing_fold_weights": (_delete("fold_0/model.safetensors"), "missing weights"),
    "missing_checkpoint_json": (_delete("fold_0/checkpoint.json"), "missing checkpoint.json"),
    "tampered_weights": (_tamper_weights, "sha256 mismatch"),
    "tampered_model_json": (_tamper_spec, r"fold_0/model.safetensors do not match the model spec"),
    "truncated_model_json": (_truncate_spec, "not valid JSON"),
}


def _input_2ch_missing(d: Path) -> tuple[Path, Path, str]:
    inp = _case_image(d)  # only CASE_0000 for a 2-channel model: the case (CASE_000x) is named
    return inp.parent, inp.parent / CASES[0], r"channel file.*needs 2|missing channel"


def _input_2ch(fn, reason):
    def make(d: Path) -> tuple[Path, Path, str]:
        inp = _case_image(d)
        second = inp.parent / f"{CASES[0]}_0001.nii.gz"
        shutil.copyfile(inp, second)
        fn(second)
        return inp.parent, second, reason

    return make


def _input_file(fn, reason):
    def make(d: Path) -> tuple[Path, Path, str]:
        inp = _case_image(d)
        fn(inp)
        return inp, inp, reason

    return make


def _input_in_folder(fn, reason):
    """A good case and a broken one in one input folder: the broken one is named."""

    def make(d: Path) -> tuple[Path, Path, str]:
        _case_image(d, CASES[0])
        bad = _case_image(d, CASES[1])
        fn(bad)
        return bad.parent, bad, reason

    return make


def _input_empty_folder(d: Path) -> tuple[Path, Path, str]:
    (d / "in").mkdir(parents=True)
    (d / "in" / "readme.txt").write_text("no images here")
    return d / "in", d / "in", "no images"


# name -> (model, make_input(folder) -> (input argument, offending path, reason regex))
INPUT_BREAKERS = {
    "truncated_image": ("model_1ch", _input_file(truncate, "truncated or corrupt")),
    "text_with_image_extension": ("model_1ch", _input_file(not_an_image, "not an image|cannot read")),
    "bad_case_in_folder": ("model_1ch", _input_in_folder(truncate, "truncated or corrupt")),
    "nan_in_image": ("model_1ch", _input_file(lambda p: put_value(p, np.nan, np.float32), "NaN")),
    "image_2d": ("model_1ch", _input_file(make_2d, r"\b2D\b")),
    "image_4d": ("model_1ch", _input_file(make_4d, r"\b4D\b")),
    "empty_input_folder": ("model_1ch", _input_empty_folder),
    "missing_channel": ("model_2ch", _input_2ch_missing),
    "channel_shape_mismatch": ("model_2ch", _input_2ch(crop_shape, r"shape .* differs")),
    "channel_spacing_mismatch": ("model_2ch", _input_2ch(change_spacing, r"spacing .* differs")),
    "channel_origin_shifted": ("model_2ch", _input_2ch(shift_origin, r"origin .* differs from channel 0")),
    "channel_direction_flipped": ("model_2ch", _input_2ch(flip_direction, r"orientation \(direction .*\) differs")),
}


@pytest.fixture(scope="module")
def predict_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_predict")
    models = build_tiny_models(root / "models")
    scenarios = {}

    def model_copy(d: Path, name="model_1ch") -> Path:
        return Path(shutil.copytree(models[name], d / name))

    d = root / "control"
    model, inp = model_copy(d), _case_image(d)
    scenarios["control"] = Scenario(d, {"predict": _predict_args(model, inp, d / "out")}, [model, inp], out=d / "out")
    for name, (breaker, reason) in CHECKPOINT_BREAKERS.items():
        d = root / f"checkpoint_{name}"
        model, inp = model_copy(d), _case_image(d)
        scenarios[f"checkpoint:{name}"] = Scenario(
            d,
            {"predict": _predict_args(model, inp, d / "out")},
            [model, inp],
            [(breaker(model), reason)],
            out=d / "out",
        )
    for name, (model_name, make) in INPUT_BREAKERS.items():
        d = root / f"input_{name}"
        model = model_copy(d, model_name)
        inp, offending, reason = make(d)
        scenarios[f"input:{name}"] = Scenario(
            d, {"predict": _predict_args(model, inp, d / "out")}, [model, inp], [(offending, reason)], out=d / "out"
        )
    d = root / "unwritable_output"
    model, inp = model_copy(d), _case_image(d)
    blocker = d / "a_file"  # a regular file as the parent: not writable even for root
    blocker.write_text("not a folder")
    scenarios["unwritable_output"] = Scenario(
        d, {"predict": _predict_args(model, inp, blocker / "out")}, [model, inp, blocker], [(blocker, "not writable")]
    )
    read_only = None
    if not IS_ROOT:  # root ignores directory permissions; the regular-file parent covers root
        d = root / "read_only_output"
        model, inp = model_copy(d), _case_image(d)
        read_only = d / "ro"
        read_only.mkdir()
        read_only.chmod(0o500)
        scenarios["read_only_output"] = Scenario(
            d,
            {"predict": _predict_args(model, inp, read_only)},
            [model, inp],
            [(read_only, "not writable")],
            out=read_only,
        )
    try:
        yield run_scenarios(scenarios)
    finally:
        if read_only is not None:
            read_only.chmod(0o700)


def test_predict_control_good_model_and_input(predict_runs):
    sc = predict_runs["control"]
    assert sc.results["predict"].returncode == 0, sc.results["predict"].stderr
    assert (sc.out / f"{CASES[0]}_0000.nii.gz").is_file()
    sc.assert_inputs_unchanged()


@pytest.mark.parametrize("problem", list(CHECKPOINT_BREAKERS))
def test_predict_rejects_broken_checkpoint(problem, predict_runs):
    sc = predict_runs[f"checkpoint:{problem}"]
    assert_one_line_error(sc.results["predict"], *sc.expected[0])
    assert files_under(sc.out) == [], "output written despite the failure"
    sc.assert_inputs_unchanged()


@pytest.mark.parametrize("problem", list(INPUT_BREAKERS))
def test_predict_rejects_bad_input(problem, predict_runs):
    sc = predict_runs[f"input:{problem}"]
    assert_one_line_error(sc.results["predict"], *sc.expected[0])
    # only the complete prediction of an earlier, good case may remain (predict resumes from it)
    # (with the record of which model and options made it, so that a resumed run can check)
    allowed = {f"{CASES[0]}.nii.gz", ".medseg_predictions.json"} if problem == "bad_case_in_folder" else set()
    assert set(files_under(sc.out)) <= allowed, files_under(sc.out)
    sc.assert_inputs_unchanged()


def test_predict_unwritable_output(predict_runs):
    sc = predict_runs["unwritable_output"]
    assert_one_line_error(sc.results["predict"], *sc.expected[0])
    sc.assert_inputs_unchanged()


@pytest.mark.skipif(IS_ROOT, reason="root ignores directory permissions; see test_predict_unwritable_output")
def test_predict_read_only_output_folder(predict_runs):
    sc = predict_runs["read_only_output"]
    assert_one_line_error(sc.results["predict"], *sc.expected[0])
    assert files_under(sc.out) == []
    sc.assert_inputs_unchanged()


# --------------------------------------------------------------------------------------------
# evaluate: predictions (copies of the reference labels) against references


def _pred(fn, reason, case=CASES[1]):
    def breaker(ds: Path, pred: Path, ref: Path) -> tuple[Path, str]:
        fn(pred / f"{case}.nii.gz")
        return pred / f"{case}.nii.gz", reason

    return breaker


def _missing_ref(ds: Path, pred: Path, ref: Path) -> tuple[Path, str]:
    (ref / f"{CASES[2]}.nii.gz").unlink()
    return ref / f"{CASES[2]}.nii.gz", "reference .*missing"


def _bad_ref_value(ds: Path, pred: Path, ref: Path) -> tuple[Path, str]:
    put_value(ref / f"{CASES[0]}.nii.gz", 9)
    return ref / f"{CASES[0]}.nii.gz", r"label value.*\b9\b"


def _empty_pred(ds: Path, pred: Path, ref: Path) -> tuple[Path, str]:
    for f in pred.iterdir():
        f.unlink()
    return pred, "no predictions"


EVALUATE_BREAKERS = {
    "truncated_prediction": _pred(truncate, "truncated or corrupt"),
    "text_with_image_extension": _pred(not_an_image, "not an image|cannot read"),
    "shape_mismatch": _pred(crop_shape, r"shape .* differs"),
    "spacing_mismatch": _pred(change_spacing, r"spacing .* differs"),
    "label_value_not_in_dataset_json": _pred(lambda p: put_value(p, 7), r"label value.*\b7\b"),
    "reference_label_value_not_in_dataset_json": _bad_ref_value,
    "prediction_2d": _pred(make_2d, r"\b2D\b"),
    "prediction_4d": _pred(make_4d, r"\b4D\b"),
    "missing_reference": _missing_ref,
    "empty_prediction_folder": _empty_pred,
}


def _eval_scenario(d: Path, breaker=None, output: Path | None = None) -> Scenario:
    ds = make_dataset(d / "ds")
    pred = Path(shutil.copytree(ds / "labelsTr", d / "pred"))
    expected = [breaker(ds, pred, ds / "labelsTr")] if breaker else []
    out = d / "out"
    args = [
        "evaluate",
        "--pred",
        pred,
        "--ref",
        ds / "labelsTr",
        "--labels",
        ds / "dataset.json",
        "-o",
        output or out / "summary.json",
    ]
    return Scenario(d, {"evaluate": args}, [ds, pred], expected, out=out)


@pytest.fixture(scope="module")
def evaluate_runs(tmp_path_factory) -> dict[str, Scenario]:
    root = tmp_path_factory.mktemp("bad_evaluate")
    scenarios = {"control": _eval_scenario(root / "control")}
    for name, breaker in EVALUATE_BREAKERS.items():
        scenarios[name] = _eval_scenario(root / name, breaker)
    d = root / "unwritable_output"
    d.mkdir()
    blocker = d / "a_file"
    blocker.write_text("not a folder")
    sc = _eval_scenario(d, output=blocker / "summary.json")
    sc.inputs.append(blocker)
    sc.expected = [(blocker, "not writable|cannot write|not a directory")]
    scenarios["unwritable_output"] = sc
    return run_scenarios(scenarios)


def test_evaluate_control_good_input(evaluate_runs):
    sc = evaluate_runs["control"]
    assert sc.results["evaluate"].returncode == 0, sc.results["evaluate"].stderr
    assert (sc.out / "summary.json").is_file()
    sc.assert_inputs_unchanged()


@pytest.mark.parametrize("problem", list(EVALUATE_BREAKERS) + ["unwritable_output"])
def test_evaluate_rejects(problem, evaluate_runs):
    sc = evaluate_runs[problem]
    assert_one_line_error(sc.results["evaluate"], *sc.expected[0])
    assert files_under(sc.out) == [], "evaluate wrote output despite the failure"
    sc.assert_inputs_unchanged()
