"""LeFusion's denoiser and its lesion-focused task on the one training loop: the cosine schedule, the
lesion histograms, the multi-channel decomposition, the noised batch, and training on real LIDC VOIs
through ``medseg train`` (Adam, constant LR, EMA, masked L1, resume)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLED_DATA, SHARED_DATA, copy_cases, run_main

from medseg.augment.transforms import AugmentConfig
from medseg.models import create_model
from medseg.tasks import get_task
from medseg.tasks.lesion_diffusion import cosine_alphas_cumprod, decompose, lesion_histograms

LIDC = SHARED_DATA / "lidc_nodule_vois"  # CC BY 3.0; the test copies five VOIs (skipped without the data)


def test_cosine_schedule():
    abar = cosine_alphas_cumprod(300)
    assert abar.shape == (300,) and abar[0] > 0.999 and abar[-1] < 1e-3
    assert torch.all(abar[1:] < abar[:-1])
    if importlib.util.find_spec("diffusers"):  # the same numbers as diffusers' squaredcos_cap_v2
        from diffusers import DDPMScheduler

        ref = DDPMScheduler(num_train_timesteps=300, beta_schedule="squaredcos_cap_v2").alphas_cumprod
        torch.testing.assert_close(abar.float(), ref.float(), rtol=1e-5, atol=1e-6)


def test_lesion_histograms_and_decomposition():
    image = torch.zeros(1, 1, 2, 4, 4)
    image[..., :2] = 1.0  # [0, 1] -> x0 = +1 on the left half, -1 on the right
    seg = torch.zeros(1, 1, 2, 4, 4, dtype=torch.int64)
    seg[0, 0, 0, :, 1:3] = 1  # class 1: half at +1, half at -1
    seg[0, 0, 1, :, :2] = 2  # class 2: all at +1
    x0, masks = decompose(image, seg, 2)
    assert x0.shape == (1, 2, 2, 4, 4) and float(x0.min()) == -1 and float(x0.max()) == 1
    assert masks[0, 0].sum() == 8 and masks[0, 1].sum() == 8
    h = lesion_histograms(x0, masks, bins=4).reshape(2, 4)
    torch.testing.assert_close(h, torch.tensor([[0.5, 0, 0, 0.5], [0, 0, 0, 1.0]]))
    empty = lesion_histograms(x0, torch.zeros_like(masks), bins=4)
    assert float(empty.abs().sum()) == 0


def test_batch_is_the_noised_roi_with_lesion_masks():
    task = get_task("lesion_diffusion", 2, timesteps=300)
    rng = np.random.default_rng(0)
    sample = {"image": rng.random((3, 1, 6, 16, 16)).astype(np.float32), "seg": np.zeros((3, 1, 6, 16, 16), np.uint8)}
    sample["seg"][:, :, 2:4, 5:9, 5:9] = 1
    batch = task.make_batch(sample, "cpu", (6, 16, 16), AugmentConfig(p_mirror=0.0), torch.Generator().manual_seed(0))
    x0 = torch.from_numpy(sample["image"]) * 2 - 1
    abar = task.alphas_cumprod[batch.cond["timesteps"]].view(3, 1, 1, 1, 1)
    torch.testing.assert_close(batch.image, abar.sqrt() * x0 + (1 - abar).sqrt() * batch.target)
    assert batch.extras["loss_mask"].sum() == 3 * 32 and batch.cond["histogram"].shape == (3, 16)
    torch.testing.assert_close(batch.cond["histogram"].sum(1), torch.ones(3))


def test_denoiser_keeps_depth_and_reads_time_and_histogram():
    net = create_model("lefusion_unet", 1, 3, base=8, mults=[1, 2, 4], groups=4, heads=2, head_dim=8).eval()
    x = torch.randn(2, 2, 5, 16, 16)  # two lesion classes -> two channels; depth 5 is never downsampled
    h = torch.rand(2, 32)
    y = net(x, timesteps=torch.tensor([3, 250]), histogram=h)
    assert y.shape == x.shape
    assert not torch.allclose(y, net(x, timesteps=torch.tensor([3, 250]), histogram=h.flip(0)))
    assert not torch.allclose(y, net(x, timesteps=torch.tensor([100, 100]), histogram=h))
    with pytest.raises(ValueError, match="single-channel"):
        create_model("lefusion_unet", 2, 2)


def test_condition_dropout_zeroes_whole_histograms():
    """cond_dropout p: each sample's histogram is all zeros with probability p, else the real one."""
    task = get_task("lesion_diffusion", 2, cond_dropout=0.5)
    sample = {"image": np.full((64, 1, 2, 8, 8), 0.5, np.float32), "seg": np.ones((64, 1, 2, 8, 8), np.uint8)}
    batch = task.make_batch(sample, "cpu", (2, 8, 8), AugmentConfig(p_mirror=0.0), torch.Generator().manual_seed(0))
    sums = batch.cond["histogram"].sum(1)
    assert set(sums.tolist()) == {0.0, 1.0} and 16 <= int((sums == 0).sum()) <= 48
    with pytest.raises(ValueError, match="cond_dropout"):
        get_task("lesion_diffusion", 2, cond_dropout=1.0)


