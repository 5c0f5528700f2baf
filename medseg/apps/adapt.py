"""Few-shot domain adaptation (SAMDA's procedure) on the one training loop: ``medseg adapt``.

A model trained at one site (the *source*: any medseg segmentation model folder, SAMDA or not) is
adapted to another site (the *target*) from k labelled target subjects:

1. **source training** — ``medseg train`` as usual (e.g. ``--arch samda -c 2d``); not repeated here;
2. **few-shot adaptation** — fine-tune from the source weights on the k subjects' cases only, in the
   target's label convention: the source plan preprocesses them (spacing, normalisation, canonical
   orientation), source labels are mapped onto the target's (``--label-map``, e.g. Anterior +
   Posterior -> hippocampus) and the output heads start from the source classes they merge;
3. **joint fine-tuning** — with ``--source DATASET``: continue on the shots and the source dataset
   (its labels mapped the same way) together, each batch drawn ``1 - joint_share`` from the shots.

Subjects, not cases, are the unit: ``subject_pattern`` (a regex whose first group names a case's
subject, e.g. ``^(ixi_[^_]+)_`` for IXI's left/right crops) keeps the crops of one subject together;
``test_cases`` are never drawn as shots, and a subject with cases on both sides is an error.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.errors import DatasetError, MedsegError


@dataclass
class AdaptConfig:
    shots: int  # labelled target subjects
    seed: int = 0  # which subjects are drawn
    subject_pattern: str | None = None  # regex, group 1 = subject (None: each case its own subject)
    test_cases: list[str] = field(default_factory=list)  # held-out target cases: never shots
    test_source: str = "--test-cases"  # where test_cases came from (for messages)
    label_map: dict | None = None  # source label name -> target label name (None: same names)
    label_map_source: str | None = None
    source_dataset: Path | None = None  # raw source dataset for step 3 (None: no joint step)
    joint_share: float = 0.5  # fraction of joint batches drawn from the source dataset
    epochs: int = 20  # step 2
    joint_epochs: int = 10  # step 3
    iterations: int = 50  # per epoch, both steps
    lr: float = 1e-3
    warmup_epochs: int = 1
    freeze_encoder_epochs: int = 0
    batch_size: int | None = None
    device: str = "auto"
    amp: bool | None = None


# ------------------------------------------------------------------------------- subjects
def subjects_of(names: list[str], pattern: str | None) -> dict[str, str]:
    """case -> subject (``pattern``'s first group; the case itself without a pattern)."""
    if pattern is None:
        return {n: n for n in names}
    rx = re.compile(pattern)
    out = {}
    for n in names:
        m = rx.search(n)
        if m is None or not m.groups():
            raise MedsegError(None, f"--subject-pattern {pattern!r} does not name a subject in case '{n}'")
        out[n] = m.group(1)
    return out


def draw_shots(names: list[str], subjects: dict[str, str], cfg: AdaptConfig) -> list[str]:
    """The cases of ``cfg.shots`` subjects drawn (seeded) from those with no case in ``cfg.test_cases``."""
    unknown = sorted(set(cfg.test_cases) - set(names))
    if unknown:
        raise DatasetError(cfg.test_source, f"names cases the target dataset lacks: {', '.join(unknown[:5])}")
    test_subjects = {subjects[c] for c in cfg.test_cases}
    pool = sorted({subjects[n] for n in names if n not in cfg.test_cases})
    both = sorted(s for s in pool if s in test_subjects)
    if both:
        raise DatasetError(
            cfg.test_source, f"subject(s) {', '.join(both[:5])} have cases in both the pool and the test set"
        )
    if not 1 <= cfg.shots <= len(pool):
        raise MedsegError(None, f"--shots {cfg.shots}: the pool has {len(pool)} subject(s) outside the test set")
    chosen = set(np.random.default_rng(cfg.seed).choice(pool, size=cfg.shots, replace=False).tolist())
    return sorted(n for n in names if subjects[n] in chosen)


# ------------------------------------------------------------------------------- labels
def label_lut(source_labels: dict[str, int], target_labels: dict[str, int], cfg: AdaptConfig) -> np.ndarray:
    """Source label value -> target label value, from ``cfg.label_map`` (checked against both label sets)."""
    from medseg.inference.label_map import build_label_mapping

    pairs = cfg.label_map
    if pairs is None:
        pairs = {k: k for k in source_labels if k in target_labels and source_labels[k] != 0}
    mapping = build_label_mapping(
        {"labels": dict(target_labels), "map": pairs}, source_labels, source=cfg.label_map_source
    )
    produced = set(mapping.lut.tolist())
    missing = sorted(k for k, v in target_labels.items() if v and v not in produced)
    if missing:
        where = cfg.label_map_source or "--label-map"
        src = ", ".join(k for k in source_labels if source_labels[k])
        raise DatasetError(where, f"target label(s) {', '.join(missing)} cannot be mapped from the source's ({src})")
    return mapping.lut


def head_classes(lut: np.ndarray, n_target: int) -> dict[str, list[int]]:
    return {str(t): [int(s) for s in np.flatnonzero(lut == t)] for t in range(n_target)}


# ------------------------------------------------------------------------------- data
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def shots_dataset(target: Path, shots: list[str], dest: Path) -> Path:
    """A raw dataset of the shot cases only (copies; the target folder is only read)."""
    from medseg.io.dataset import list_cases, load_dataset_json

    info = load_dataset_json(target)
    cases = {c.name: c for c in list_cases(target, info)}
    if (dest / "dataset.json").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "labelsTr").mkdir()
    for name in shots:
        for path in cases[name].images:
            shutil.copyfile(path, tmp / "imagesTr" / Path(path).name)
        shutil.copyfile(cases[name].label, tmp / "labelsTr" / Path(cases[name].label).name)
    meta = json.loads((Path(target) / "dataset.json").read_text())
    meta.update(name=dest.name, numTraining=len(shots))
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
    tmp.rename(dest)
    return dest


