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
