"""Predictor: load a model folder once, predict many cases (files, DICOM series, arrays).

Fold models are ensembled by averaging their logits per tile; mirror TTA averages the logits
of all flips. Export is in each input's native geometry (un-crop, resample back).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from medseg.data.derived import compute_derived, derived_inputs_of
from medseg.errors import CheckpointError, MedsegError
from medseg.inference.conditions import prepare_conditions, tile_conditions
from medseg.inference.export import map_to_native, segmentation_from_logits, to_input_grid
from medseg.inference.provenance import check_output_folder, record_output_folder, weights_digest
from medseg.inference.sliding_window import sliding_window_predict
from medseg.inference.streaming import streaming_segmentation
from medseg.io.checkpoint import ModelSpec, available_folds, load_spec, load_weights, resolve_model
from medseg.io.dataset import Case
from medseg.io.image import ImageMeta, ensure_writable_dir, write_image
from medseg.planning.ood import case_summary, ood_reasons, ood_warning
from medseg.preprocessing.pipeline import preprocess_array
from medseg.tasks import get_task
from medseg.utils import autocast_dtype, resolve_device

STREAMING_BYTES = 2 * 1024**3  # native-space probabilities above this: stream along z instead


def _state_dict_mismatch(exc: RuntimeError) -> str:
    """torch's multi-line load_state_dict error, condensed to its first problem."""
    text = str(exc)
    sizes = re.findall(
        r"size mismatch for ([^:]+): copying a param with shape torch.Size\(\[([^\]]*)\]\) from "
        r"checkpoint, the shape in current model is torch.Size\(\[([^\]]*)\]\)",
        text,
    )
    if sizes:
        name, saved, built = sizes[0]
        more = f" and {len(sizes) - 1} more" if len(sizes) > 1 else ""
        return f"{name}: shape ({saved}) in the weights, ({built}) in the spec{more}"
    first = next((ln.strip() for ln in text.splitlines()[1:] if ln.strip()), text)
    return first[:160]


def _label_mapping(label_map, model_labels: dict[str, int]):
    if label_map is None:
        return None
    from medseg.inference.label_map import LabelMapping, build_label_mapping, load_label_mapping

    if isinstance(label_map, LabelMapping):
        return label_map
    if isinstance(label_map, dict):
        return build_label_mapping(label_map, model_labels)
    return load_label_mapping(label_map, model_labels)


def _ood_names(ood_map, task, model: str, source) -> tuple[str, ...]:
    """The OOD score names asked for (``auto``: the task's default), checked against the model."""
    if ood_map is None:
        return ()
    from medseg.inference.ood import check_ood_score, default_ood_score

    names = [ood_map] if isinstance(ood_map, str) else list(ood_map)
    try:
        names = [default_ood_score(task) if n == "auto" else n for n in names]
        return tuple(dict.fromkeys(check_ood_score(n, task, model) for n in names))
    except ValueError as exc:
        raise CheckpointError(source or model, str(exc)) from None


def _build_net(spec: ModelSpec, fold: str, weights: dict, root: Path) -> torch.nn.Module:
    """One fold's network from the spec and its weights; errors name model.json (the weights passed
    their sha256 check, so a mismatch is the spec's)."""
    try:
        net = spec.build(deep_supervision=False)
    except ImportError as exc:
        raise CheckpointError(
            root / "model.json", f"model '{spec.model}' needs a missing optional dependency ({exc})"
        ) from None
    except (KeyError, TypeError, ValueError) as exc:
        detail = str(exc).strip("'")[:200]  # KeyError quotes its message
        raise CheckpointError(
            root / "model.json", f"cannot build model '{spec.model}' from its spec ({detail})"
        ) from None
    try:
        net.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(
            root / "model.json",
            f"weights in fold_{fold}/model.safetensors do not match the model spec ({_state_dict_mismatch(exc)})",
        ) from None
    return net


