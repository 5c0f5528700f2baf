"""``medseg import-nnunet``: nnU-Net v2 results folders -> medseg model folders.

The fixture (tests/fixtures/nnunet_v2_hippocampus_tiny, built by scripts/make_nnunet_fixture.py) holds two
tiny models trained by nnunetv2 2.8.1 itself on 12 real hippocampus cases -- a PlainConvUNet and a
ResidualEncoderUNet whose plan transposes the axes, resamples and tiles -- plus ``nnUNetv2_predict``'s label
maps (mirror TTA, step 0.5) for 4 other real cases. Imported into medseg and predicted the medseg way, the
label maps must agree with nnU-Net's (Dice >= 0.99 per class and case). nnunetv2 is not needed here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.errors import CheckpointError
from medseg.interop.nnunet import import_nnunet, read_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "nnunet_v2_hippocampus_tiny"
DATASET = FIXTURE / "Dataset904_HippoTiny"
RESULTS = {
    "plain": DATASET / "nnUNetTrainer_MedsegFixture__nnUNetPlans__3d_fullres",
    "resenc": DATASET / "nnUNetTrainer_MedsegFixture__nnUNetResEncUNetMPlans__3d_fullres",
}
CASES = sorted(p.name[: -len("_0000.nii.gz")] for p in (FIXTURE / "images").glob("*_0000.nii.gz"))
MIN_DICE = 0.99


def dice(a: np.ndarray, b: np.ndarray, c: int) -> float:
    a, b = a == c, b == c
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "medseg.cli", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True
    )


def copy_results(kind: str, dst: Path) -> Path:
    out = dst / RESULTS[kind].name
    shutil.copytree(RESULTS[kind], out)
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("imported")
    return {kind: import_nnunet(RESULTS[kind], root / kind).output for kind in RESULTS}


# ----------------------------------------------------------------------------------------------
# agreement with nnUNetv2_predict


@pytest.mark.parametrize("kind", sorted(RESULTS))
def test_predictions_agree_with_nnunet(kind, imported, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixture networks are tiny: threads only add overhead
    try:
        _agreement(kind, imported, capsys)
    finally:
        torch.set_num_threads(threads)


def _agreement(kind, imported, capsys):
    from medseg.inference.predictor import Predictor
    from medseg.io.dataset import Case
    from medseg.io.image import read_image

    predictor = Predictor.from_folder(imported[kind], device="cpu", tta=True, step=0.5)
    assert predictor.mirror_axes == (0, 1, 2)  # the trainer's inference_allowed_mirroring_axes
    rows = []
    for case in CASES:
        image, meta = predictor.read_case(Case(case, [FIXTURE / "images" / f"{case}_0000.nii.gz"], None))
        seg, _ = predictor.predict_array(image, meta)
        ref, _ = read_image(FIXTURE / "nnunet_predictions" / kind / f"{case}.nii.gz")
        manual, _ = read_image(FIXTURE / "labels" / f"{case}.nii.gz")
        assert seg.shape == ref.shape
        # the slab-by-slab path medseg takes for large scans honours the same numerics
        streamed, _ = predictor.predict_array(image, meta, streaming=True)
        assert int((streamed != seg).sum()) <= 2, case
        rows.append(
            (case, [dice(seg, ref, c) for c in (1, 2)], int((seg != ref).sum()), [dice(ref, manual, c) for c in (1, 2)])
        )
    with capsys.disabled():
        print()
        for case, agree, ndiff, vs_manual in rows:
            print(
                f"{kind} {case}: Dice vs nnUNetv2_predict {agree[0]:.4f} / {agree[1]:.4f} "
                f"({ndiff} voxels differ); nnU-Net vs manual {vs_manual[0]:.3f} / {vs_manual[1]:.3f}"
            )
    for case, agree, _, _ in rows:
        assert min(agree) >= MIN_DICE, (case, agree)


def test_cli_import_then_predict_agrees(tmp_path):
    r = run_cli("import-nnunet", "-i", RESULTS["plain"], "-o", tmp_path / "model", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "model folder written" in r.stdout
    r = run_cli("predict", "-m", tmp_path / "model", "-i", FIXTURE / "images", "-o", tmp_path / "pred",
                "--device", "cpu", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    from medseg.io.image import read_image

    for case in CASES:
        seg, _ = read_image(tmp_path / "pred" / f"{case}.nii.gz")
        ref, _ = read_image(FIXTURE / "nnunet_predictions" / "plain" / f"{case}.nii.gz")
        assert min(dice(seg, ref, c) for c in (1, 2)) >= MIN_DICE


# ----------------------------------------------------------------------------------------------
# what is converted


def test_model_json_resenc_keeps_nnunet_choices(imported):
    spec = json.loads((imported["resenc"] / "model.json").read_text())
    plans = json.loads((RESULTS["resenc"] / "plans.json").read_text())
    nn_cfg = plans["configurations"]["3d_fullres"]
    conf = spec["plan"]["configurations"]["3d_fullres"]
    tf = plans["transpose_forward"]
    assert tf != [0, 1, 2]
    assert spec["model"] == "resenc"
    assert spec["model_kwargs"]["transpose"] == tf
    # patch/spacing in the image's own (z, y, x) order; the network itself works transposed
    for j, a in enumerate(tf):
        assert conf["patch_size"][a] == nn_cfg["patch_size"][j]
        assert conf["spacing"][a] == nn_cfg["spacing"][j]
    assert spec["model_kwargs"]["strides"] == nn_cfg["architecture"]["arch_kwargs"]["strides"]
    assert spec["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert spec["plan"]["normalization"][0]["scheme"] == "zscore"
    record = json.loads((imported["resenc"] / "fold_0" / "checkpoint.json").read_text())
    assert record["source"]["framework"] == "nnU-Net v2" and len(record["source"]["sha256"]) == 64


def test_plain_weights_are_nnunet_weights(imported):
    from safetensors.torch import load_file

    ck = read_checkpoint(RESULTS["plain"] / "fold_0" / "checkpoint_final.pth")["network_weights"]
    ours = load_file(str(imported["plain"] / "fold_0" / "model.safetensors"))
    assert torch.equal(ours["encoder.0.0.0.weight"], ck["encoder.stages.0.0.convs.0.conv.weight"])
    assert torch.equal(ours["decoder.1.1.1.bias"], ck["decoder.stages.1.convs.1.norm.bias"])
    assert torch.equal(ours["heads.1.weight"], ck["decoder.seg_layers.1.weight"])
    assert not any(".all_modules." in k or k.startswith("decoder.encoder.") for k in ours)


def test_old_plans_format_gives_the_same_model(tmp_path, imported):
    """nnU-Net < 2.4 plans (TotalSegmentator's) describe the U-Net with flat keys instead of 'architecture'."""
    src = copy_results("plain", tmp_path)
    plans = json.loads((src / "plans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    kw = cfg.pop("architecture")["arch_kwargs"]
    cfg.update(
        UNet_class_name="PlainConvUNet",
        UNet_base_num_features=kw["features_per_stage"][0],
        unet_max_num_features=kw["features_per_stage"][-1],
        n_conv_per_stage_encoder=kw["n_conv_per_stage"],
        n_conv_per_stage_decoder=kw["n_conv_per_stage_decoder"],
        num_pool_per_axis=[len(kw["strides"]) - 1] * 3,
        pool_op_kernel_sizes=kw["strides"],
        conv_kernel_sizes=kw["kernel_sizes"],
    )
    (src / "plans.json").write_text(json.dumps(plans))
    old = import_nnunet(src, tmp_path / "model")
    new_spec = json.loads((imported["plain"] / "model.json").read_text())
    old_spec = json.loads((old.output / "model.json").read_text())
    assert old_spec["model_kwargs"] == new_spec["model_kwargs"]
    assert old_spec["plan"]["configurations"] == new_spec["plan"]["configurations"]


def test_checkpoint_best_and_folds(tmp_path):
    src = copy_results("plain", tmp_path)
    ck = read_checkpoint(src / "fold_0" / "checkpoint_final.pth")
    ck["network_weights"]["decoder.seg_layers.1.bias"] = ck["network_weights"]["decoder.seg_layers.1.bias"] + 1.0
    torch.save(ck, src / "fold_0" / "checkpoint_best.pth")
    shutil.copytree(src / "fold_0", src / "fold_all")
    from safetensors.torch import load_file

    final = import_nnunet(src, tmp_path / "final")
    best = import_nnunet(src, tmp_path / "best", checkpoint="best", folds=["all"])
    assert final.folds == ["0", "all"] and best.folds == ["all"]
    assert not (tmp_path / "best" / "fold_0").exists()
    b_final = load_file(str(tmp_path / "final" / "fold_all" / "model.safetensors"))["heads.1.bias"]
    b_best = load_file(str(tmp_path / "best" / "fold_all" / "model.safetensors"))["heads.1.bias"]
    assert torch.allclose(b_best, b_final + 1.0)
    with pytest.raises(CheckpointError, match="fold_3"):
        import_nnunet(src, tmp_path / "x", folds=["3"])


# ----------------------------------------------------------------------------------------------
# bad input


class _Payload:
    """Unpickling this would create ``marker``: proof that no code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_pickled_code_is_refused(tmp_path):
    src = copy_results("plain", tmp_path / "in")
    ck = read_checkpoint(src / "fold_0" / "checkpoint_final.pth")
    marker = tmp_path / "EXECUTED"
    ck["logging"] = _Payload(marker)
    torch.save(ck, src / "fold_0" / "checkpoint_final.pth")
    r = run_cli("import-nnunet", "-i", src, "-o", tmp_path / "out" / "model", cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("medseg: error: ") and "checkpoint_final.pth" in lines[0]
    assert "refused" in lines[0] and "weights_only" in lines[0]
    assert not marker.exists()
    assert not (tmp_path / "out" / "model").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_pickled_class_instance_is_refused(tmp_path):
    import argparse

    src = copy_results("plain", tmp_path)
    ck = read_checkpoint(src / "fold_0" / "checkpoint_final.pth")
    ck["init_args"] = argparse.Namespace(configuration="3d_fullres")
    torch.save(ck, src / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(CheckpointError, match=r"refused to load: it pickles argparse\.Namespace"):
        import_nnunet(src, tmp_path / "model")
    assert not (tmp_path / "model").exists() and not _leftovers(tmp_path)


def test_not_a_checkpoint(tmp_path):
    src = copy_results("plain", tmp_path)
    (src / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        import_nnunet(src, tmp_path / "model")
    torch.save({"weights": torch.zeros(1)}, src / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(CheckpointError, match="network_weights"):
        import_nnunet(src, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_missing_plans_json(tmp_path):
    src = copy_results("plain", tmp_path / "in")
    (src / "plans.json").unlink()
    r = run_cli("import-nnunet", "-i", src, "-o", tmp_path / "model", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"medseg: error: {src / 'plans.json'}: missing plans.json: not an nnU-Net v2 results folder "
        "(expected TRAINER__PLANS__CONFIGURATION/ with dataset.json, plans.json and fold_K/)"
    ]
    assert not (tmp_path / "model").exists()


def test_unsupported_network_and_mismatched_weights(tmp_path):
    src = copy_results("plain", tmp_path)
    plans = json.loads((src / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["network_class_name"] = "nnunetv2.nets.MedNeXt"
    (src / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(CheckpointError, match="MedNeXt is not supported"):
        import_nnunet(src, tmp_path / "model")
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    arch["arch_kwargs"]["features_per_stage"] = [16, 32, 64]
    (src / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(CheckpointError, match="do not fit the unet.*nnUNetTrainer_MedsegFixture"):
        import_nnunet(src, tmp_path / "model")
    assert not (tmp_path / "model").exists() and not _leftovers(tmp_path)


def test_custom_trainer_network_is_refused(tmp_path):
    """A results folder whose trainer builds its own network (e.g. STU-Net's STUNetTrainer_small)."""
    src = copy_results("plain", tmp_path)
    ck = read_checkpoint(src / "fold_0" / "checkpoint_final.pth")
    ck["network_weights"] = {f"conv_blocks_context.0.0.conv{i}.weight": torch.zeros(2, 1, 3, 3, 3) for i in (1, 2)}
    ck["trainer_name"] = "STUNetTrainer_small"
    torch.save(ck, src / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(CheckpointError, match="trainer STUNetTrainer_small builds its own network"):
        import_nnunet(src, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_existing_output_needs_overwrite(tmp_path):
    first = import_nnunet(RESULTS["plain"], tmp_path / "model")
    with pytest.raises(CheckpointError, match="already exists"):
        import_nnunet(RESULTS["plain"], tmp_path / "model")
    again = import_nnunet(RESULTS["plain"], tmp_path / "model", overwrite=True)
    assert again.output == first.output and (tmp_path / "model" / "fold_0" / "model.safetensors").is_file()
    assert not _leftovers(tmp_path)


# ----------------------------------------------------------------------------------------------
# the network options the importer relies on


@pytest.mark.parametrize("name", ["unet", "resenc"])
def test_transpose_is_a_pure_axis_permutation(name):
    from medseg.models import create_model

    cfg = {
        "features": [2, 4, 8],
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 1]],
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 1]],
        "deep_supervision": False,
    }
    if name == "resenc":
        cfg["blocks_per_stage"] = [1, 1, 1]
    torch.manual_seed(0)
    plain = create_model(name, 1, 3, **cfg).eval()
    moved = create_model(name, 1, 3, transpose=[2, 0, 1], **cfg).eval()
    moved.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 8, 12, 16)
    with torch.no_grad():
        ref = plain(x.permute(0, 1, 4, 2, 3)).permute(0, 1, 3, 4, 2)
        assert torch.allclose(moved(x), ref, atol=1e-5)


def test_conv_bias_eps_slope_options():
    from medseg.models import create_model

    net = create_model("unet", 1, 2, features=[2, 4], conv_bias=False, norm_eps=1e-3, negative_slope=0.0,
                       n_conv_per_stage=[1, 2], n_conv_per_stage_decoder=[3])  # fmt: skip
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(c.bias is None for c in convs if c.out_channels != 2)  # heads keep their bias
    assert {m.eps for m in net.modules() if isinstance(m, torch.nn.InstanceNorm3d)} == {1e-3}
    assert {m.negative_slope for m in net.modules() if isinstance(m, torch.nn.LeakyReLU)} == {0.0}
    assert [len(s) for s in net.encoder] == [1, 2] and [len(s) for s in net.decoder] == [3]
    with pytest.raises(ValueError, match="permutation"):
        create_model("unet", 1, 2, features=[2, 4], transpose=[0, 0, 1])
