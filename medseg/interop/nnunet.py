"""Import an nnU-Net v2 trained model (a results folder) as a medseg model folder.

An nnU-Net v2 results folder is ``TRAINER__PLANS__CONFIGURATION/`` holding ``dataset.json``,
``plans.json`` and ``fold_K/checkpoint_final.pth`` (and ``checkpoint_best.pth``) for folds 0-4 or
``all``. :func:`import_nnunet` turns it into ``MODEL/model.json`` + ``MODEL/fold_K/model.safetensors``:

* the configuration's preprocessing (target spacing, per-channel normalisation with nnU-Net's
  dataset-wide CT statistics, masked z-score, separate-z resampling) becomes a medseg
  :class:`~medseg.planning.plan.Plan`; patch size and spacing are re-ordered from nnU-Net's transposed
  axis order (``transpose_forward``) to the image's own (z, y, x);
* the network (``PlainConvUNet`` -> ``unet``, ``ResidualEncoderUNet`` -> ``resenc``) keeps nnU-Net's
  topology, conv bias, norm epsilon and LeakyReLU slope, and works in nnU-Net's axis order itself
  (``transpose``), so its weights are used unchanged; the state-dict keys are renamed (PlainConvUNet)
  or only stripped of nnU-Net's aliases (ResEnc, whose names medseg shares);
* the trainer's ``inference_allowed_mirroring_axes`` become the configuration's ``mirror_axes``.

Safety: ``.pth`` files are pickles. They are read only with ``torch.load(weights_only=True)``, which
rebuilds tensors and plain containers and refuses every other global; numpy scalars and dtypes (found in
nnU-Net's training log) are the only additions allowed. Anything else is a :class:`CheckpointError`
naming the refused global -- never a fallback to ``weights_only=False``.
"""

from __future__ import annotations

import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medseg.errors import CheckpointError
from medseg.interop.nnunet_plans import _load_json, plan_from_nnunet
from medseg.io.checkpoint import sha256

CHECKPOINT_FILES = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}


# ----------------------------------------------------------------------------------------------
# reading .pth files safely


def _numpy_safe_globals() -> list:
    """numpy scalars and dtypes: nnU-Net's checkpoint['logging'] holds numpy floats. They rebuild a
    number from raw bytes (``scalar(dtype, bytes)``) and run no code. Both module spellings are
    listed: numpy < 2 pickles ``numpy.core.multiarray.scalar``, numpy >= 2 ``numpy._core...``."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    dtypes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"}  # bool, ints, floats, complex
    return [
        np.dtype,
        *sorted(dtypes, key=lambda t: t.__name__),
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
    ]


def load_pth(path: str | Path):
    """Whatever a ``torch.save`` file holds, read with ``torch.load(weights_only=True)`` plus numpy scalars
    and dtypes only (nnU-Net v1/v2 and STU-Net checkpoints need those); CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file not found")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights only" not in text.lower() and "weights_only" not in text:
            raise CheckpointError(path, f"not a readable PyTorch checkpoint ({_first_line(exc)})") from None
        name = re.search(r"GLOBAL (\S+)", text)
        what = f"it pickles {name.group(1)}, which is not tensor or number data" if name else _weights_only_reason(text)
        raise CheckpointError(
            path,
            f"refused to load: {what}; medseg reads .pth files only with torch.load(weights_only=True) "
            "and never runs code from them",
        ) from None
    except Exception as exc:  # zip/storage errors, truncated files, not a torch file at all
        raise CheckpointError(path, f"not a readable PyTorch checkpoint ({_first_line(exc)})") from None
    return ck


