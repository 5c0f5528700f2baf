"""One vocabulary across subcommands (issue 17): -i/--input, -o/--output, -m/--model (a model
folder or shipped name), -f/--fold (repeatable), --overwrite; help text for every option and no
type noise; old spellings accepted for one release, hidden from --help. And the class-map and
existing-output rules that every command shares (medseg.ct.class_maps, medseg.outputs)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import typer
from conftest import HIPPO, run_main
from typer.core import TyperArgument, TyperOption

from medseg.cli import app
from medseg.cli.legacy import RENAMED, rename_legacy

CASE = "hippocampus_001"


def _commands() -> dict:
    group = typer.main.get_command(app)
    return {name: group.get_command(None, name) for name in group.list_commands(None)}


def _visible_options(cmd) -> list[TyperOption]:
    return [p for p in cmd.params if isinstance(p, TyperOption) and not p.hidden]


def test_every_option_has_help_and_help_has_no_type_noise():
    missing = [
        f"{name} {p.opts[0]}"
        for name, cmd in _commands().items()
        for p in _visible_options(cmd)
        if not (p.help or "").strip()
    ]
    assert missing == []
    args = [f"{name} {p.name}" for name, cmd in _commands().items() for p in cmd.params
            if isinstance(p, TyperArgument) and not p.hidden and not (getattr(p, "help", "") or "").strip()]  # fmt: skip
    assert args == []
    from typer.testing import CliRunner

    for name in _commands():
        text = CliRunner().invoke(app, [name, "--help"]).output
        assert "<bool>" not in text, name


def test_one_spelling_for_input_output_model_and_folds():
    for name, cmd in _commands().items():
        opts = {o for p in _visible_options(cmd) for o in p.opts + p.secondary_opts}
        assert not opts & {"--out", "--image", "--series", "--folds"}, name  # the old spellings are hidden
        for p in _visible_options(cmd):
            if "--output" in p.opts:
                assert "-o" in p.opts, name
            if "--input" in p.opts:
                assert "-i" in p.opts, name
            if "--fold" in p.opts:
                assert "-f" in p.opts and p.multiple, f"{name}: -f/--fold must be repeatable"
            if "--model" in p.opts:
                assert "-m" in p.opts and "folder" in p.help, f"{name}: -m/--model is a model folder or shipped name"
        writes = {"ct", "ct-stats", "dicom-seg", "predict", "evaluate", "export-model", "import-nnunet", "cohort"}
        writes |= {"convert-msd"}
        if name in writes | {"train", "cohort-analyse"}:
            assert "--overwrite" in opts, f"{name} needs --overwrite (docs/cli.md: existing outputs)"
            assert "--output" in opts, name
    assert "--arch" in {o for p in _visible_options(_commands()["train"]) for o in p.opts}


def test_rename_legacy_rewrites_only_the_commands_old_spellings():
    warned = []
    args = ["--series", "S", "--out=x.dcm", "--seg", "--out", "--", "--out"]
    assert rename_legacy("dicom-seg", args, warned.append) == ["--input", "S", "--output=x.dcm", "--seg", "--output", "--", "--out"]  # fmt: skip
    assert len(warned) == 3 and "dicom-seg --series is now --input" in warned[0]
    assert rename_legacy("ct", ["--out", "x"], warned.append) == ["--out", "x"]  # ct never had --out
    assert set(RENAMED) <= set(_commands())


def test_old_spellings_still_work_for_one_release(monkeypatch, capsys, tmp_path):
    # train --model (an architecture) is --arch now
    code, _, err = run_main(monkeypatch, capsys, "train", tmp_path, "--model", "no_such_net", "--epochs", "1")
    assert code == 2 and "train --model is now --arch" in err and "medseg: error: --arch: unknown model" in err
    # predict --folds is -f/--fold
    image = HIPPO / "imagesTr" / f"{CASE}_0000.nii.gz"
    code, _, err = run_main(monkeypatch, capsys, "predict", "-m", "hippocampus", "-i", image, "-o", tmp_path / "p",
                            "--folds", "3")  # fmt: skip
    assert code == 2 and "predict --folds is now --fold" in err and "has no fold 3" in err
    # ct-stats --image is -i/--input
    ct, seg = _ct_and_seg(tmp_path)
    code, out, err = run_main(monkeypatch, capsys, "ct-stats", "--image", ct, "--seg", seg, "-o", tmp_path / "s.json",
                              "--class-map", "total")  # fmt: skip
    assert code == 0 and "ct-stats --image is now --input" in err and "liver" in out
    # positional input/output of export-model are -i/-o
    code, _, err = run_main(monkeypatch, capsys, "export-model", tmp_path / "nothing", tmp_path / "m")
    assert code == 2 and "positional input is now -i/--input" in err and "medseg: error:" in err


def _ct_and_seg(tmp_path, air: bool = True):
    from medseg.ct.class_maps import load_class_map
    from medseg.io.image import ImageMeta, write_image

    meta = ImageMeta((2.0, 1.5, 1.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (16, 16, 16))
    ct = np.full((16, 16, 16), 40, np.int16)
    if air:
        ct[:, :, :3] = -1000
    seg = np.zeros((16, 16, 16), np.uint8)
    seg[5:10, 5:10, 5:10] = load_class_map("total")["liver"]
    write_image(ct, meta, tmp_path / "ct.nii.gz")
    write_image(seg, meta, tmp_path / "seg.nii.gz")
    return tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz"


def test_existing_outputs_are_refused_unless_overwrite(monkeypatch, capsys, tmp_path):
    ct, seg = _ct_and_seg(tmp_path)
    out = tmp_path / "stats.json"
    args = ["ct-stats", "-i", ct, "--seg", seg, "-o", out, "--class-map", "total"]
    assert run_main(monkeypatch, capsys, *args)[0] == 0
    before = out.read_bytes()
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and err.strip() == f"medseg: error: {out}: already exists (and 1 more of this run's outputs); pass --overwrite to replace it or choose another output"  # fmt: skip
    assert out.read_bytes() == before
    assert run_main(monkeypatch, capsys, *args, "--overwrite")[0] == 0

    # evaluate: the same rule for its summary
    ref = tmp_path / "ref"
    ref.mkdir()
    shutil.copyfile(HIPPO / "labelsTr" / f"{CASE}.nii.gz", ref / f"{CASE}.nii.gz")
    pred = shutil.copytree(ref, tmp_path / "pred")
    ev = ["evaluate", "-i", pred, "-r", ref, "-l", HIPPO / "dataset.json"]
    code, stdout, _ = run_main(monkeypatch, capsys, *ev)
    assert code == 0 and "1 case; HD95 defined for every case and class" in stdout
    code, _, err = run_main(monkeypatch, capsys, *ev)
    assert code == 2 and "summary.json: already exists" in err and "--overwrite" in err
    assert run_main(monkeypatch, capsys, *ev, "--overwrite")[0] == 0
    # convert-msd into a dataset folder that exists: refused before reading the task
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset.json").write_text("{}")
    code, _, err = run_main(monkeypatch, capsys, "convert-msd", "-i", tmp_path / "task", "-o", tmp_path / "ds")
    assert code == 2 and "ds/dataset.json: already exists" in err
    assert (tmp_path / "ds" / "dataset.json").read_text() == "{}"
    # --pred/--ref remain visible spellings of -i/-r
    assert run_main(monkeypatch, capsys, "evaluate", "--pred", pred, "--ref", ref, "-l", HIPPO / "dataset.json",
                    "-o", tmp_path / "e2.json")[0] == 0  # fmt: skip


def test_class_map_must_fit_and_mr_is_not_reported_in_hu(monkeypatch, capsys, tmp_path):
    """An MR hippocampus label map: no map guessed (it used to be TotalSegmentator's: 'spleen' in
    'HU'); the model's labels (-m, or recorded by predict) name it; a misfit map is refused."""
    image, seg = HIPPO / "imagesTr" / f"{CASE}_0000.nii.gz", HIPPO / "labelsTr" / f"{CASE}.nii.gz"
    out = tmp_path / "out" / "s.json"
    code, _, err = run_main(monkeypatch, capsys, "ct-stats", "-i", image, "--seg", seg, "-o", out)
    assert code == 2 and "no class map" in err and len(err.strip().splitlines()) == 1
    assert not out.parent.exists() or not any(out.parent.iterdir())

    code, stdout, err = run_main(monkeypatch, capsys, "ct-stats", "-i", image, "--seg", seg, "-o", out, "-m", "hippocampus")  # fmt: skip
    assert code == 0 and "Anterior" in stdout and "Posterior" in stdout and "spleen" not in stdout
    assert "HU" not in stdout and "not a CT in HU" in err
    doc = json.loads(out.read_text())
    assert doc["intensity_unit"].startswith("image units") and "intensity_mean" in doc["structures"]["Anterior"]
    assert not any(k.startswith("hu_") for k in doc["structures"]["Anterior"])

    # a label map written by `medseg predict` carries its model's labels (the folder's record)
    pred = tmp_path / "pred"
    pred.mkdir()
    shutil.copyfile(seg, pred / f"{CASE}.nii.gz")
    (pred / ".medseg_predictions.json").write_text(json.dumps({"labels": {"background": 0, "Anterior": 1, "Posterior": 2}}))  # fmt: skip
    code, stdout, _ = run_main(monkeypatch, capsys, "ct-stats", "-i", image, "--seg", pred / f"{CASE}.nii.gz",
                               "-o", tmp_path / "r.json")  # fmt: skip
    assert code == 0 and "Anterior" in stdout
    code, _, err = run_main(monkeypatch, capsys, "ct-stats", "-i", image, "--seg", pred / f"{CASE}.nii.gz",
                            "-o", tmp_path / "t.json", "--class-map", "total")  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "class map names 117 structures (values 1-117) but the model" in err and "has 2 (values 1-2)" in err
    assert not (tmp_path / "t.json").exists()

    # a map that does not name every value of the label map is refused, not half-used
    code, _, err = run_main(monkeypatch, capsys, "ct-stats", "-i", image, "--seg", seg, "-o", tmp_path / "u.json",
                            "--class-map", _one_label_map(tmp_path))  # fmt: skip
    assert code == 2 and "label values [2] are not in the class map" in err and not (tmp_path / "u.json").exists()


def _one_label_map(tmp_path):
    p = tmp_path / "one.json"
    p.write_text(json.dumps({"labels": {"background": 0, "Anterior": 1}}))
    return p


def test_fit_class_map_unit():
    from medseg.ct.class_maps import fit_class_map
    from medseg.errors import DatasetError

    model = {"background": 0, "a": 1, "b": 2}
    assert fit_class_map(None, model, "M") == {"a": 1, "b": 2}  # the model's own labels win
    assert fit_class_map({"x": 1, "y": 2}, model, "M") == {"x": 1, "y": 2}  # a map that fits may rename
    for bad in ({"x": 1}, {"x": 1, "y": 2, "z": 3}, "total"):
        with pytest.raises(DatasetError, match="omit --class-map to use the model's own labels"):
            fit_class_map(bad, model, "M")