def test_histogram_scale_and_classifier_free_guidance():
    from medseg.apps.synthesis import guided_noise

    torch.manual_seed(0)
    kw = {"base": 8, "mults": [1, 2], "groups": 4, "heads": 2, "head_dim": 8}
    net = create_model("lefusion_unet", 1, 2, **kw).eval()
    scaled = create_model("lefusion_unet", 1, 2, hist_scale=16, **kw).eval()
    scaled.load_state_dict(net.state_dict())
    x, h, t = torch.randn(1, 1, 3, 16, 16), torch.softmax(torch.randn(1, 16), 1), torch.tensor([40])
    with torch.no_grad():
        torch.testing.assert_close(scaled(x, timesteps=t, histogram=h), net(x, timesteps=t, histogram=h * 16))
        cond, uncond = net(x, timesteps=t, histogram=h), net(x, timesteps=t, histogram=torch.zeros_like(h))
        torch.testing.assert_close(guided_noise(net, x, 40, h, 1.0), cond)
        torch.testing.assert_close(guided_noise(net, x, 40, h, 0.0), uncond, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(guided_noise(net, x, 40, h, 3.0), uncond + 3 * (cond - uncond), rtol=1e-4, atol=1e-5)


def test_trains_on_real_lidc_vois_through_medseg_train(tmp_path, monkeypatch, capsys):
    names = sorted(p.name[: -len(".nii.gz")] for p in (LIDC / "labelsTr").glob("*.nii.gz"))[:5] if LIDC.is_dir() else []
    data = copy_cases(LIDC, tmp_path / "Dataset501_LIDC", names)
    ws = tmp_path / "ws"
    assert run_main(monkeypatch, capsys, "plan", data, "-w", ws, "--normalization", "0=range:-1000,400")[0] == 0
    assert run_main(monkeypatch, capsys, "preprocess", data, "-w", ws)[0] == 0
    args = ["train", data, "-w", ws, "--arch", "lefusion_unet", "--model-kwargs", '{"base": 8, "mults": [1, 2]}',
            "--epochs", "1", "--iterations", "2", "--val-iterations", "1", "--schedule", "constant",
            "--ema-decay", "0.995", "--checkpoint-every", "1", "--task-options", '{"cond_dropout": 0.1}',
            "-o", tmp_path / "m"]  # fmt: skip
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "task lesion_diffusion" in err and "lesion noise L1" in err
    spec = json.loads((tmp_path / "m" / "model.json").read_text())
    assert spec["task"] == "lesion_diffusion" and spec["training"]["optimizer"] == "adam"
    assert spec["training"]["loss"] == "masked_l1" and spec["training"]["ema_decay"] == 0.995
    assert spec["training"]["task_options"] == {"cond_dropout": 0.1}  # synthesize then guides by default
    code, _, err = run_main(monkeypatch, capsys, *[a if a != "1" else "2" for a in args], "--resume")
    assert code == 0 and "resumed from" in err
    log = [json.loads(line) for line in (tmp_path / "m" / "fold_0" / "training_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(r["lesion_noise_l1"] > 0 for r in log)


@pytest.fixture(scope="module")
def tiny_lefusion(tmp_path_factory):
    """A tiny denoiser trained briefly on three real LIDC VOIs (a real model folder)."""
    from medseg import api
    from medseg.training.config import TrainingConfig

    root = tmp_path_factory.mktemp("lefusion")
    names = sorted(p.name[: -len(".nii.gz")] for p in (LIDC / "labelsTr").glob("*.nii.gz"))[:3] if LIDC.is_dir() else []
    data = copy_cases(LIDC, root / "Dataset501_LIDC", names)
    api.plan(data, root / "ws", normalization={0: "range:-1000,400"}, progress=False)
    api.preprocess(data, root / "ws", progress=False)
    cfg = TrainingConfig(model="lefusion_unet", model_kwargs={"base": 8, "mults": [1, 2]}, epochs=1,
                         iterations_per_epoch=2, val_iterations=0, schedule="constant", device="cpu")  # fmt: skip
    api.train(data, root / "ws", fold="all", config=cfg, output=root / "m", log=lambda *a: None)
    return root / "m", data, names


@pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="sampling needs medseg[synthesis] (diffusers)"
)
def test_synthesize_keeps_everything_outside_the_mask(tiny_lefusion, tmp_path, monkeypatch, capsys):
    from medseg.io.image import read_image

    model, data, names = tiny_lefusion
    img_path, mask_path = data / "imagesTr" / f"{names[0]}_0000.nii.gz", data / "labelsTr" / f"{names[0]}.nii.gz"
    before = img_path.read_bytes()
    args = ["synthesize", "-m", model, "-i", img_path, "--mask", mask_path, "--steps", "4", "--jump-length", "2",
            "--jump-n-sample", "2", "--device", "cpu"]  # fmt: skip
    code, out, err = run_main(monkeypatch, capsys, *args, "-o", tmp_path / "a.nii.gz")
    assert code == 0, err
    image, _ = read_image(img_path)
    mask, _ = read_image(mask_path)
    new, _ = read_image(tmp_path / "a.nii.gz")
    inside = mask > 0
    assert new.dtype == image.dtype and new.shape == image.shape
    np.testing.assert_array_equal(new[~inside], image[~inside])  # bit for bit outside the lesion
    assert np.abs(new[inside].astype(float) - image[inside]).mean() > 1  # the lesion is new
    assert -1000 <= new[inside].min() and new[inside].max() <= 400  # HU inside the model's window
    np.testing.assert_array_equal(read_image(tmp_path / "a_mask.nii.gz")[0], mask)
    assert img_path.read_bytes() == before
    code, _, _ = run_main(monkeypatch, capsys, *args, "-o", tmp_path / "b.nii.gz")
    np.testing.assert_array_equal(read_image(tmp_path / "b.nii.gz")[0], new)  # same seed, same lesion
    # bad input: one line, nothing written
    empty = tmp_path / "empty.nii.gz"
    from medseg.io.image import write_image

    write_image(np.zeros_like(mask), read_image(mask_path)[1], empty)
    bad = [a if a != mask_path else empty for a in args]
    for cmd, message in ((bad + ["-o", tmp_path / "c.nii.gz"], "the mask is empty"),
                         (args + ["-o", tmp_path / "a.nii.gz"], "exists")):  # fmt: skip
        code, _, err = run_main(monkeypatch, capsys, *cmd)
        assert code == 2 and message in err and err.count("medseg: error:") == 1
    assert not (tmp_path / "c.nii.gz").exists()


def test_texture_clusters_are_written_listed_and_jittered(tiny_lefusion, monkeypatch, capsys):
    from medseg.apps.synthesis import read_textures, texture_histogram
    from medseg.tasks.lesion_diffusion import texture_clusters

    model, _, _ = tiny_lefusion
    tex = read_textures(model)
    assert tex["bins"] == 16 and tex["classes"] == 1 and [t["id"] for t in tex["textures"]] == [0, 1, 2]
    means = [t["mean_hu"] for t in tex["textures"]]
    assert means == sorted(means) and all(-1000 <= m <= 400 for m in means)
    for t in tex["textures"]:
        assert abs(sum(t["histogram"]) - 1) < 1e-4
    code, out, _ = run_main(monkeypatch, capsys, "synthesize", "-m", model, "--list-textures")
    assert code == 0 and [line.split()[0] for line in out.strip().splitlines()] == ["0", "1", "2"] and "HU" in out
    h = np.asarray(tex["textures"][1]["histogram"])
    j = texture_histogram(tex, 1, seed=3)
    assert abs(j.sum() - 1) < 1e-5 and np.all(j[h == 0] == 0) and np.abs(j - h).max() <= 0.25 * h.max()
    assert not np.allclose(j, texture_histogram(tex, 1, seed=4))
    code, _, err = run_main(
        monkeypatch, capsys, "synthesize", "-m", model, "--texture", "7", "--image", "x", "--mask", "y", "-o", "z"
    )
    assert code == 2 and err.count("medseg: error:") == 1
    # two clearly different textures come out as two clusters, darker first
    rng = np.random.default_rng(0)
    dark, bright = np.eye(16)[3], np.eye(16)[12]
    hists = np.stack(
        [dark + 0.01 * rng.random(16) for _ in range(5)] + [bright + 0.01 * rng.random(16) for _ in range(4)]
    )
    res = texture_clusters(hists, 2, 16, (-1000, 400))
    assert [t["cases"] for t in res["textures"]] == [5, 4] and res["textures"][0]["mean_hu"] < res["textures"][1][
        "mean_hu"
    ]


def test_enclosing_sphere_and_mask_cleaning():
    from medseg.apps.synthesis import clean_mask
    from medseg.tasks.lesion_diffusion import enclosing_sphere, sphere

    m = torch.zeros(1, 1, 9, 9, 9)
    m[0, 0, 3:6, 3:6, 3:6] = 1
    ball = enclosing_sphere(m)
    assert ball[0, 0, 4, 4, 4] == 1 and ball[0, 0, 0, 0, 0] == -1 and bool((ball[m > 0] == 1).all())
    np.testing.assert_array_equal(
        sphere((9, 9, 9), (4, 4, 4), 2.0)[0, 0, 4, 4].numpy() > 0, np.abs(np.arange(9) - 4) <= 2
    )
    prob = np.zeros((12, 20, 20), np.float32)
    prob[2:10, 3:15, 3:15] = 1
    prob[5, 8, 8] = 0  # a hole
    prob[0, 18:20, 18:20] = 1  # a speck
    out = clean_mask(prob)
    assert out.dtype == np.uint8 and out[5, 8, 8] == 1 and out[0, 19, 19] == 0
    assert clean_mask(np.zeros((4, 4, 4), np.float32)).sum() == 0


@pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="sampling needs medseg[synthesis] (diffusers)"
)
def test_diffmask_trains_and_draws_one_lesion_on_the_image_grid(tiny_lefusion, tmp_path, monkeypatch, capsys):
    from medseg import api
    from medseg.io.image import read_image
    from medseg.training.config import TrainingConfig

    _, data, names = tiny_lefusion
    root = data.parent
    cfg = TrainingConfig(model="diffmask_unet", model_kwargs={"base": 8, "mults": [1, 2]}, epochs=1,
                         iterations_per_epoch=2, val_iterations=0, schedule="constant", device="cpu")  # fmt: skip
    api.train(data, root / "ws", fold="all", config=cfg, output=tmp_path / "dm", log=lambda *a: None)
    like = data / "imagesTr" / f"{names[0]}_0000.nii.gz"
    image, _ = read_image(like)
    centre = [s // 2 for s in image.shape]
    args = ["synthesize-mask", "-m", tmp_path / "dm", "--like", like, "--centre", *centre, "--radius", "6",
            "--steps", "5", "--device", "cpu"]  # fmt: skip
    code, out, err = run_main(monkeypatch, capsys, *args, "-o", tmp_path / "m.nii.gz")
    assert code == 0, err
    mask, _ = read_image(tmp_path / "m.nii.gz")
    assert mask.shape == image.shape and set(np.unique(mask)) <= {0, 1}
    import cc3d

    assert cc3d.connected_components(mask.astype(np.uint8)).max() <= 1  # one lesion at most
    code, _, err = run_main(
        monkeypatch, capsys, *[a if a != centre[0] else 999 for a in args], "-o", tmp_path / "x.nii.gz"
    )
    assert code == 2 and "outside the image" in err and not (tmp_path / "x.nii.gz").exists()
    code, _, err = run_main(monkeypatch, capsys, "synthesize-mask", "-m", data.parent / "m", "--like", like, "--centre",
                            *centre, "--radius", "6", "-o", tmp_path / "y.nii.gz")  # fmt: skip
    assert code == 2 and "not a mask-diffusion" in err


@pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="sampling needs medseg[synthesis] (diffusers)"
)
def test_synthesize_a_dataset_resumes_and_keeps_backgrounds(tiny_lefusion, tmp_path, monkeypatch, capsys):
    from medseg.io.image import read_image

    model, data, names = tiny_lefusion
    args = ["synthesize", "-m", model, "-i", data, "-o", tmp_path / "syn", "--samples", "2", "--all-textures",
            "--steps", "2", "--jump-length", "1", "--jump-n-sample", "1", "--device", "cpu"]  # fmt: skip
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    record = json.loads((tmp_path / "syn" / "synthesis.json").read_text())
    assert [r["texture"] for r in record["cases"]] == [0, 1] * len(names)
    first = tmp_path / "syn" / "imagesTr" / f"{names[0]}_syn1_0000.nii.gz"
    image, _ = read_image(data / "imagesTr" / f"{names[0]}_0000.nii.gz")
    mask, _ = read_image(data / "labelsTr" / f"{names[0]}.nii.gz")
    new, _ = read_image(first)
    np.testing.assert_array_equal(new[mask == 0], image[mask == 0])
    np.testing.assert_array_equal(read_image(tmp_path / "syn" / "labelsTr" / f"{names[0]}_syn1.nii.gz")[0], mask)
    assert json.loads((tmp_path / "syn" / "dataset.json").read_text())["numTraining"] == 2 * len(names)
    stamp = first.stat().st_mtime_ns
    assert run_main(monkeypatch, capsys, *args)[0] == 0  # a rerun skips what is written
    assert first.stat().st_mtime_ns == stamp
    assert run_main(monkeypatch, capsys, "verify", tmp_path / "syn")[0] == 0  # a dataset medseg can train on


def test_synthesize_refuses_mismatched_masks_and_double_textures(tiny_lefusion, tmp_path, monkeypatch, capsys):
    from medseg.io.image import read_image, write_image

    model, data, names = tiny_lefusion
    img = data / "imagesTr" / f"{names[0]}_0000.nii.gz"
    mask, meta = read_image(data / "labelsTr" / f"{names[0]}.nii.gz")
    small = tmp_path / "small.nii.gz"
    write_image(mask[:, :-2], meta, small)
    (tmp_path / "h.json").write_text("[" + ",".join(["0.0625"] * 16) + "]")
    for extra, message in ((["--mask", small], "is not the image's"),
                           (["--mask", data / "labelsTr" / f"{names[0]}.nii.gz", "--texture", "0", "--histogram",
                             tmp_path / "h.json"], "not both"),
                           (["--mask", data / "labelsTr" / f"{names[0]}.nii.gz", "--guidance", "2"],
                            "trained without cond_dropout")):  # fmt: skip
        code, _, err = run_main(
            monkeypatch, capsys, "synthesize", "-m", model, "-i", img, *extra, "-o", tmp_path / "o.nii.gz"
        )
        assert code == 2 and message in err and err.count("medseg: error:") == 1
    assert not (tmp_path / "o.nii.gz").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="sampling needs medseg[synthesis] (diffusers)"
)
def test_synthesize_a_csv_table_checks_every_row_first_and_resumes(tiny_lefusion, tmp_path, monkeypatch, capsys):
    from medseg.io.image import read_image

    model, data, names = tiny_lefusion
    table = tmp_path / "jobs.csv"
    img, lab = data / "imagesTr" / f"{names[0]}_0000.nii.gz", data / "labelsTr" / f"{names[0]}.nii.gz"
    (tmp_path / "h.json").write_text(json.dumps([1 / 16] * 16))
    rows = ["image,mask,texture,histogram,seed,output", f"{img},{lab},1,,5,a.nii.gz", f"{img},{lab},,h.json,,",
            f"{data / 'imagesTr' / f'{names[1]}_0000.nii.gz'},{data / 'labelsTr' / f'{names[1]}.nii.gz'},,,,"]  # fmt: skip
    args = ["synthesize", "-m", model, "--steps", "2", "--jump-length", "1", "--jump-n-sample", "1", "--device", "cpu"]
    bad = {"image,mask,colour\n": "unknown column(s) colour",
           f"image,mask\n{img},{tmp_path / 'missing.nii.gz'}\n": "line 2: mask",
           f"image,mask,texture\n{img},{lab},9\n": "line 2: texture 9 is not one of",
           f"image,mask,output\n{img},{lab},x.nii.gz\n{img},{lab},x.nii.gz\n": "line 3: output x.nii.gz"}  # fmt: skip
    for text, message in bad.items():
        table.write_text(text)
        code, _, err = run_main(monkeypatch, capsys, *args, "-i", table, "-o", tmp_path / "bad")
        assert code == 2 and message in err and "jobs.csv" in err and err.count("medseg: error:") == 1, err
        assert not (tmp_path / "bad").exists()  # checked before anything is sampled or written
    table.write_text("\n".join(rows) + "\n")
    code, _, err = run_main(monkeypatch, capsys, *args, "-i", table, "-o", tmp_path / "out")
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "synthesis.json").read_text())["jobs"]
    assert [(r["output"], r["texture"], r["seed"]) for r in record] == [
        ("a.nii.gz", 1, 5), (f"{names[0]}_0000_syn1.nii.gz", None, 1), (f"{names[1]}_0000_syn2.nii.gz", None, 2)]  # fmt: skip
    image, mask = read_image(img)[0], read_image(lab)[0]
    for out in ("a", f"{names[0]}_0000_syn1"):
        new = read_image(tmp_path / "out" / f"{out}.nii.gz")[0]
        np.testing.assert_array_equal(new[mask == 0], image[mask == 0])
        np.testing.assert_array_equal(read_image(tmp_path / "out" / f"{out}_mask.nii.gz")[0], mask)
    stamp = (tmp_path / "out" / "a.nii.gz").stat().st_mtime_ns
    assert run_main(monkeypatch, capsys, *args, "-i", table, "-o", tmp_path / "out")[0] == 0  # resumes: nothing redone
    assert (tmp_path / "out" / "a.nii.gz").stat().st_mtime_ns == stamp


