"""Name-keyed model registry (timm-style).

Every architecture joins with one decorator::

    @register_model("unet", test_config={...}, requires=(), task="segmentation",
                    encoder=("encoder",), head=("heads",))
    def build_unet(in_channels, num_classes, *, spatial_dims=3, deep_supervision=True, **arch): ...

The entry is all that code outside the model module knows about an architecture: its task, which
parameters form its encoder (frozen by ``--freeze-encoder-epochs``) and its output heads (the tensors
that depend on the class count, fresh when fine-tuning to another label set), and optionally how the
planner sizes it (``memory_estimate`` + ``planner``, as nnU-Net's ResEnc M/L planners do).

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
class PlannerHook:
    """How the planner sizes a model on its own GPU budget (nnU-Net's ResEnc M/L planners): the patch
    shrinks until ``memory_estimate`` x the reference batch (2 in 3d, 12 in 2d) fits ``memory_gb``, then
    the batch fills it. ``model_kwargs(strides, kernel_sizes, spatial_dims)`` is the architecture the
    plan names for a topology (widths and depths are the model's business, not the planner's)."""

    memory_gb: float
    model_kwargs: Callable[[list, list, int], dict]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    test_config: dict = field(default_factory=dict)  # tiny kwargs used by the generated tests
    requires: tuple[str, ...] = ()  # optional import names it needs
    description: str = ""
    task: str = "segmentation"  # the task (medseg.tasks) it is trained and predicted for
    encoder: tuple[str, ...] = ()  # module names of the encoder: frozen by --freeze-encoder-epochs
    head: tuple[str, ...] = ()  # module names of the output heads: their shapes follow the class count
    # memory_estimate(patch_size, model_kwargs, *, in_channels, num_classes) -> GiB of one training sample
    memory_estimate: Callable[..., float] | None = None
    planner: PlannerHook | None = None  # lets `medseg plan --preset NAME` plan a configuration for it
    input_shape: tuple[int, ...] | None = None  # (C, *spatial) of a fixed-input model (e.g. SAM: 3, 256, 256)
    backbone: str | None = None  # a model built on another ("unet"): it takes that model's planned kwargs whole
    # a plain CNN (convs, instance norms, pointwise ops): safe to run with weights pre-cast to bf16 and in
    # channels-last layout (medseg.execution); models with fp32 islands or attention leave it False
    cpu_fast_path: bool = False
    spatial_dims: tuple[int, ...] = (2, 3)  # the dimensionalities it is built for (samda: 2D only)

    def available(self) -> dict[str, bool]:
        return {mod: importlib.util.find_spec(mod) is not None for mod in self.requires}

    def parameters_under(self, model: nn.Module, prefixes: tuple[str, ...]) -> list[tuple[str, nn.Parameter]]:
        """``model``'s named parameters inside the modules ``prefixes`` (``"encoder"`` matches
        ``encoder.0.conv.weight``, not ``encoder_proj.weight``)."""
        return [(n, p) for n, p in model.named_parameters() if any(n == q or n.startswith(q + ".") for q in prefixes)]


_REGISTRY: dict[str, ModelEntry] = {}
_ENTRY_POINTS_LOADED = False


def register_model(
    name: str,
    *,
    test_config: dict | None = None,
    requires: tuple[str, ...] = (),
    description: str = "",
    task: str = "segmentation",
    encoder: tuple[str, ...] = (),
    head: tuple[str, ...] = (),
    memory_estimate: Callable[..., float] | None = None,
    planner: PlannerHook | None = None,
    input_shape: tuple[int, ...] | None = None,
    backbone: str | None = None,
    cpu_fast_path: bool = False,
    spatial_dims: tuple[int, ...] = (2, 3),
):
    """Register a builder under ``name``; see :class:`ModelEntry` for the fields. ``encoder`` and
    ``head`` name modules (``"encoder"``, ``"decoder.seg_layers"``); the generated model tests check
    that each matches parameters and that the head holds every tensor whose shape follows the class count."""
    if planner is not None and memory_estimate is None:
        raise ValueError(f"model '{name}': a planner hook needs a memory_estimate")

    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name].builder is not fn:
            raise ValueError(f"model '{name}' is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = ModelEntry(
            name,
            fn,
            dict(test_config or {}),
            tuple(requires),
            description or (doc[0] if doc else ""),
            task=task,
            encoder=tuple(encoder),
            head=tuple(head),
            memory_estimate=memory_estimate,
            planner=planner,
            input_shape=tuple(input_shape) if input_shape else None,
            backbone=backbone,
            cpu_fast_path=cpu_fast_path,
            spatial_dims=tuple(spatial_dims),
        )
        return fn

    return deco


def _load_builtin_and_plugins() -> None:
    global _ENTRY_POINTS_LOADED
    import medseg.models.contextual  # noqa: F401
    import medseg.models.diffusion_unet  # noqa: F401
    import medseg.models.lightm_unet  # noqa: F401
    import medseg.models.mask_transformer  # noqa: F401
    import medseg.models.resenc  # noqa: F401
    import medseg.models.sam.imedsam  # noqa: F401
    import medseg.models.sam.litemedsam  # noqa: F401
    import medseg.models.samda  # noqa: F401
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


def plannable_models() -> list[str]:
    """Registered models the planner can size itself (a ``planner`` hook): the ``--preset`` choices."""
    _load_builtin_and_plugins()
    return sorted(n for n, e in _REGISTRY.items() if e.planner is not None)


def create_model(name: str, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered model. kwargs are architecture arguments (saved in checkpoints).

    The module is tagged with its registry name (``model.registry_name``, as timm attaches its
    ``pretrained_cfg``), so code holding only the network can find its entry (encoder, head)."""
    model = get_entry(name).builder(in_channels, num_classes, **kwargs)
    if isinstance(model, nn.Module):
        model.registry_name = name
    return model


def accepted_kwargs(name: str, keys) -> set[str]:
    """Which of ``keys`` the builder of model ``name`` takes (all of them if it has ``**kwargs``)."""
    params = inspect.signature(get_entry(name).builder).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return set(keys)
    return set(keys) & {p.name for p in params}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
