"""``medseg predict`` as a user sees it: predictions + volume table + overlays + summary."""

from __future__ import annotations

import time
from pathlib import Path


def run_predict(
    model,
    input,
    output,
    *,
    folds=None,
    tta=True,
    step=0.5,
    device="auto",
    probabilities=False,
    largest_component=False,
    overlay=False,
    overwrite=False,
    label_map=None,
    amp=None,
    layout="auto",
    conditions=None,
    case_conditions=None,
    ood_map=None,
    echo=print,
) -> list[dict]:
    """``ood_map``: an OOD score name (:mod:`medseg.inference.ood`), written as ``CASE_ood.<ext>``
    (with ``overlay``: also ``CASE_ood.png``, the map over the image with a colour bar), or a list of
    names: the others also as ``CASE_ood_<name>.<ext>``."""
    from medseg.evaluation.report import write_volumes_table
    from medseg.inference.predictor import Predictor
    from medseg.io.dataset import cases_from_input
    from medseg.io.image import check_output_apart, check_writable_dir, prediction_ending

    t0 = time.perf_counter()
    check_output_apart(output, input)  # never write label maps over (or among) the input images
    output = check_writable_dir(output)  # created only once a case is predicted
    predictor = Predictor.from_folder(
        model,
        folds,
        device=device,
        tta=tta,
        step=step,
        label_map=label_map,
        amp=amp,
        ood_map=ood_map,
        layout=layout,
    )
    cases = cases_from_input(input, predictor.spec.in_channels)
    results = predictor.predict_cases(
        cases,
        output,
        overwrite=overwrite,
        save_probabilities=probabilities,
        largest_component=largest_component,
        conditions=conditions,
        case_conditions=case_conditions,
        file_ending=prediction_ending(predictor.plan.file_ending),  # PNG in, PNG out; volumes as .nii.gz
    )
    labels = predictor.labels  # the label map's target labels when one is given
    rows = _case_reports(
        cases, results, output, labels, overlay=overlay, ood_name=predictor.ood_map if ood_map else None
    )
    write_volumes_table(output / "volumes.csv", rows)
    elapsed = time.perf_counter() - t0
    run = {"model": str(model), "tta": tta, "step": step, "label_map": label_map, "seconds": round(elapsed, 2)}
    _write_manifest(output / "manifest.json", predictor, run, results)
    done = [r for r in results if not r["skipped"]]
    echo(
        f"{len(results)} case(s) -> {output}  ({len(done)} predicted, {len(results) - len(done)} already done; "
        f"{elapsed:.1f} s, TTA {'on' if tta else 'off'}, folds {','.join(predictor.folds)}, {predictor.device})"
    )
    _echo_volumes(rows, labels, echo)
    echo(f"volume table: {output / 'volumes.csv'}" + (f"; overlays: {output}/*_overlay.png" if overlay else ""))
    return results


def _case_reports(cases, results, output: Path, labels: dict, *, overlay: bool, ood_name: str | None) -> list:
    """Each case's structure volumes (added to its result, and returned as (name, volumes) rows)
    and, with ``overlay``, its PNG overlays (labels; the OOD map when ``ood_name`` is set)."""
    from medseg.evaluation.report import ood_overlay_png, overlay_png, structure_volumes
    from medseg.io.image import read_image, read_image_channels

    rows = []
    for case, res in zip(cases, results):
        seg, meta = read_image(res["output"])
        vols = structure_volumes(seg, meta.spacing, labels)
        rows.append((case.name, vols))
        res["volumes_ml"] = {k: round(v["volume_ml"], 4) for k, v in vols.items()}
        if not overlay:
            continue
        image = read_image_channels(case.images[0])[0].mean(0)  # an RGB photo: its grey level
        png = output / f"{case.name}_overlay.png"
        res["overlay"] = str(overlay_png(image, seg, meta.spacing, png, labels=labels))
        if ood_name:
            score = read_image(next(m for m in res["maps"] if Path(m).name.startswith(f"{case.name}_ood.")))[0]
            png = output / f"{case.name}_ood.png"
            res["ood_overlay"] = str(ood_overlay_png(image, score, meta.spacing, png, seg=seg, name=ood_name))
    return rows


def _write_manifest(path: Path, predictor, run: dict, results: list) -> None:
    """``manifest.json``: what predicted the cases (model, folds, options, device, execution) and each case's result."""
    from medseg import __version__
    from medseg.io.jsonio import write_json

    label_map = run.pop("label_map")
    write_json(
        path,
        {
            "medseg_version": __version__,
            "model": run["model"],
            "folds": predictor.folds,
            "tta": run["tta"],
            "step": run["step"],
            **({"ood_map": list(predictor.ood_maps)} if predictor.ood_maps else {}),
            **({"label_map": {"file": str(label_map), "labels": predictor.labels}} if label_map is not None else {}),
            "device": str(predictor.device),
            **predictor.execution.describe(),
            "seconds": run["seconds"],
            "cases": results,
        },
    )


def _echo_volumes(rows: list, labels: dict, echo) -> None:
    names = [n for n, _ in sorted(labels.items(), key=lambda kv: kv[1]) if labels[n] != 0]
    echo(f"{'case':24s}" + "".join(f"{n + ' (mL)':>18s}" for n in names))
    for case, vols in rows:
        echo(f"{case:24s}" + "".join(f"{vols[n]['volume_ml']:18.3f}" for n in names))
