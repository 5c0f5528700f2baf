"""``medseg adapt``: few-shot domain adaptation of a segmentation model (medseg.apps.adapt)."""

from __future__ import annotations

from pathlib import Path

import typer

from medseg.cli import DEVICE_HELP, WS_HELP, _err, app


def _case_list(path: Path | None) -> list[str]:
    """Case names, one per line (``#`` comments and blank lines ignored), or a JSON list."""
    if path is None:
        return []
    import json

    from medseg.errors import DatasetError

    try:
        text = path.read_text()
    except OSError as exc:
        raise DatasetError(path, f"cannot read ({exc.strerror or exc})") from None
    if text.lstrip().startswith("["):
        try:
            return [str(n) for n in json.loads(text)]
        except json.JSONDecodeError as exc:
            raise DatasetError(path, f"invalid JSON ({exc.msg}, line {exc.lineno})") from None
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


@app.command("adapt")
def adapt(
    model: str = typer.Option(..., "-m", "--model", help="Source model: a model folder or a shipped model name."),
    target: Path = typer.Option(..., "--target", help="Labelled target-site dataset (nnU-Net raw layout)."),
    shots: int = typer.Option(..., "--shots", help="Labelled target subjects to adapt with."),
    output: Path = typer.Option(..., "-o", "--output", help="Adapted model folder to write."),
    workspace: Path | None = typer.Option(None, "-w", "--workspace", help=WS_HELP),
    seed: int = typer.Option(0, "--seed", help="Which subjects are drawn as shots (and the training seed)."),
    subject_pattern: str | None = typer.Option(
        None, "--subject-pattern", help="Regex whose first group is a case's subject, e.g. '^(ixi_[^_]+)_'."
    ),
    test_cases: Path | None = typer.Option(
        None,
        "--test-cases",
        help="Held-out target cases (one per line or a JSON list): never shots; scored at the end.",
    ),
    label_map: Path | None = typer.Option(
        None, "--label-map", help='JSON {source label: target label}, e.g. {"Anterior": "hippocampus", ...}.'
    ),
    source: Path | None = typer.Option(
        None, "--source", help="The source dataset: adds step 3, joint fine-tuning on source + shots."
    ),
    joint_share: float = typer.Option(0.5, "--joint-share", help="Fraction of joint batches drawn from --source."),
    epochs: int = typer.Option(20, "--epochs", help="Few-shot fine-tuning epochs (step 2)."),
    joint_epochs: int = typer.Option(10, "--joint-epochs", help="Joint fine-tuning epochs (step 3, with --source)."),
    iterations: int = typer.Option(50, "--iterations", help="Training iterations (batches) per epoch."),
    lr: float = typer.Option(1e-3, "--lr", help="Initial learning rate of both steps (poly decay)."),
    warmup_epochs: int = typer.Option(1, "--warmup-epochs", help="Linear LR warm-up over the first N epochs."),
    freeze_encoder_epochs: int = typer.Option(
        0, "--freeze-encoder-epochs", help="Keep the source encoder frozen for the first N epochs of each step."
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Patches per batch (default: the plan's)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    amp: bool | None = typer.Option(
        None, "--amp/--no-amp", help="Mixed precision (default: fp16 on CUDA, bf16 on CPUs with native bf16)."
    ),
):
    """Few-shot domain adaptation (SAMDA's procedure): fine-tune a source model on k labelled target
    subjects, then (with --source) jointly on source + target; docs/adapt.md."""
    from medseg.apps.adapt import AdaptConfig
    from medseg.apps.adapt import adapt as run_adapt
    from medseg.errors import DatasetError
    from medseg.evaluation.report import metrics_summary_lines
    from medseg.io.jsonio import read_json_object

    mapping = read_json_object(label_map, DatasetError, "label map") if label_map else None
    cfg = AdaptConfig(
        shots=shots, seed=seed, subject_pattern=subject_pattern, test_cases=_case_list(test_cases),
        test_source=str(test_cases or "--test-cases"), label_map=mapping,
        label_map_source=str(label_map) if label_map else None, source_dataset=source, joint_share=joint_share,
        epochs=epochs, joint_epochs=joint_epochs, iterations=iterations, lr=lr, warmup_epochs=warmup_epochs,
        freeze_encoder_epochs=freeze_encoder_epochs, batch_size=batch_size, device=device, amp=amp,
    )  # fmt: skip
    summary = run_adapt(model, target, output, cfg, workspace=workspace, log=_err)
    print(f"adapted model written: {output}")
    for line in metrics_summary_lines(summary) if summary else []:
        print(line)
