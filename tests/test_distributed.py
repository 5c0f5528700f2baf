"""Multi-process DDP training on CPU (gloo) through torchrun, as users launch it.

A small launcher wraps ``medseg.cli`` in each rank and records every file the rank writes
(os.replace / os.open / open for writing) plus the rank's final weights, so the test can check
that only rank 0 writes and that DDP kept the ranks in sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from medseg import api
from medseg.io.checkpoint import load_spec, load_weights
from medseg.training import distributed
from medseg.workspace import Workspace

LAUNCHER = textwrap.dedent("""
    import builtins, io, json, os, sys

    RANK = os.environ.get("RANK", "0")
    RECORD = os.environ["MEDSEG_TEST_RECORD"]
    WATCH = [os.path.realpath(p) for p in os.environ["MEDSEG_TEST_WATCH"].split(os.pathsep)]
    _open, _os_open, _replace = builtins.open, os.open, os.replace

    def note(kind, path):
        try:
            p = os.path.realpath(os.fspath(path))
        except TypeError:
            return
        if any(p == w or p.startswith(w + os.sep) for w in WATCH):
            with _open(os.path.join(RECORD, f"writes_rank{RANK}.jsonl"), "a") as fh:
                fh.write(json.dumps({"kind": kind, "path": p}) + "\\n")

    def replace(src, dst, *a, **k):
        note("replace", dst)
        return _replace(src, dst, *a, **k)

    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            note("os.open", path)
        return _os_open(path, flags, *a, **k)

    def open_(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            note("open", file)
        return _open(file, mode, *a, **k)

    os.replace, os.open, builtins.open, io.open = replace, os_open, open_, open_

    from safetensors.torch import save_file
    from medseg.training import trainer as T

    _fit = T.Trainer.fit

    def fit(self, *args, **kwargs):
        out = _fit(self, *args, **kwargs)
        info = {"rank": self.dist.rank, "world_size": self.dist.world_size, "batch_size": self.batch_size,
                "ddp": type(self.ddp_model).__name__, "train": self.train_names, "val": self.val_names,
                "epochs_logged": len(self.history)}
        with _open(os.path.join(RECORD, f"info_rank{RANK}.json"), "w") as fh:
            json.dump(info, fh)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, os.path.join(RECORD, f"weights_rank{RANK}.safetensors"))
        return out

    T.Trainer.fit = fit

    from medseg.cli import main

    sys.argv = ["medseg"] + sys.argv[1:]
    main()
""")


def test_setup_without_torchrun_is_single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = distributed.setup("cpu")
    assert (info.rank, info.world_size, info.is_main, info.enabled) == (0, 1, True, False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    info = distributed.setup("cpu")
    assert not info.enabled and not torch.distributed.is_initialized()
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_reduce_sum(t, info), torch.tensor([1.0, 2.0]))
    distributed.barrier(info)  # no-ops without a process group
    distributed.teardown(info)


@pytest.fixture(scope="module")
def prepared(hippo_dataset, tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("ddp_ws"))
    api.plan(hippo_dataset, ws, progress=False)
    api.preprocess(hippo_dataset, ws, workers=1, progress=False)
    return hippo_dataset, ws


def test_torchrun_two_ranks_on_cpu(prepared, tmp_path):
    dataset, ws = prepared
    out, record = tmp_path / "model", tmp_path / "record"
    record.mkdir()
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MEDSEG_TEST_RECORD": str(record),
        "MEDSEG_TEST_WATCH": os.pathsep.join([str(out), str(ws.root)]),
    }
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(launcher),
        "train",
        str(dataset),
        "-w",
        str(ws.root),
        "-o",
        str(out),
        "--epochs",
        "1",
        "--iterations",
        "2",
        "--val-iterations",
        "1",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--model-kwargs",
        json.dumps({"features": [4, 8, 16, 32]}),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    infos = [json.loads((record / f"info_rank{r}.json").read_text()) for r in (0, 1)]
    plan_batch = load_spec(out).plan.configuration("3d_fullres").batch_size
    for r, info in enumerate(infos):
        assert info["rank"] == r and info["world_size"] == 2
        assert info["ddp"] == "DistributedDataParallel"
        assert info["batch_size"] == max(1, plan_batch // 2)
        assert info["epochs_logged"] == 1
    assert infos[0]["train"] == infos[1]["train"] and infos[0]["val"] == infos[1]["val"]

    # only rank 0 writes: checkpoint, spec, log, splits, final validation
    written0 = {json.loads(line)["path"] for line in (record / "writes_rank0.jsonl").read_text().splitlines()}
    rank1 = record / "writes_rank1.jsonl"
    assert not rank1.exists(), f"rank 1 wrote files: {rank1.read_text()}"
    fold = out / "fold_0"
    for f in (
        fold / "model.safetensors",
        fold / "checkpoint.json",
        fold / "training_state.pt",
        out / "model.json",
        fold / "training_log.jsonl",
        fold / "validation" / "summary.json",
    ):
        assert str(f.resolve()) in written0, f"{f} not written by rank 0"
    assert any(p.endswith("splits_final.json") for p in written0)
    assert len((fold / "training_log.jsonl").read_text().splitlines()) == 1
    assert not [p for p in fold.rglob("*") if ".part" in p.name]

    # DDP kept both ranks identical, and the checkpoint is that model
    from safetensors.torch import load_file

    w0, w1 = (load_file(str(record / f"weights_rank{r}.safetensors")) for r in (0, 1))
    saved = load_weights(fold)
    assert w0.keys() == w1.keys() == saved.keys()
    for k in saved:
        assert torch.allclose(w0[k], w1[k], atol=1e-6), f"ranks diverged at {k}"
        assert torch.equal(w0[k], saved[k])

    # the saved model loads and predicts
    from medseg.inference.predictor import Predictor
    from medseg.io.image import read_image

    predictor = Predictor.from_folder(out, device="cpu", tta=False)
    image, meta = read_image(next((dataset / "imagesTr").glob("*.nii.gz")))
    seg, _ = predictor.predict_array(image[None], meta)
    assert seg.shape == image.shape and set(np.unique(seg)) <= {0, 1, 2}
