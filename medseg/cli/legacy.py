"""Old option spellings, accepted for one release (0.x -> 0.x+1) and hidden from ``--help``.

The vocabulary every subcommand shares (docs/cli.md): ``-i/--input``, ``-o/--output``,
``-m/--model`` (a model folder or shipped name, never an architecture: that is ``--arch``),
``-f/--fold`` (repeatable), ``--overwrite``. Spellings from before it are rewritten to the current
ones before the command parses its arguments, with a warning on stderr, so scripts keep working
while they are updated. One table, one rewrite, for every command.
"""

from __future__ import annotations

import sys

from typer.core import TyperGroup

# command -> {old spelling: current spelling}
RENAMED: dict[str, dict[str, str]] = {
    "train": {"--model": "--arch"},
    "predict": {"--folds": "--fold"},
    "ct-stats": {"--image": "--input"},
    "dicom-seg": {"--series": "--input", "--out": "--output"},
}


def rename_legacy(command: str, args: list[str], warn=None) -> list[str]:
    """``args`` with the old spellings of ``command``'s options replaced (``--out X``,
    ``--out=X``); arguments after ``--`` are left alone."""
    table = RENAMED.get(command, {})
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        flag, eq, value = arg.partition("=")
        if flag in table:
            warn(f"medseg: warning: {command} {flag} is now {table[flag]}; the old spelling goes in the next release")
            arg = table[flag] + eq + value
        out.append(arg)
    return out


class MedsegGroup(TyperGroup):
    """The ``medseg`` command group: rewrites old option spellings for the chosen subcommand."""

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        return name, cmd, rename_legacy(name, list(rest)) if name else rest