class Predictor:
    def __init__(
        self,
        spec: ModelSpec,
        fold_weights: dict[str, dict],
        *,
        device: str = "auto",
        tta: bool = True,
        step: float = 0.5,
        tile_batch: int | None = None,
        num_threads: int | None = None,
        source: str | Path | None = None,
        label_map=None,
        amp: bool | None = None,
        ood_map: str | list[str] | tuple[str, ...] | None = None,
        layout: str = "auto",
        derived_cache: str | Path | None = None,
    ):
        """``source``: the model folder, so that errors name the file at fault. ``label_map``: a JSON
        file, dict or :class:`~medseg.inference.label_map.LabelMapping` mapping the model's labels onto
        another label set (direct inference); outputs then use the target labels. ``amp``: network in
        reduced precision (None: fp16 on CUDA, bf16 on CPUs with native bf16, fp32 otherwise; False:
        always fp32, see :func:`medseg.utils.autocast_dtype`); tiles are blended and exported in fp32.
        ``ood_map``: also give an OOD score map ``ood`` (:mod:`medseg.inference.ood`: ``maxquery`` for
        mask transformers, ``msp``, ``maxlogit``, ``entropy``; ``auto``: the model's default); a list
        of names gives ``ood`` for the first and ``ood_<name>`` for each other, from one forward pass.
        ``layout``: auto | contiguous | channels_last (:mod:`medseg.execution`: with ``amp`` None and
        ``auto`` the fastest precision and layout of this network on this CPU, measured once and cached).
        ``derived_cache``: a folder keeping the dense maps a model derives from each image (SAM
        embeddings), keyed by the preprocessed image's content, so predicting it again reuses them."""
        self.spec = spec
        self.derived_cache = Path(derived_cache) if derived_cache is not None else None
        self.task = get_task(spec.task, spec.num_classes, labels=dict(spec.labels))  # what the outputs mean
        if not self.task.sliding_window:
            raise CheckpointError(
                source or spec.model, f"is a {spec.task} model: segment with `{self.task.prompt_command}`"
            )
        self.mapping = _label_mapping(label_map, spec.labels)
        self.ood_maps = _ood_names(ood_map, self.task, spec.model, source)
        self.plan = spec.plan
        self.conf = spec.plan.configuration(spec.configuration)
        self.device = resolve_device(device)
        self.amp_dtype = autocast_dtype(self.device, amp)
        if num_threads:
            torch.set_num_threads(num_threads)
        root = Path(source) if source is not None else Path(".")
        self.models = [_build_net(spec, fold, w, root).to(self.device).eval() for fold, w in fold_weights.items()]
        self.derived = derived_inputs_of(self.models[0])  # dense maps the network reads (SAM embeddings)
        self.folds = list(fold_weights)
        self.weights_digest = weights_digest(fold_weights)
        if not 0 < step <= 1:
            raise ValueError(f"--step must be in (0, 1] (a fraction of the patch), got {step}")
        self.tta = tta
        self.step = step
        self.tile_batch = tile_batch or (4 if self.device.type == "cuda" else 1)
        dims = self.conf.spatial_dims
        # a 2d configuration slides a (1, h, w) tile through the volume
        self.tile = tuple(self.conf.patch_size) if dims == 3 else (1, *self.conf.patch_size)
        self.mirror_axes = (0, 1, 2) if dims == 3 else (1, 2)
        if self.conf.mirror_axes is not None:  # the model's own choice (e.g. imported from nnU-Net)
            self.mirror_axes = tuple(self.conf.mirror_axes)
        if self.conf.numerics not in ("medseg", "nnunet"):
            raise CheckpointError(root / "model.json", f"unknown numerics '{self.conf.numerics}' (medseg or nnunet)")
        self.execution = self._choose_execution(amp, layout)
        self.models = [self.execution.prepare(m) for m in self.models]

    @property
    def ood_map(self) -> str | None:
        """The OOD score written as ``CASE_ood`` (None: none)."""
        return self.ood_maps[0] if self.ood_maps else None

    def provenance(self, **options) -> dict:
        """What decides a folder run's outputs: the weights (digest per fold), labels, model name and
        the options that change the result (see :mod:`medseg.inference.provenance`)."""
        extra = {k: json.loads(json.dumps(v, default=str)) for k, v in options.items() if v}
        precision = self.execution.precision
        return {
            "model": self.spec.model, "weights": self.weights_digest, "labels": self.labels, "tta": self.tta,
            "step": self.step, "precision": precision, "options": extra,
        }  # fmt: skip

    @property
    def labels(self) -> dict[str, int]:
        """The label set of the written label maps: the model's, or the label map's targets."""
        return self.mapping.labels if self.mapping is not None else self.spec.labels

    @classmethod
    def from_folder(cls, model: str | Path, folds=None, **kwargs) -> Predictor:
        folder = resolve_model(model)
        spec = load_spec(folder)
        found = available_folds(folder)
        folds = [str(f) for f in folds] if folds else found
        if not folds:
            raise CheckpointError(folder, "model folder holds no fold_*/ weights")
        missing = [f for f in folds if f not in found]
        if missing:
            raise CheckpointError(folder, f"has no fold {missing[0]} (folds: {', '.join(found) or 'none'})")
        weights = {f: load_weights(folder / f"fold_{f}") for f in folds}
        return cls(spec, weights, source=folder, **kwargs)

    def _choose_execution(self, amp, layout: str):
        """Precision and layout of the networks (:func:`medseg.execution.choose_execution`), timed on
        the first fold's network at the tile batch this predictor runs."""
        from medseg.execution import choose_execution
        from medseg.models.registry import get_entry

        try:
            fast = get_entry(self.spec.model).cpu_fast_path
        except KeyError:
            fast = False
        example = (self.tile_batch, self.spec.in_channels, *self.conf.patch_size)
        try:
            return choose_execution(self.models[0], example, self.device, amp=amp, layout=layout, fast_path=fast)
        except ValueError as exc:  # an unknown layout
            raise MedsegError(None, str(exc)) from None

    # ------------------------------------------------------------------
    def _predict_tiles(self, x: torch.Tensor, **cond) -> dict[str, torch.Tensor]:
        """Named maps of a batch of tiles, averaged over the fold models (a 2d configuration's
        network sees (B, C, h, w); its maps get the singleton z back)."""
        squeeze = self.conf.spatial_dims == 2
        if squeeze:
            x = x[:, :, 0]
        total: dict[str, torch.Tensor] = {}
        x = self.execution.input(x)
        with self.execution.context(self.device):
            for m in self.models:
                for name, y in self.task.outputs(m(x, **cond)).items():
                    y = y.float().contiguous()
                    total[name] = y if name not in total else total[name] + y
        return {k: (v / len(self.models))[:, :, None] if squeeze else v / len(self.models) for k, v in total.items()}

    @torch.inference_mode()
    def predict_array(
        self,
        image: np.ndarray,
        meta: ImageMeta,
        *,
        return_probabilities: bool = False,
        streaming: bool | None = None,
        **conditions,
    ):
        """(C, z, y, x) image in its native geometry -> (label map, probabilities or None).

        ``conditions``: the model's extra inputs for this case (text tokens, histograms, ``points``
        (N, 3) / ``boxes`` (N, 6) in voxel coordinates (z, y, x) of ``image``), see
        :mod:`medseg.inference.conditions`. ``streaming`` (default: automatic for outputs over
        ``STREAMING_BYTES`` of probabilities) predicts and exports slab by slab along z so memory stays
        bounded for very large scans; probabilities are not available then. Models with more named
        maps than logits: :meth:`predict_maps`.
        """
        maps = self.predict_maps(
            image, meta, return_probabilities=return_probabilities, streaming=streaming, **conditions
        )
        return maps["labels"], maps.get("probabilities")

    @torch.inference_mode()
    def predict_maps(
        self, image: np.ndarray, meta: ImageMeta, *, return_probabilities: bool = False,
        streaming: bool | None = None, **conditions,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """Every output of the model in the input's geometry: ``labels`` (the label map),
        ``probabilities`` (if asked) and each further named map of the task, (K, z, y, x) float32, e.g.
        ``ood`` with ``ood_map``. Arguments as :meth:`predict_array`."""
        data, _, props = preprocess_array(image, meta, self.plan, self.conf)
        x = torch.from_numpy(data).to(self.device)
        k = self.spec.num_classes
        cond = prepare_conditions(conditions, props, self.device)
        dense = self._derived_maps(data)
        per_tile = tile_conditions(cond, self.tile, self.conf.spatial_dims == 2, dense) if cond or dense else None
        if streaming is None:
            native_bytes = 4 * k * float(np.prod(props["original_shape"]))
            whole = return_probabilities or cond or dense or self.ood_maps  # what streaming cannot give
            streaming = not whole and native_bytes > STREAMING_BYTES
        mirror_axes = self.mirror_axes if self.tta else ()
        if streaming and self.conf.spatial_dims == 3 and props.get("separate_z_axis") in (None, 0):
            if return_probabilities or cond or dense:
                raise ValueError("streaming prediction keeps neither probabilities nor conditions")
            seg = streaming_segmentation(
                x, self._predict_tiles, self.tile, k, props, step=self.step,
                mirror_axes=mirror_axes, tile_batch=self.tile_batch, numerics=self.conf.numerics,
            )  # fmt: skip
            seg, _ = self._mapped(to_input_grid(seg, props), None)  # back to the input's own voxel grid
            return {"labels": seg}
        maps = sliding_window_predict(
            x, self._predict_tiles, self.tile, k, step=self.step, mirror_axes=mirror_axes,
            tile_batch=self.tile_batch, numerics=self.conf.numerics, tile_conditions=per_tile,
        )  # fmt: skip
        aux = {name: maps.pop(name) for name in self.task.auxiliary_maps if name in maps}
        if self.ood_maps:
            from medseg.inference.ood import ood_score_map

            for i, name in enumerate(self.ood_maps):
                maps["ood" if i == 0 else f"ood_{name}"] = ood_score_map(name, maps[self.task.label_output], aux)
        out = {name: map_to_native(v, props) for name, v in maps.items() if name != self.task.label_output}
        if self.task.label_output is not None:
            interpolate = "logits" if self.conf.numerics == "nnunet" else "probabilities"
            seg, probs = segmentation_from_logits(
                maps[self.task.label_output], props, return_probabilities=return_probabilities, interpolate=interpolate
            )
            seg, probs = to_input_grid(seg, props), to_input_grid(probs, props)  # back to the input's own voxel grid
            out["labels"], probabilities = self._mapped(seg, probs)
            if probabilities is not None:
                out["probabilities"] = probabilities
        return out

    def _derived_maps(self, data: np.ndarray) -> dict:
        """The dense maps the network derives from the preprocessed image (SAM embeddings), by name."""
        return {
            name: compute_derived(name, data, opts, device=self.device, cache=self.derived_cache)
            for name, opts in self.derived.items()
        }

    def _mapped(self, seg: np.ndarray, probs):
        """Apply the label map, if any (labels voxel-wise; probabilities summed per target class)."""
        if self.mapping is None:
            return seg, probs
        from medseg.inference.label_map import apply_label_mapping, map_probabilities

        return apply_label_mapping(seg, self.mapping), None if probs is None else map_probabilities(probs, self.mapping)

    def read_case(self, case: Case) -> tuple[np.ndarray, ImageMeta]:
        """All channels of a case as (C, z, y, x) float32 (an RGB PNG gives three); refuses NaN/Inf and
        channels off the voxel grid of channel 0 (a prediction from either would be silently wrong)."""
        from medseg.errors import ImageReadError
        from medseg.io.channels import read_case_channels

        return read_case_channels(case.images, self.spec.in_channels, error=ImageReadError, needs="the model needs")

    def ood_reasons(self, image: np.ndarray, meta: ImageMeta) -> list[str]:
        """Why a case (C, z, y, x, as read) is far outside the model's training data ([]: it is not,
        or the model folder records no training range); see :mod:`medseg.planning.ood`."""
        if not self.spec.training_data:
            return []
        schemes = [n.scheme for n in self.plan.normalization]
        return ood_reasons(case_summary(image, meta), self.spec.training_data, schemes, self.plan.orientation)

    def predict_cases(
        self,
        cases: list[Case],
        out_dir: str | Path,
        *,
        overwrite: bool = False,
        save_probabilities: bool = False,
        largest_component: bool = False,
        file_ending: str = ".nii.gz",
        progress: bool = True,
        conditions: dict | None = None,
        case_conditions: dict[str, dict] | None = None,
        warn=None,
    ) -> list[dict]:
        """Predict and write ``OUT/CASE<file_ending>`` (and ``OUT/CASE_<map>`` for each further named
        map of the model); cases already written are skipped unless overwrite. ``conditions``: the
        model's extra inputs for every case; ``case_conditions``: per case name, on top of them.
        ``warn``: receives the one-line warning for a case far outside the training data (default:
        printed to stderr); the case's result lists the reasons under ``"ood"``."""
        from medseg.utils import track

        out_dir = Path(out_dir)  # created with the first output: a failed first case leaves no empty folder
        # what changes the label maps (probabilities are an extra file, not another result)
        provenance = self.provenance(
            largest_component=largest_component, file_ending=file_ending, conditions=conditions,
            case_conditions=case_conditions, ood_map=list(self.ood_maps),
        )  # fmt: skip
        existing = any((out_dir / f"{c.name}{file_ending}").exists() for c in cases)
        check_output_folder(out_dir, provenance, overwrite=overwrite, any_existing=existing)
        results = []
        for case in track(cases, description="predict", enabled=progress):
            target = out_dir / f"{case.name}{file_ending}"
            if any(target.resolve() == Path(f).resolve() for f in case.images):
                from medseg.errors import OutputError

                raise OutputError(target, "is an input image of this case; choose another output folder")
            if target.exists() and not overwrite:
                results.append({"case": case.name, "output": str(target), "skipped": True})
                continue
            cond = {**(conditions or {}), **(case_conditions or {}).get(case.name, {})}
            results.append(
                self._predict_case(case, target, provenance, cond, save_probabilities, largest_component, warn)
            )
        return results

    def _predict_case(self, case, target: Path, provenance, cond, save_probabilities, largest_component, warn) -> dict:
        """Predict one case and write its maps, probabilities and (last: it marks the case as done) label map."""
        from medseg.inference.postprocess import keep_largest_component

        t0 = time.perf_counter()
        out_dir, file_ending = target.parent, target.name[len(case.name) :]
        image, meta = self.read_case(case)
        ood = self.ood_reasons(image, meta)
        if ood:
            (warn or _print_warning)(ood_warning(case.images[0], ood))
        maps = self.predict_maps(image, meta, return_probabilities=save_probabilities, **cond)
        ensure_writable_dir(out_dir)
        record_output_folder(out_dir, provenance)
        seg, probs = maps.pop("labels"), maps.pop("probabilities", None)
        written = write_named_maps(maps, meta, out_dir, case.name, file_ending)  # before the label map
        if largest_component:
            seg = keep_largest_component(seg)
        if save_probabilities:
            _write_probabilities(out_dir / f"{case.name}_probabilities.npz", probs, self.labels)
        write_image(seg, meta, target)
        return {
            "case": case.name,
            "output": str(target),
            "skipped": False,
            "seconds": round(time.perf_counter() - t0, 3),
            "spacing": list(meta.spacing),
            **({"maps": written} if written else {}),
            **({"ood": ood} if ood else {}),
            "voxel_counts": {int(k): int(v) for k, v in zip(*np.unique(seg, return_counts=True))},
        }


def _write_probabilities(final: Path, probs: np.ndarray, labels: dict) -> None:
    """``CASE_probabilities.npz``: float16 class probabilities and the label names in channel order, atomically."""
    import os

    from medseg.errors import OutputError

    tmp = final.with_name(f".{final.name[: -len('.npz')]}.part.npz")
    try:
        np.savez_compressed(
            tmp, probabilities=probs.astype(np.float16), labels=np.array(sorted(labels, key=labels.get))
        )
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(final, f"cannot write ({exc.strerror or exc})") from None


def _print_warning(line: str) -> None:
    import sys

    print(line, file=sys.stderr)


def write_named_maps(maps: dict[str, np.ndarray], meta: ImageMeta, out_dir: Path, case: str, ending: str) -> list[str]:
    """``CASE_<map><ending>`` for each (K, z, y, x) map (one file per channel, ``_<k>``, when K > 1);
    float maps of 8-bit natural-image datasets (.png/.bmp) go to float TIFF."""
    if ending in (".png", ".bmp"):
        ending = ".tif"
    written = []
    for name, values in maps.items():
        channels = list(values)  # (K, z, y, x): one file per channel
        for k, v in enumerate(channels):
            suffix = f"_{k}" if len(channels) > 1 else ""
            written.append(str(write_image(v.astype(np.float32), meta, out_dir / f"{case}_{name}{suffix}{ending}")))
    return written
