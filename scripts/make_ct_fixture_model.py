"""Train the small CT pipeline-fixture model used by tests/test_ct_tool.py (and its fast variant).

NOT a clinical model: a U-Net for 12 TotalSegmentator structures (spleen, kidneys, gallbladder, liver,
stomach keep TotalSegmentator's label values 1-6; aorta, inferior vena cava, colon, urinary bladder and
the hips follow as 7-12) trained by medseg for a few minutes on the two real CTs of
../shared/data/totalsegmentator_examples/ct_total (whose labels are TotalSegmentator's own
predictions), at 3 mm (full) and 6 mm (fast). It exists so the whole
`medseg ct` path (class names, ROI subset via the fast model, statistics, previews, DICOM-SEG) runs
on real CTs in CI. Usage: .venv/bin/python scripts/make_ct_fixture_model.py OUT_MODEL_FOLDER
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "totalsegmentator_examples" / "ct_total"
STRUCTURES = [
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "liver",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "colon",
    "urinary_bladder",
    "hip_left",
    "hip_right",
]


def make_dataset(root: Path) -> Path:
    """The two CTs with labels reduced to STRUCTURES (values 1..12), nnU-Net layout."""
    import json

    import numpy as np

    from medseg.ct.class_maps import load_class_map
    from medseg.io.image import read_image, write_image

    total = load_class_map("total")
    lut = np.zeros(max(total.values()) + 1, dtype=np.uint8)
    for new, name in enumerate(STRUCTURES, start=1):
        lut[total[name]] = new
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for image in sorted((SOURCE / "imagesTr").glob("*.nii.gz")):
        shutil.copyfile(image, root / "imagesTr" / image.name)
        case = image.name[: -len("_0000.nii.gz")]
        seg, meta = read_image(SOURCE / "labelsTr" / f"{case}.nii.gz")
        write_image(lut[seg.astype(np.int64)], meta, root / "labelsTr" / f"{case}.nii.gz")
    labels = {"background": 0} | {n: i for i, n in enumerate(STRUCTURES, start=1)}
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": "CTFixture12",
                "channel_names": {"0": "CT"},
                "labels": labels,
                "numTraining": 2,
                "file_ending": ".nii.gz",
            }
        )
    )
    return root


def train_variant(data: Path, work: Path, spacing_mm: float, patch: int, iterations: int, out: Path) -> None:
    from medseg import api
    from medseg.planning.plan import Plan
    from medseg.training.config import TrainingConfig
    from medseg.workspace import Workspace

    ws = Workspace(work / f"ws_{spacing_mm:g}mm")
    plan = api.plan(data, ws, progress=False)
    conf = plan.configurations["3d_fullres"]
    kwargs = dict(conf.model_kwargs)
    kwargs.update(
        features=[8, 16, 32, 64], strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], kernel_sizes=[[3, 3, 3]] * 4
    )
    conf = dataclasses.replace(
        conf,
        spacing=(spacing_mm,) * 3,
        patch_size=(patch,) * 3,
        batch_size=2,
        model_kwargs=kwargs,
        separate_z=False,
        anisotropic_axis=None,
    )
    plan = dataclasses.replace(plan, configurations={"3d_fullres": conf})
    plan.save(ws.plan_path(plan.dataset_name))
    api.preprocess(data, ws, progress=False)
    cfg = TrainingConfig(
        epochs=4,
        iterations_per_epoch=iterations // 4,
        val_iterations=1,
        checkpoint_every=4,
        final_validation=False,
        augmentation="none",  # the fixture memorises these two CTs; augmentation would only slow that
        seed=0,
    )
    api.train(data, ws, fold="all", config=cfg, output=work / f"run_{spacing_mm:g}mm", log=print)
    api.package_model(work / f"run_{spacing_mm:g}mm", out, overwrite=True)
    assert isinstance(plan, Plan)


def main(out: str) -> None:
    out_dir = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_dataset(work / "CTFixture12")
        train_variant(data, work, 3.0, 64, 1200, work / "full")
        train_variant(data, work, 6.0, 32, 800, work / "full" / "fast")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(work / "full", out_dir)
    print("written", out_dir)


if __name__ == "__main__":
    main(sys.argv[1])