def read_checkpoint(path: str | Path) -> dict:
    """An nnU-Net v2 ``.pth`` checkpoint (:func:`load_pth`) with a ``network_weights`` state dict."""
    path = Path(path)
    ck = load_pth(path)
    if not isinstance(ck, dict) or not isinstance(ck.get("network_weights"), dict):
        raise CheckpointError(path, "not an nnU-Net checkpoint (no 'network_weights' state dict)")
    bad = [k for k, v in ck["network_weights"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(path, f"'network_weights' entry {bad[0]!r} is not a tensor")
    return ck


def _first_line(exc: BaseException) -> str:
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "").split(". ")[0]
    return f"{type(exc).__name__}: {line[:200]}" if line else f"{type(exc).__name__}, truncated or empty file"


def _weights_only_reason(text: str) -> str:
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    detail = f" ({m.group(1).strip()[:150]})" if m else ""
    return f"its pickle holds something that is not tensor or number data{detail}"


# ----------------------------------------------------------------------------------------------
# state dicts

_PLAIN_RULES = [
    (re.compile(r"^encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.conv\.(weight|bias)$"), r"encoder.\1.\2.0.\3"),
    (re.compile(r"^encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.norm\.(weight|bias)$"), r"encoder.\1.\2.1.\3"),
    (re.compile(r"^decoder\.stages\.(\d+)\.convs\.(\d+)\.conv\.(weight|bias)$"), r"decoder.\1.\2.0.\3"),
    (re.compile(r"^decoder\.stages\.(\d+)\.convs\.(\d+)\.norm\.(weight|bias)$"), r"decoder.\1.\2.1.\3"),
    (re.compile(r"^decoder\.transpconvs\.(\d+)\.(weight|bias)$"), r"upsample.\1.\2"),
    (re.compile(r"^decoder\.seg_layers\.(\d+)\.(weight|bias)$"), r"heads.\1.\2"),
]


def _is_alias(key: str) -> bool:
    """nnU-Net registers every conv/norm twice (``all_modules.N``) and the encoder again under the decoder."""
    return key.startswith("decoder.encoder.") or ".all_modules." in key


def convert_state_dict(weights: dict, model: str, source: Path, trainer: str = "?") -> dict[str, torch.Tensor]:
    """nnU-Net ``network_weights`` -> medseg state dict (aliases dropped, PlainConvUNet keys renamed)."""
    out = {}
    for key, tensor in weights.items():
        if _is_alias(key):
            continue
        if model == "unet":
            for pattern, repl in _PLAIN_RULES:
                if pattern.match(key):
                    key = pattern.sub(repl, key)
                    break
            else:
                raise CheckpointError(
                    source,
                    f"weight '{key}' is not a PlainConvUNet weight: trainer {trainer} builds its own network, "
                    "which the importer does not support",
                )
        out[key] = tensor.detach().to(torch.float32).contiguous()
    return out


def _check_weights(spec, state: dict, source: Path, trainer: str) -> None:
    from medseg.inference.predictor import _state_dict_mismatch

    net = spec.build(deep_supervision=False)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            source,
            f"weights do not fit the {spec.model} built from plans.json ({_state_dict_mismatch(exc)}); "
            f"does trainer {trainer} build its own network?",
        ) from None


# ----------------------------------------------------------------------------------------------
# the import


@dataclass
class ImportResult:
    output: Path
    model: str
    configuration: str
    trainer: str
    plans_name: str
    folds: list[str]
    checkpoint: str
    mirror_axes: tuple[int, ...]
    notes: list[str] = field(default_factory=list)


def find_results_folder(folder: str | Path) -> Path:
    """The folder holding plans.json: ``folder`` itself, or its only ``TRAINER__PLANS__CONFIG`` subfolder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, "nnU-Net results folder not found")
    if (folder / "plans.json").is_file():
        return folder
    found = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "plans.json").is_file())
    if len(found) == 1:
        return found[0]
    if found:
        raise CheckpointError(
            folder, f"holds {len(found)} nnU-Net results folders ({', '.join(p.name for p in found)}); name one"
        )
    raise CheckpointError(
        folder / "plans.json",
        "missing plans.json: not an nnU-Net v2 results folder "
        "(expected TRAINER__PLANS__CONFIGURATION/ with dataset.json, plans.json and fold_K/)",
    )


def import_nnunet(
    results_folder: str | Path,
    output: str | Path,
    *,
    checkpoint: str = "final",
    folds=None,
    overwrite: bool = False,
) -> ImportResult:
    """Convert an nnU-Net v2 results folder into the medseg model folder ``output``.

    Everything is read and checked before anything is written; the model folder appears complete or
    not at all (written beside ``output`` and renamed into place).
    """
    if checkpoint not in CHECKPOINT_FILES:
        raise CheckpointError(None, f"--checkpoint must be one of {', '.join(CHECKPOINT_FILES)}, got {checkpoint!r}")
    src, output = find_results_folder(results_folder), Path(output)
    if output.exists() and not overwrite:
        raise CheckpointError(output, "already exists (use --overwrite to replace it)")
    if output.resolve() == src.resolve() or src.resolve() in output.resolve().parents:
        raise CheckpointError(output, "must not be inside the nnU-Net results folder")
    plans = _load_json(src / "plans.json", "plans.json")
    dataset = _load_json(src / "dataset.json", "dataset.json")
    ck_name = CHECKPOINT_FILES[checkpoint]
    wanted = _wanted_folds(src, ck_name, folds)
    weights, meta = _read_fold_checkpoints(src, ck_name, wanted)
    origin = _origin(src, plans, meta)
    try:
        plan, model, kwargs, labels, notes = plan_from_nnunet(
            plans, dataset, origin["configuration"], mirror_axes=origin["mirror_axes_nnunet"], source=src / "plans.json"
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:  # a key missing or of the wrong type
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(src / "plans.json", f"unexpected content ({detail[:200]})") from None
    spec = _imported_spec(src, plans, plan, model, kwargs, labels, origin["configuration"], ck_name, wanted)
    states = {}
    for f in wanted:
        source = src / f"fold_{f}" / ck_name
        states[f] = convert_state_dict(weights.pop(f), model, source, origin["trainer"])
        _check_weights(spec, states[f], source, origin["trainer"])
    record = {**origin, "checkpoint": ck_name, "folds": wanted, "notes": notes}
    _write_model_folder(output, spec, states, meta, src, record)
    return ImportResult(
        output=output,
        model=model,
        configuration=origin["configuration"],
        trainer=origin["trainer"],
        plans_name=origin["plans_name"],
        folds=wanted,
        checkpoint=ck_name,
        mirror_axes=plan.configurations[origin["configuration"]].mirror_axes,
        notes=notes,
    )


def _wanted_folds(src: Path, ck_name: str, folds) -> list[str]:
    """The folds to import (all present ones by default); one that lacks ``ck_name`` is an error."""
    present = sorted(p.name[len("fold_") :] for p in src.glob("fold_*") if (p / ck_name).is_file())
    wanted = [str(f) for f in folds] if folds else present
    if not wanted:
        raise CheckpointError(src, f"no fold_K/{ck_name} found")
    missing = [f for f in wanted if f not in present]
    if missing:
        raise CheckpointError(src / f"fold_{missing[0]}" / ck_name, "not found")
    return wanted


def _read_fold_checkpoints(src: Path, ck_name: str, wanted: list[str]) -> tuple[dict, dict]:
    """Each fold's network weights and a few fields of its checkpoint (not optimizer state and logs)."""
    weights, meta = {}, {}
    for f in wanted:
        ck = read_checkpoint(src / f"fold_{f}" / ck_name)
        weights[f] = ck.pop("network_weights")
        keys = ("init_args", "trainer_name", "inference_allowed_mirroring_axes", "current_epoch")
        meta[f] = {k: ck.get(k) for k in keys}
        del ck
    return weights, meta


