"""Peak memory of predicting a very large CT: streaming (slab-wise) vs whole-volume export.

Builds CTs of 512x512xZ voxels (Z up to 900) from the real 20-slice CT series in
../shared/data/totalsegmentator_examples/dicom (the series stacked, alternately mirrored, so every
slice is real CT), then predicts them with a 118-output network (117 TotalSegmentator classes +
background, as TotalSegmentator's `total` models) at 3 mm (TotalSegmentator's --fast spacing): the
CT fixture's plan and U-Net topology (the nnU-Net v2 CT fixture, imported with
`medseg import-nnunet`) with its head widened to 118 classes and seeded random
weights, since memory does not depend on the weights. Wall time and peak RSS of the whole process
tree are recorded. The whole-volume path (all class probabilities in native
space) is measured where it fits and extrapolated where it would not.

    python3 benchmarks/bench_large_ct.py [--sizes 100,200,900] [--whole-sizes 100,200]

Memory is what is compared here, so the CPU-load guard of the timing benchmarks is not applied.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

FIXTURE = (
    C.REPO / "tests" / "fixtures" / "nnunet_v2_ct_tiny" / "Dataset906_CTFixture12"
    / "nnUNetTrainer_MedsegCTFixture__nnUNetPlans__3d_fullres"
)  # fmt: skip
SERIES = C.default_data_root() / "totalsegmentator_examples" / "dicom" / "example_ct_dicom"

MAKE_CT = """
import sys, numpy as np
from medseg.io.image import read_image, write_image
import dataclasses
arr, meta = read_image(sys.argv[1])
z = int(sys.argv[2])
reps = [arr if i % 2 == 0 else arr[::-1] for i in range(-(-z // arr.shape[0]))]
big = np.concatenate(reps, 0)[:z].astype(np.int16)
write_image(big, dataclasses.replace(meta, shape=big.shape), sys.argv[3])
"""

WHOLE = """
import dataclasses, sys, numpy as np, torch
from medseg.ct.class_maps import load_class_map
from medseg.inference.predictor import Predictor
from medseg.io.checkpoint import load_spec
from medseg.io.image import read_image, write_image
spec = load_spec(sys.argv[1])
labels = {"background": 0} | load_class_map("total")
conf = dataclasses.replace(spec.plan.configuration(spec.configuration), spacing=(3.0, 3.0, 3.0), patch_size=(64, 64, 64))
plan = dataclasses.replace(spec.plan, labels=labels, configurations={spec.configuration: conf})
spec = dataclasses.replace(spec, num_classes=len(labels), labels=labels, plan=plan)
torch.manual_seed(0)
p = Predictor(spec, {"0": spec.build().state_dict()}, tta=False)
arr, meta = read_image(sys.argv[2])
seg, _ = p.predict_array(arr[None].astype(np.float32), meta, streaming=(sys.argv[4] == "stream"))
write_image(seg, meta, sys.argv[3])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,200,900", help="slice counts Z of the 512x512xZ CTs (streaming)")
    ap.add_argument("--whole-sizes", default="100,200", help="slice counts also run on the whole-volume path")
    C.add_common_args(ap, workdir_default="medseg_bench_large_ct")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.whole_sizes = "40", "40"
    work = args.workdir
    (work / "logs").mkdir(parents=True, exist_ok=True)
    py = C.medseg_python()
    info = C.machine_info()
    model = work / "model"
    if not model.exists():
        C.run_measured(
            [py, "-m", "medseg", "import-nnunet", "-i", FIXTURE, "-o", model], log_file=work / "logs" / "import.log"
        )
    results = []
    for z in sorted({int(s) for s in args.sizes.split(",")} | {int(s) for s in args.whole_sizes.split(",")}):
        ct = work / f"ct_512x512x{z}.nii.gz"
        if not ct.exists():
            C.run_measured([py, "-c", MAKE_CT, SERIES, z, ct], log_file=work / "logs" / "make.log")
        modes = (["stream"] if str(z) in args.sizes.split(",") else []) + (
            ["whole"] if str(z) in args.whole_sizes.split(",") else []
        )
        for mode in modes:
            C.log(f"Z={z} {mode}")
            out = work / f"seg_{z}_{mode}.nii.gz"
            r = C.run_measured(
                [py, "-c", WHOLE, model, ct, out, mode], log_file=work / "logs" / f"{z}_{mode}.log", check=False
            )
            results.append({"z": z, "mode": mode, **r})
    (work / "results.json").write_text(json.dumps(results, indent=1))
    versions = {"medseg": C.package_versions(py, ["torch", "numpy", "SimpleITK"])}
    lines = C.header_lines("Large-CT memory: streaming vs whole-volume export", info, versions, args.quick)
    lines += ["| CT voxels | path | wall (s) | peak RSS (GiB) | exit |", "|---|---|---:|---:|---:|"]
    for r in results:
        lines.append(
            f"| 512x512x{r['z']} | {r['mode']} | {r['wall_s']:.0f} | {r['tree_rss_mb'] / 1024:.2f} | {r['rc']} |"
        )
    whole = [r for r in results if r["mode"] == "whole" and r["rc"] == 0]
    if len(whole) >= 2:
        (a, b) = whole[0], whole[-1]
        slope = (b["tree_rss_mb"] - a["tree_rss_mb"]) / (b["z"] - a["z"])
        est = (a["tree_rss_mb"] + slope * (900 - a["z"])) / 1024
        lines += [
            "",
            f"Whole-volume path extrapolated linearly to 512x512x900: **{est:.0f} GiB** peak RSS "
            f"({slope:.0f} MiB per slice).",
        ]
    C.write_results("large_ct", lines, args.quick, args.out)


if __name__ == "__main__":
    main()