IRCAD = SHARED_DATA / "ircad_liver_tumor_ct_slabs"  # CC BY-NC-ND 4.0: used from ../shared only, nothing written back


@pytest.mark.skipif(not IRCAD.is_dir(), reason="needs ../shared/data/ircad_liver_tumor_ct_slabs")
@pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="sampling needs medseg[synthesis] (diffusers)"
)
def test_two_lesion_classes_one_channel_each_on_real_liver_tumour_ct(tmp_path, monkeypatch, capsys):
    """Multi-channel decomposition on a real two-class case: IRCAD liver (1) and tumour (2), ROIs around
    the tumours built in a temporary folder at test time (the licence forbids sharing derivatives)."""
    from medseg import api
    from medseg.io.checkpoint import load_spec
    from medseg.io.image import read_image, write_image
    from medseg.training.config import TrainingConfig

    data = tmp_path / "Dataset777_IrcadRoi"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    for case in ("ircad_01", "ircad_07"):
        image, meta = read_image(IRCAD / "imagesTr" / f"{case}_0000.nii.gz")
        label = np.zeros(image.shape, np.uint8)
        for mask_file in sorted((IRCAD / "masks" / case).glob("*.nii.gz")):  # liver = 1, any tumour = 2 (overrides)
            m = read_image(mask_file)[0] > 0
            label[m] = np.maximum(label[m], 2 if "tumor" in mask_file.name else 1)
        # an ROI where both classes are: around the midpoint of the liver's and the tumours' centroids
        _, y, x = np.mean([np.argwhere(label == k).mean(0) for k in (1, 2)], axis=0).astype(int)
        roi = (slice(None), slice(max(y - 32, 0), y + 32), slice(max(x - 32, 0), x + 32))
        assert all((label[roi] == k).sum() > 100 for k in (1, 2))
        write_image(image[roi].copy(), meta, data / "imagesTr" / f"{case}_0000.nii.gz")
        write_image(label[roi].copy(), meta, data / "labelsTr" / f"{case}.nii.gz")
    (data / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
        "labels": {"background": 0, "liver": 1, "tumor": 2}, "numTraining": 2}))  # fmt: skip
    api.plan(data, tmp_path / "ws", normalization={0: "range:-200,300"}, progress=False)
    api.preprocess(data, tmp_path / "ws", progress=False)
    cfg = TrainingConfig(model="lefusion_unet", model_kwargs={"base": 8, "mults": [1, 2]}, epochs=1,
                         iterations_per_epoch=2, val_iterations=0, schedule="constant", device="cpu")  # fmt: skip
    api.train(data, tmp_path / "ws", fold="all", config=cfg, output=tmp_path / "m", log=lambda *a: None)
    spec = load_spec(tmp_path / "m")
    assert spec.build().input_channels == 2  # one channel per lesion class
    tex = json.loads((tmp_path / "m" / "textures.json").read_text())
    assert tex["classes"] == 2 and len(tex["textures"][0]["histogram"]) == 2 * tex["bins"]
    img, lab = data / "imagesTr" / "ircad_07_0000.nii.gz", data / "labelsTr" / "ircad_07.nii.gz"
    code, _, err = run_main(monkeypatch, capsys, "synthesize", "-m", tmp_path / "m", "-i", img, "--mask", lab,
                            "--steps", "3", "--jump-length", "1", "--jump-n-sample", "1", "--texture", "0",
                            "--device", "cpu", "-o", tmp_path / "syn.nii.gz")  # fmt: skip
    assert code == 0, err
    image, label, new = read_image(img)[0], read_image(lab)[0], read_image(tmp_path / "syn.nii.gz")[0]
    np.testing.assert_array_equal(new[label == 0], image[label == 0])  # outside both classes: bit for bit
    for k in (1, 2):  # each class's region is generated (merged by class mask) within the model's window
        inside = label == k
        assert np.abs(new[inside].astype(float) - image[inside]).mean() > 1
        assert -200 <= new[inside].min() and new[inside].max() <= 300


