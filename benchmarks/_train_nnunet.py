"""Driver run inside benchmarks/.venvs/nnunetv2 by bench_training.py (not a user script).

Builds nnU-Net v2's own ``nnUNetTrainer`` from its plans (batch size / features per stage /
patch overridden on the command line), starts it exactly as ``nnUNetv2_train`` would
(``on_train_start``: network, loss, optimizer, nnUNetDataLoader + batchgeneratorsv2
augmentation in nnU-Net's background workers) and times ``train_step(next(dataloader_train))``
per iteration. Validation, checkpointing and logging are left out (the same is left out on
the medseg side). Needs nnUNet_raw / nnUNet_preprocessed / nnUNet_results in the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--features", type=int, nargs="+", required=True)
    p.add_argument("--patch", type=int, nargs="+", required=True)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--result", required=True)
    args = p.parse_args()

    torch.set_num_threads(args.threads)  # what nnUNetv2_train -device cpu does (all cores)
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    class BenchTrainer(nnUNetTrainer):
        def plot_network_architecture(self):  # optional hiddenlayer PDF; irrelevant here
            pass

    base = join(nnUNet_preprocessed, args.dataset)
    plans = load_json(join(base, "nnUNetPlans.json"))
    cfg = plans["configurations"]["3d_fullres"]
    planned = {
        "batch": cfg["batch_size"],
        "patch": cfg["patch_size"],
        "features": cfg["architecture"]["arch_kwargs"]["features_per_stage"],
    }
    arch = cfg["architecture"]["arch_kwargs"]
    if len(args.features) != arch["n_stages"]:
        raise SystemExit(f"--features needs {arch['n_stages']} entries (nnU-Net plan has {arch['n_stages']} stages)")
    cfg["batch_size"] = args.batch
    cfg["patch_size"] = list(args.patch)
    arch["features_per_stage"] = list(args.features)
    plans["continue_training"] = False
    trainer = BenchTrainer(plans, "3d_fullres", 0, load_json(join(base, "dataset.json")), device=torch.device("cpu"))
    trainer.disable_checkpointing = True
    trainer.num_epochs = 1

    t0 = time.perf_counter()
    trainer.on_train_start()
    setup_s = time.perf_counter() - t0
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    n_params = sum(p.numel() for p in trainer.network.parameters())
    iters, data, losses = [], [], []
    for _ in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        batch = next(trainer.dataloader_train)
        t1 = time.perf_counter()
        out = trainer.train_step(batch)
        t2 = time.perf_counter()
        iters.append(t2 - t0)
        data.append(t1 - t0)
        losses.append(float(out["loss"]))
    for dl in (trainer.dataloader_train, trainer.dataloader_val):
        if hasattr(dl, "_finish"):
            dl._finish()
    result = {
        "framework": "nnU-Net",
        "params": n_params,
        "batch": trainer.batch_size,
        "patch": list(trainer.configuration_manager.patch_size),
        "features": list(args.features),
        "da_processes": get_allowed_n_proc_DA(),
        "torch_threads": torch.get_num_threads(),
        "planned": planned,
        "setup_s": setup_s,
        "warmup": args.warmup,
        "iter_s": iters[args.warmup :],
        "data_wait_s": data[args.warmup :],
        "losses": losses,
    }
    with open(args.result, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
