"""Name-keyed registries: one function + one decorator per entry.

Every pluggable piece of medseg — tasks, losses, optimisers, learning-rate schedules, intensity
normalisations, augmentation presets (and models, in :mod:`medseg.models.registry`) — is looked up
by the name recorded in ``TrainingConfig``, the plan or ``model.json``, never by import path::

    from medseg.training.schedules import register_schedule

    @register_schedule("step")
    def step_lr(initial, step, total, cfg):
        '''Divide by 10 at half time.'''
        return initial * (0.1 if step >= total // 2 else 1.0)

An unknown name is a ``ValueError`` that lists what is registered (the CLI prints it in one line).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable[..., Any]
    description: str = ""
    meta: dict = field(default_factory=dict)


class Registry:
    """A named collection of entries of one kind (``kind`` is used in messages: "loss", "task", ...)."""

    def __init__(self, kind: str, *, loader: Callable[[], None] | None = None):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._loader = loader  # imports the modules that register the built-ins, on first lookup

    def register(self, name: str, *, description: str = "", **meta) -> Callable:
        def deco(fn):
            old = self._entries.get(name)
            if old is not None and old.fn is not fn and getattr(old.fn, "__qualname__", None) != fn.__qualname__:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            doc = (fn.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, fn, description or (doc[0] if doc else ""), dict(meta))
            return fn

        return deco

    def _load(self) -> None:
        if self._loader is not None:
            loader, self._loader = self._loader, None
            loader()

    def entry(self, name: str) -> Entry:
        self._load()
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} '{name}' (registered: {', '.join(self.names())})")
        return self._entries[name]

    def get(self, name: str) -> Callable[..., Any]:
        return self.entry(name).fn

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def describe(self) -> dict[str, str]:
        return {n: self._entries[n].description for n in self.names()}
