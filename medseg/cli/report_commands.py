"""``medseg reports ...``: the report tools of text-guided grounding (docs/grounding.md)."""

from __future__ import annotations

import typer

from medseg.cli import app

reports = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Report sentences as supervision: parse, generate, weak-label (docs/grounding.md).",
)
app.add_typer(reports, name="reports")
