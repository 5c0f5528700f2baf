"""``medseg reports ...``: the report tools of text-guided grounding (docs/grounding.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from medseg.cli import OVERWRITE_HELP, _fail, app

reports = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Report sentences as supervision: parse, generate, weak-label (docs/grounding.md).",
)
app.add_typer(reports, name="reports")


@reports.command("parse")
def parse(
    input: Path = typer.Argument(
        ..., help="CSV with columns id and sentence (a whole report or one sentence); other columns pass through."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="CSV to write: one row per sentence, keep/reason/numbers."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """Split reports into sentences; read each one's SUVmax, image number and side; keep or drop it."""
    from medseg.io.jsonio import write_text_atomic
    from medseg.outputs import check_new_outputs
    from medseg.reports.parse import parse_reports, read_table, summary, table_csv

    check_new_outputs([output], overwrite=overwrite)  # before any work: a refusal writes nothing
    rows = read_table(input)
    try:
        parsed = parse_reports(rows)
    except ValueError as exc:
        _fail(f"{input}: {exc}")
    write_text_atomic(output, table_csv(parsed))
    print(f"{summary(len(rows), parsed)} -> {output}")


@app.command("ground")
def ground(
    model: Path = typer.Option(..., "-m", "--model", help="A grounding model folder (contextual_unet)."),
    input: list[Path] = typer.Option(
        ..., "-i", "--input", help="The case's channel files in the model's channel order (repeatable: -i ct -i pet)."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder: ID.nii.gz, ID_overlay.png, grounding.csv."),
    sentence: list[str] = typer.Option([], "--sentence", help="A report sentence (repeatable); ids s1, s2, ..."),
    sentences: Path | None = typer.Option(None, "--sentences", help="CSV with id,sentence columns."),
    no_tta: bool = typer.Option(False, "--no-tta", help="Disable mirror test-time augmentation."),
    no_facts_filter: bool = typer.Option(
        False,
        "--no-facts-filter",
        help="Keep voxels hotter than the reported SUVmax and components away from the named image "
        "(default: the sentence's numbers rule them out before the most probable component is kept).",
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """Segment the lesion each report sentence names (one mask per sentence, PET MIP overlay)."""
    from medseg.apps.ground import ground as run

    rows = [{"id": f"s{i}", "sentence": s} for i, s in enumerate(sentence, start=1)]
    if sentences is not None:
        from medseg.reports.parse import read_table

        rows += [{"id": r["id"], "sentence": r["sentence"]} for r in read_table(sentences)]
    if not rows:
        _fail("give --sentence TEXT or --sentences CSV")
    if any(not r["sentence"].strip() for r in rows):
        _fail(f"empty sentence: {next(r['id'] for r in rows if not r['sentence'].strip())}")
    for p in input:
        if not p.is_file():
            _fail(f"{p}: input not found")
    run(model, list(input), rows, output, overwrite=overwrite, tta=not no_tta, device=device,
        use_facts=not no_facts_filter)  # fmt: skip
