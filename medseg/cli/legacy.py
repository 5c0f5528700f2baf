"""Old option spellings, accepted for one release (0.x -> 0.x+1) and hidden from ``--help``.

The vocabulary every subcommand shares (docs/cli.md): ``-i/--input``, ``-o/--output``,
``-m/--model`` (a model folder or shipped name, never an architecture: that is ``--arch``),
``-f/--fold`` (repeatable), ``--overwrite``. Spellings from before it are rewritten to the current
ones before the command parses its arguments, with a warning on stderr, so scripts keep working
while they are updated. One table, one rewrite, for every command.
"""

from __future__ import annotations

import re
import sys

from typer.core import TyperGroup

# command -> {old spelling: current spelling}
RENAMED: dict[str, dict[str, str]] = {
    "train": {"--model": "--arch"},
    "predict": {"--folds": "--fold"},
    "ct-stats": {"--image": "--input"},
    "dicom-seg": {"--series": "--input", "--out": "--output"},
    "synthesize": {"--image": "--input"},  # LeFusion's own spelling (issue 13): accepted, -i/--input is ours
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


# command -> options documented with several space-separated numbers (``--box 10 20 110 120``)
MULTI_NUMBER: dict[str, tuple[str, ...]] = {"sam": ("--box", "--window")}
_NUMBER = re.compile(r"^-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def join_numbers(command: str, args: list[str], limit: int = 6) -> list[str]:
    """``--box 10 20 110 120`` -> ``--box 10,20,110,120`` (up to ``limit`` numbers) for the options of
    :data:`MULTI_NUMBER`, which the parser then reads as one value."""
    flags = MULTI_NUMBER.get(command, ())
    out, i = [], 0
    while i < len(args):
        out.append(args[i])
        if args[i] in flags:
            j = i + 1
            while j < len(args) and j - i <= limit and _NUMBER.match(args[j]):
                j += 1
            if j - i > 2:
                out.append(",".join(args[i + 1 : j]))
                i = j
                continue
        i += 1
    return out


class MedsegGroup(TyperGroup):
    """The ``medseg`` command group: rewrites old option spellings for the chosen subcommand and joins
    multi-number options."""

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        return name, cmd, join_numbers(name, rename_legacy(name, list(rest))) if name else rest
