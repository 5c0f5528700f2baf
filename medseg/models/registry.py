"""Name-keyed model registry (timm-style).

Every architecture joins with one decorator::

    @register_model("unet", test_config={...}, requires=())
    def build_unet(in_channels, num_classes, *, spatial_dims=3, deep_supervision=True, **arch): ...

Other packages add models through the ``medseg.models`` entry-point group (``name = package.module``
in their ``entry_points.txt`` / ``[project.entry-points."medseg.models"]``); each entry point is imported
lazily the first time the registry is listed, and one that fails to import is reported on stderr in one
line and skipped.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn as nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    test_config: dict = field(default_factory=dict)  # tiny kwargs used by the generated tests
    requires: tuple[str, ...] = ()  # optional import names it needs
    description: str = ""

    def available(self) -> dict[str, bool]:
        return {mod: importlib.util.find_spec(mod) is not None for mod in self.requires}


_REGISTRY: dict[str, ModelEntry] = {}
_ENTRY_POINTS_LOADED = False


def register_model(
    name: str, *, test_config: dict | None = None, requires: tuple[str, ...] = (), description: str = ""
):
    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name].builder is not fn:
            raise ValueError(f"model '{name}' is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = ModelEntry(
            name, fn, dict(test_config or {}), tuple(requires), description or (doc[0] if doc else "")
        )
        return fn

    return deco


def _load_builtin_and_plugins() -> None:
    global _ENTRY_POINTS_LOADED
    import medseg.models.lightm_unet  # noqa: F401
    import medseg.models.resenc  # noqa: F401
    import medseg.models.stunet  # noqa: F401
    import medseg.models.unet  # noqa: F401  (registers built-ins)

    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="medseg.models"):
        try:
            ep.load()  # importing the module runs its @register_model decorators
        except Exception as exc:  # a broken plugin must not hide the built-ins and the other plugins
            dist = getattr(getattr(ep, "dist", None), "name", None)
            where = f"'{ep.name} = {ep.value}'" + (f" from {dist}" if dist else "")
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            print(f"medseg: warning: model plugin {where} failed to load ({reason}); skipped", file=sys.stderr)


def list_models() -> list[str]:
    _load_builtin_and_plugins()
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    _load_builtin_and_plugins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model '{name}'; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_model(name: str, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered model. kwargs are architecture arguments (saved in checkpoints)."""
    return get_entry(name).builder(in_channels, num_classes, **kwargs)


def accepted_kwargs(name: str, keys) -> set[str]:
    """Which of ``keys`` the builder of model ``name`` takes (all of them if it has ``**kwargs``)."""
    params = inspect.signature(get_entry(name).builder).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return set(keys)
    return set(keys) & {p.name for p in params}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
