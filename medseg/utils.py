"""Small shared helpers: worker counts, progress bars, torch threads."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable


def default_workers() -> int:
    """Processes for CPU-bound preprocessing: all cores the process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


def track(it: Iterable, *, total: int | None = None, description: str = "", enabled: bool = True):
    """A rich progress bar on a terminal, silent otherwise (logs, CI)."""
    if not enabled or not sys.stderr.isatty():
        yield from it
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if total is None and hasattr(it, "__len__"):
        total = len(it)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total)
        for item in it:
            yield item
            progress.advance(task)