def _origin(src: Path, plans: dict, meta: dict) -> dict:
    """Configuration, trainer, plans name and the mirror axes every fold allows, from the checkpoints
    (falling back on the ``TRAINER__PLANS__CONFIG`` folder name), plus where they came from."""
    first = next(iter(meta.values()))
    parts = src.name.split("__")
    init = first.get("init_args") if isinstance(first.get("init_args"), dict) else {}
    configuration = str(init.get("configuration") or (parts[2] if len(parts) == 3 else ""))
    if not configuration:
        raise CheckpointError(src, "cannot tell the configuration (folder is not TRAINER__PLANS__CONFIG)")
    axes = [m["inference_allowed_mirroring_axes"] for m in meta.values()]
    mirror = None if any(a is None for a in axes) else sorted(set.intersection(*[{int(i) for i in a} for a in axes]))
    return {
        "source": str(src.resolve()),
        "trainer": str(first.get("trainer_name") or (parts[0] if len(parts) == 3 else "?")),
        "plans_name": str(plans.get("plans_name") or (parts[1] if len(parts) == 3 else "?")),
        "configuration": configuration,
        "mirror_axes_nnunet": mirror,
        "transpose_forward": plans.get("transpose_forward", [0, 1, 2]),
    }


def _imported_spec(src, plans, plan, model, kwargs, labels, configuration, ck_name, wanted):
    from medseg.io.checkpoint import ModelSpec

    return ModelSpec(
        model=model,
        model_kwargs=kwargs,
        in_channels=len(plan.channel_names),
        num_classes=plan.num_classes,
        labels=labels,
        plan=plan,
        configuration=configuration,
        description=(
            f"imported from nnU-Net v2: {src.name} ({plans.get('dataset_name', '?')}), "
            f"{ck_name}, folds {', '.join(wanted)}"
        ),
    )


def _write_model_folder(output: Path, spec, states: dict, meta: dict, src: Path, record: dict) -> None:
    """model.json, fold_K/model.safetensors and nnunet/ (the source plans, dataset and ``record``),
    written beside ``output`` and renamed into place once complete."""
    from medseg import __version__
    from medseg.io.atomic import publish_dir, temp_dir_beside
    from medseg.io.checkpoint import save_spec, save_weights
    from medseg.io.jsonio import write_json

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(output, ".importing")  # renamed into place: ordinary permissions, not 0700
    try:
        save_spec(tmp, spec)
        for f, state in states.items():
            source = src / f"fold_{f}" / record["checkpoint"]
            epoch = meta[f]["current_epoch"]
            info = {
                "fold": f,
                "epoch": int(epoch) if isinstance(epoch, int) else None,
                "source": {"framework": "nnU-Net v2", "file": str(source), "sha256": sha256(source)},
            }
            save_weights(tmp / f"fold_{f}", state, info=info)
        (tmp / "nnunet").mkdir()
        shutil.copyfile(src / "plans.json", tmp / "nnunet" / "plans.json")
        shutil.copyfile(src / "dataset.json", tmp / "nnunet" / "dataset.json")
        write_json(tmp / "nnunet" / "import.json", {**record, "medseg_version": __version__})
        publish_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