HELD_OUT_VOI = BUNDLED_DATA / "lidc_ood_2"  # lidc_0048_n03: a patient bench_lefusion holds out (never trained on)


@pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="sampling needs medseg[synthesis] (diffusers)"
)
def test_shipped_lidc_lefusion_draws_the_asked_texture_into_a_held_out_voi(tmp_path, monkeypatch, capsys):
    """``medseg synthesize -m lidc-lefusion``: a real held-out VOI and its nodule mask in, a new nodule out
    (background bit for bit); the dense texture's nodule is far brighter than the faint one's, and each
    one's histogram is nearest its own texture centre."""
    from medseg.apps.synthesis import read_textures
    from medseg.io.checkpoint import resolve_model
    from medseg.io.image import read_image

    img_path = HELD_OUT_VOI / "imagesTr" / "lidc_0048_n03_0000.nii.gz"
    mask_path = HELD_OUT_VOI / "labelsTr" / "lidc_0048_n03.nii.gz"
    code, out, _ = run_main(monkeypatch, capsys, "synthesize", "-m", "lidc-lefusion", "--list-textures")
    assert code == 0 and len(out.strip().splitlines()) == 3
    tex = read_textures(Path(resolve_model("lidc-lefusion")))
    centres = np.asarray([t["histogram"] for t in tex["textures"]])
    image, _ = read_image(img_path)
    inside = read_image(mask_path)[0] > 0
    results = {}
    for k in (0, 2):
        args = ["synthesize", "-m", "lidc-lefusion", "-i", img_path, "--mask", mask_path, "--texture", str(k),
                "--steps", "20", "--jump-length", "5", "--jump-n-sample", "1", "--seed", "0", "-o", tmp_path / f"t{k}.nii.gz"]  # fmt: skip
        code, _, err = run_main(monkeypatch, capsys, *args)
        assert code == 0, err
        new, _ = read_image(tmp_path / f"t{k}.nii.gz")
        assert new.dtype == image.dtype and new.shape == image.shape
        np.testing.assert_array_equal(new[~inside], image[~inside])
        v = (np.clip(new[inside].astype(np.float64), -1000, 400) + 1000) / 1400 * 2 - 1
        h = np.histogram(v, bins=16, range=(-1, 1))[0] / inside.sum()
        results[k] = (new[inside].mean(), np.abs(centres - h).sum(1))
    # measured on an AMX Xeon (guidance 2, the model's default): -615 vs -133 HU; texture 0's histogram at L1
    # 0.68 from its centre (1.42, 1.58 from the others), texture 2's at 0.46 (0.82, 0.75)
    assert results[2][0] > results[0][0] + 300  # HU: dense vs faint texture
    assert [int(np.argmin(results[k][1])) for k in (0, 2)] == [0, 2]  # each nearest the texture asked