def source_cache(source: Path, plan, configuration: str, ws, *, progress: bool = True) -> Path:
    """The source dataset preprocessed with the source model's own plan, once per plan in the workspace:
    where the source model was trained in this workspace, its own cache (and cached SAM embeddings)."""
    from medseg.io.dataset import load_dataset_json
    from medseg.planning.plan import Plan
    from medseg.preprocessing.pipeline import preprocess_dataset

    info = load_dataset_json(source)
    if info.labels != plan.labels:
        raise DatasetError(
            Path(source) / "dataset.json", f"labels {info.labels} are not the source model's {plan.labels}"
        )
    pre = ws.preprocessed(info.name)  # the workspace the source model was trained in, if its plan is this one
    if not ws.plan_path(info.name).is_file() or Plan.load(ws.plan_path(info.name)).to_json() != plan.to_json():
        pre = ws.preprocessed(f"{info.name}_plan_{_digest(plan.to_json())}")
    return preprocess_dataset(source, plan, configuration, pre, progress=progress)


def _training_config(cfg: AdaptConfig, pretrained: Path, epochs: int, **extra):
    from medseg.training.config import TrainingConfig

    return TrainingConfig(
        epochs=epochs, iterations_per_epoch=cfg.iterations, val_iterations=0, batch_size=cfg.batch_size,
        initial_lr=cfg.lr, warmup_epochs=cfg.warmup_epochs, freeze_encoder_epochs=cfg.freeze_encoder_epochs,
        pretrained=str(pretrained), device=cfg.device, amp=cfg.amp, final_validation=False,
        checkpoint_every=max(1, epochs // 4), seed=cfg.seed, **extra,
    )  # fmt: skip


def adapt(source_model, target, output, cfg: AdaptConfig, *, workspace=None, log=print, progress=True) -> dict:
    """Steps 2 and 3 of the module docstring; the adapted model is written to ``output`` (its
    ``adaptation.json`` records the procedure). With ``cfg.test_cases`` they are predicted and scored
    against their target labels (``output/adaptation/summary.json``). Interrupted runs resume."""
    from dataclasses import replace

    from medseg import api
    from medseg.io.checkpoint import load_spec, resolve_model
    from medseg.io.dataset import list_cases, load_dataset_json
    from medseg.planning.fingerprint import compute_fingerprint

    ws = api.open_workspace(workspace)
    src_dir = Path(resolve_model(str(source_model)))
    spec = load_spec(src_dir)
    if spec.task != "segmentation":
        raise MedsegError(src_dir, f"is a {spec.task} model; medseg adapt adapts segmentation models")
    target, output = Path(target), Path(output)
    if output.exists():
        raise MedsegError(output, "already exists (choose another -o)")
    info = load_dataset_json(target)
    if len(info.channel_names) != spec.in_channels:
        raise DatasetError(
            target / "dataset.json",
            f"has {len(info.channel_names)} channel(s); the source model takes {spec.in_channels}",
        )
    names = [c.name for c in list_cases(target, info) if c.label is not None]
    shots = draw_shots(names, subjects_of(names, cfg.subject_pattern), cfg)
    lut = label_lut(spec.labels, info.labels, cfg)
    plan = replace(spec.plan, labels=dict(info.labels))
    name = f"{info.name}_shots_{_digest([shots, plan.to_json()])}"  # one per source plan: its spacing, patch, batch
    raw = shots_dataset(target, shots, ws.root / "adapt" / name)
    if not ws.plan_path(name).is_file():
        compute_fingerprint(raw, progress=False).save(ws.fingerprint_path(name))
        replace(plan, dataset_name=name).save(ws.plan_path(name))
    api.preprocess(raw, ws, configurations=(spec.configuration,), progress=progress)
    steps = ws.root / "adapt" / f"{output.name}_{_digest([str(src_dir), shots, cfg.__dict__])}"
    log(f"adapt: {len(shots)} shot case(s) of {cfg.shots} subject(s) ({', '.join(shots)}) -> {steps}")
    classes = head_classes(lut, plan.num_classes)
    api.train(raw, ws, configuration=spec.configuration, fold="all", resume=True, log=log, output=steps / "fewshot",
              config=_training_config(cfg, src_dir, cfg.epochs, pretrained_classes=classes))  # fmt: skip
    final = steps / "fewshot"
    if cfg.source_dataset is not None:
        cache = source_cache(Path(cfg.source_dataset), spec.plan, spec.configuration, ws, progress=progress)
        extra = [
            {"cache": str(cache), "share": cfg.joint_share, "label_map": {str(s): int(t) for s, t in enumerate(lut)}}
        ]
        api.train(raw, ws, configuration=spec.configuration, fold="all", resume=True, log=log, output=steps / "joint",
                  config=_training_config(cfg, final, cfg.joint_epochs, extra_data=extra))  # fmt: skip
        final = steps / "joint"
    record = {"source_model": str(src_dir), "target": str(target), "shots": shots, "subjects": cfg.shots,
              "seed": cfg.seed, "label_lut": lut.tolist(), "joint": cfg.source_dataset is not None,
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()}}  # fmt: skip
    _publish(final, output, record)
    if not cfg.test_cases:
        return {}
    score = lambda model, out: evaluate_adapted(  # noqa: E731
        model, target, cfg.test_cases, info.labels, out, log=log, derived_cache=ws.root / "derived_cache"
    )
    if cfg.source_dataset is not None:  # what step 2 alone reached, for comparison
        score(steps / "fewshot", output / "adaptation" / "fewshot")
    return score(output, output / "adaptation")


