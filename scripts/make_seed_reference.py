"""Record what a short seeded hippocampus training run does (batches, losses, weights), so that
refactors of the training loop can be checked to change nothing (tests/test_seed_reference.py).

    .venv/bin/python scripts/make_seed_reference.py tests/fixtures/seed_reference_hippocampus.json

The run: 4 real MSD hippocampus cases, fold 0, 2 epochs x 3 iterations, 2 validation batches,
float32 (no autocast), one CPU thread, seed 0. Recorded per training step: image sum, image |sum|
and label sum of the augmented batch, the loss; per epoch the log record; at the end a sum and
a sum of squares per weight tensor.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"]
CONFIG = dict(epochs=2, iterations_per_epoch=3, val_iterations=2, amp=False, num_threads=1,
              final_validation=False, checkpoint_every=1, seed=0, device="cpu")


def run(workdir: Path, record_batches) -> dict:
    """Plan, preprocess and train; ``record_batches(trainer_module, steps)`` installs the hook that
    appends (image_sum, image_abs_sum, seg_sum, loss) per training step to ``steps``."""
    from conftest import copy_hippo_cases

    from medseg import api
    from medseg.training.config import TrainingConfig

    data = copy_hippo_cases(workdir / "Dataset004_Hippocampus", CASES)
    ws = workdir / "ws"
    api.plan(data, workspace=ws, progress=False)
    api.preprocess(data, workspace=ws, workers=1, progress=False)
    steps: list[list[float]] = []
    undo = record_batches(steps)
    try:
        api.train(data, workspace=ws, fold=0, config=TrainingConfig(**CONFIG), log=lambda *a, **k: None)
    finally:
        undo()
    from medseg.io.checkpoint import load_weights

    fold_dirs = list((ws / "results").rglob("fold_0"))
    weights = load_weights(fold_dirs[0])
    log = [json.loads(line) for line in (fold_dirs[0] / "training_log.jsonl").read_text().splitlines()]
    return {
        "config": CONFIG,
        "cases": CASES,
        "steps": steps,
        "log": [{k: r[k] for k in ("train_loss", "val_loss", "pseudo_dice", "lr")} for r in log],
        "weights": {k: [float(v.double().sum()), float((v.double() ** 2).sum())] for k, v in sorted(weights.items())},
    }


def record_old_trainer(steps):
    """Hooks for the Trainer as of be952cc: ``_batch`` and ``_forward_loss``."""
    from medseg.training.trainer import Trainer

    orig_batch, orig_loss = Trainer._batch, Trainer._forward_loss

    def batch(self, sampler, g, augment):
        img, seg = orig_batch(self, sampler, g, augment)
        if self.model.training:
            steps.append([float(img.double().sum()), float(img.double().abs().sum()), int(seg.sum())])
        return img, seg

    def forward_loss(self, img, seg):
        out, loss = orig_loss(self, img, seg)
        if self.model.training:
            steps[-1].append(float(loss))
        return out, loss

    Trainer._batch, Trainer._forward_loss = batch, forward_loss

    def undo():
        Trainer._batch, Trainer._forward_loss = orig_batch, orig_loss

    return undo


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        ref = run(Path(tmp), record_old_trainer)
    Path(sys.argv[1]).write_text(json.dumps(ref, indent=1) + "\n")
    print(f"wrote {sys.argv[1]}: {len(ref['steps'])} steps, final loss {ref['steps'][-1][-1]:.5f}")
