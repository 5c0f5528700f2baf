"""One exception type per user-facing failure.

Every error carries the offending path and a one-line reason so the CLI can print
``medseg: error: <path>: <reason>`` and exit non-zero without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class MedsegError(Exception):
    """Base class: a failure the user can fix (bad input, bad config)."""

    def __init__(self, path: str | Path | None, reason: str):
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(self.one_line())

    def __reduce__(self):
        # worker processes (verify, plan, preprocess) send errors back pickled; the default
        # pickling would call __init__ with the formatted message only and fail
        return (type(self), (self.path, self.reason))

    def one_line(self) -> str:
        reason = " ".join(self.reason.split())
        return f"{self.path}: {reason}" if self.path else reason


class ImageReadError(MedsegError):
    """An image file is missing, truncated, corrupt, or not an image."""


class DatasetError(MedsegError):
    """A dataset folder or dataset.json is inconsistent."""


class PlanError(MedsegError):
    """A plan file is missing or invalid."""


class CheckpointError(MedsegError):
    """A model folder is missing a file, has a tampered file, or cannot be read safely."""


class OutputError(MedsegError):
    """An output location cannot be written."""