def _publish(model_dir: Path, output: Path, record: dict) -> None:
    from medseg.io.atomic import publish_dir, temp_dir_beside
    from medseg.io.jsonio import write_json

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(output)
    shutil.rmtree(tmp)
    shutil.copytree(model_dir, tmp, ignore=shutil.ignore_patterns("training_state.pt", "*.part"))
    write_json(tmp / "adaptation.json", record)
    publish_dir(tmp, output)


def evaluate_adapted(
    model: Path, target: Path, test_cases: list[str], labels: dict, out: Path, *, log=print, derived_cache=None
) -> dict:
    """Predict ``test_cases`` of ``target`` with ``model`` into ``out/test_predictions`` and score them
    against their labels (``out/summary.json``; ``derived_cache``: see
    :class:`~medseg.inference.predictor.Predictor`)."""
    from medseg.evaluation.metrics import evaluate_folder
    from medseg.inference.predictor import Predictor
    from medseg.io.dataset import list_cases

    cases = [c for c in list_cases(target) if c.name in set(test_cases)]
    preds = Path(out) / "test_predictions"
    Predictor.from_folder(model, derived_cache=derived_cache).predict_cases(cases, preds, progress=False)
    summary = evaluate_folder(preds, target / "labelsTr", labels, names=test_cases, output=Path(out) / "summary.json")
    log(f"{model} on the test cases: " + ", ".join(f"{k} Dice {v['dice']:.4f}" for k, v in summary["mean"].items()))
    return summary
