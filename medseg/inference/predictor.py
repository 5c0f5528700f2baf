"""Predictor: load a model folder once, predict many cases (files, DICOM series, arrays).

Fold models are ensembled by averaging their logits per tile; mirror TTA averages the logits
of all flips. Export is in each input's native geometry (un-crop, resample back).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from medseg.errors import CheckpointError
from medseg.io.checkpoint import ModelSpec, available_folds, load_spec, load_weights
from medseg.io.dataset import Case
from medseg.io.image import ImageMeta, ensure_writable_dir, read_image, write_image
from medseg.inference.export import segmentation_from_logits
from medseg.inference.sliding_window import sliding_window_predict
from medseg.preprocessing.pipeline import preprocess_array

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"


def resolve_model(model: str | Path) -> Path:
    """A model folder path, or the name of a model shipped with medseg (e.g. ``hippocampus``)."""
    p = Path(model)
    if p.is_dir():
        return p
    shipped = PRETRAINED_DIR / str(model)
    if shipped.is_dir():
        return shipped
    names = sorted(d.name for d in PRETRAINED_DIR.iterdir() if d.is_dir()) if PRETRAINED_DIR.is_dir() else []
    raise CheckpointError(model, f"not a model folder nor a shipped model (shipped: {', '.join(names) or 'none'})")


class Predictor:
    def __init__(self, spec: ModelSpec, fold_weights: dict[str, dict], *, device: str = "auto", tta: bool = True,
                 step: float = 0.5, tile_batch: int | None = None, num_threads: int | None = None):
        from medseg.training.trainer import resolve_device

        self.spec = spec
        self.plan = spec.plan
        self.conf = spec.plan.configuration(spec.configuration)
        self.device = resolve_device(device)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.models = []
        for fold, weights in fold_weights.items():
            net = spec.build(deep_supervision=False)
            try:
                net.load_state_dict(weights)
            except RuntimeError as exc:
                raise CheckpointError(f"fold_{fold}", f"weights do not match the model spec ({str(exc)[:200]})") from None
            self.models.append(net.to(self.device).eval())
        self.folds = list(fold_weights)
        self.tta = tta
        self.step = step
        self.tile_batch = tile_batch or (4 if self.device.type == "cuda" else 1)
        dims = self.conf.spatial_dims
        # a 2d configuration slides a (1, h, w) tile through the volume
        self.tile = tuple(self.conf.patch_size) if dims == 3 else (1, *self.conf.patch_size)
        self.mirror_axes = (0, 1, 2) if dims == 3 else (1, 2)

    @classmethod
    def from_folder(cls, model: str | Path, folds=None, **kwargs) -> "Predictor":
        folder = resolve_model(model)
        spec = load_spec(folder)
        folds = [str(f) for f in folds] if folds else available_folds(folder)
        if not folds:
            raise CheckpointError(folder, "model folder holds no fold_*/ weights")
        weights = {f: load_weights(folder / f"fold_{f}") for f in folds}
        return cls(spec, weights, **kwargs)

    # ------------------------------------------------------------------
    def _predict_tiles(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = self.conf.spatial_dims == 2
        if squeeze:
            x = x[:, :, 0]
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
            y = sum(m(x).float() for m in self.models) / len(self.models)
        return y[:, :, None] if squeeze else y

    @torch.inference_mode()
    def predict_array(self, image: np.ndarray, meta: ImageMeta, *, return_probabilities: bool = False):
        """(C, z, y, x) image in its native geometry -> (label map, probabilities or None)."""
        data, _, props = preprocess_array(image, meta, self.plan, self.conf)
        x = torch.from_numpy(data).to(self.device)
        logits = sliding_window_predict(x, self._predict_tiles, self.tile, self.spec.num_classes, step=self.step,
                                        mirror_axes=self.mirror_axes if self.tta else (),
                                        tile_batch=self.tile_batch)
        return segmentation_from_logits(logits, props, return_probabilities=return_probabilities)

    def read_case(self, case: Case) -> tuple[np.ndarray, ImageMeta]:
        arrays, meta = [], None
        for f in case.images:
            arr, m = read_image(f)
            if meta is not None and arr.shape != meta.shape:
                from medseg.errors import ImageReadError

                raise ImageReadError(f, f"shape {arr.shape} differs from channel 0 {meta.shape}")
            meta = meta or m
            arrays.append(arr.astype(np.float32, copy=False))
        if len(arrays) != self.spec.in_channels:
            from medseg.errors import DatasetError

            raise DatasetError(case.images[0], f"{len(arrays)} channel(s) given; the model needs {self.spec.in_channels}")
        return np.stack(arrays), meta

    def predict_cases(self, cases: list[Case], out_dir: str | Path, *, overwrite: bool = False,
                      save_probabilities: bool = False, largest_component: bool = False,
                      file_ending: str = ".nii.gz", progress: bool = True) -> list[dict]:
        """Predict and write ``OUT/CASE.nii.gz``; cases already written are skipped unless overwrite."""
        from medseg.inference.postprocess import keep_largest_component
        from medseg.utils import track

        out_dir = ensure_writable_dir(out_dir)
        results = []
        for case in track(cases, description="predict", enabled=progress):
            target = out_dir / f"{case.name}{file_ending}"
            if target.exists() and not overwrite:
                results.append({"case": case.name, "output": str(target), "skipped": True})
                continue
            t0 = time.perf_counter()
            image, meta = self.read_case(case)
            seg, probs = self.predict_array(image, meta, return_probabilities=save_probabilities)
            if largest_component:
                seg = keep_largest_component(seg)
            if save_probabilities:
                from medseg.io.jsonio import write_json  # noqa: F401  (atomic npz below)
                import os

                tmp = out_dir / f".{case.name}_probabilities.part.npz"
                np.savez_compressed(tmp, probabilities=probs.astype(np.float16),
                                    labels=np.array(sorted(self.spec.labels, key=self.spec.labels.get)))
                os.replace(tmp, out_dir / f"{case.name}_probabilities.npz")
            write_image(seg, meta, target)
            results.append({"case": case.name, "output": str(target), "skipped": False,
                            "seconds": round(time.perf_counter() - t0, 3), "spacing": list(meta.spacing),
                            "voxel_counts": {int(k): int(v) for k, v in zip(*np.unique(seg, return_counts=True))}})
        return results
