"""How a network runs on this machine: precision, memory layout and weight casting, chosen by measuring.

Convolutions on CPUs are fastest in channels-last layout and, on CPUs with native bfloat16
(AVX512-BF16, AMX), in bf16 — but only if nothing between them undoes it: autocast casts every fp32
weight and activation on each call, and a norm that wants NCDHW copies the tensor to it and back.
The fast path therefore (inference) casts the weights to bf16 once and runs without autocast, keeps
activations in the layout the convolutions want from input to output (instance norm stays in that
layout: :mod:`medseg.models.norms`), and returns fp32 outputs; training keeps fp32 master weights,
bf16 autocast and the loss in fp32 as before, in the chosen layout.

Which combination wins differs between machines (on a 2-core EPYC with AVX512-BF16, channels-last
makes the hippocampus U-Net's forward 1.3x faster but its training step slower; Intel's AMX favours
channels-last far more), so :func:`choose_execution` times the candidates on the actual network at
its actual input shape — a few forward (or training) passes each — and caches the winner per CPU,
torch version, thread count, network and shape in ``~/.cache/medseg/execution.json``. Models whose
registry entry does not declare ``cpu_fast_path`` (attention or fp32-island decoders) run as before:
autocast in the default layout. ``--fp32`` and an explicit ``--layout`` still decide; the choice is
written in the run's manifest (:meth:`Execution.describe`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

LAYOUTS = ("auto", "contiguous", "channels_last")
CACHE_FILE = Path.home() / ".cache" / "medseg" / "execution.json"
BENCHMARK_MAX_PARAMS = 200_000_000  # larger networks: the CPU-feature rule instead of timing copies


@dataclass(frozen=True)
class Execution:
    """``precision``: float32 | bfloat16 | float16; ``layout``: contiguous | channels_last;
    ``precast``: weights cast to ``precision`` once (inference only) instead of autocast per call;
    ``chosen_by``: benchmark | cache | rule | user; ``timings``: ms per candidate when measured."""

    precision: str = "float32"
    layout: str = "contiguous"
    precast: bool = False
    chosen_by: str = "rule"
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.precision)

    @property
    def name(self) -> str:
        return f"{self.precision} {'pre-cast' if self.precast else 'autocast' if self.precision != 'float32' else ''}".rstrip() + f" {self.layout}"  # fmt: skip

    def prepare(self, net: nn.Module) -> nn.Module:
        """``net`` converted in place for this execution (pre-cast weights, layout)."""
        if self.precast and self.precision != "float32":
            net = net.to(self.dtype)
        if self.layout == "channels_last":
            net = net.to(memory_format=_memory_format(_conv_dims(net) + 2))
        return net

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """The network input in this execution's dtype (pre-cast) and layout, in one copy at most."""
        dtype = self.dtype if self.precast else x.dtype
        if self.layout == "channels_last" and x.dim() in (4, 5):
            return x.to(dtype=dtype, memory_format=_memory_format(x.dim()))
        return x.to(dtype)

    def context(self, device):
        """Autocast when the network runs in reduced precision from fp32 weights; else nothing."""
        kind = getattr(device, "type", str(device))
        if self.precision == "float32" or self.precast:
            return contextlib.nullcontext()
        return torch.autocast(kind, dtype=self.dtype)

    def describe(self) -> dict:
        return {"execution": self.name, **asdict(self)}


def _memory_format(ndim: int):
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def _conv_dims(net: nn.Module) -> int:
    for m in net.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.weight.dim() - 2
    return 3


def candidates(device, *, amp: bool | None, layout: str, training: bool, fast_path: bool) -> list[Execution]:
    """The executions worth timing for this device and these user choices (one means: no timing)."""
    from medseg.utils import autocast_dtype, native_bf16_cpu

    if layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    reduced = autocast_dtype(device, amp)
    kind = getattr(device, "type", str(device))
    if kind != "cpu" or not fast_path:  # CUDA (fp16 autocast, as nnU-Net) and models without a fast path
        chosen = "contiguous" if layout == "auto" else layout
        return [Execution(str(reduced or torch.float32).removeprefix("torch."), chosen, chosen_by="rule")]
    precisions = ["bfloat16", "float32"] if amp is None and native_bf16_cpu() else [str(reduced or torch.float32).removeprefix("torch.")]  # fmt: skip
    layouts = ["contiguous", "channels_last"] if layout == "auto" else [layout]
    by = (
        "benchmark" if len(precisions) * len(layouts) > 1 else "user" if layout != "auto" or amp is not None else "rule"
    )
    return [Execution(p, lay, precast=not training and p != "float32", chosen_by=by) for p in precisions for lay in layouts]  # fmt: skip


def choose_execution(
    net: nn.Module, example: tuple[int, ...], device, *, amp: bool | None = None, layout: str = "auto",
    training: bool = False, fast_path: bool = False, cache: Path | bool = True, cond: dict | None = None,
) -> Execution:  # fmt: skip
    """The fastest execution of ``net`` for inputs of shape ``example`` (B, C, *spatial) on ``device``:
    measured on copies of the network (``net`` is not changed) unless only one candidate is left, the
    network is too large to copy (then: bf16/fp32 by the CPU-feature rule, channels-last only on AMX),
    or the answer is cached. ``training``: time forward + backward with fp32 master weights.
    ``cache``: True (:data:`CACHE_FILE`), False (always measure) or a file."""
    cache = CACHE_FILE if cache is True else (cache or None)
    cands = candidates(device, amp=amp, layout=layout, training=training, fast_path=fast_path)
    if len(cands) == 1:
        return cands[0]
    if sum(p.numel() for p in net.parameters()) > BENCHMARK_MAX_PARAMS:
        amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        want = "channels_last" if amx else "contiguous"
        return next(replace(c, chosen_by="rule") for c in cands if c.layout == want)
    key = _cache_key(net, example, training, cands)
    cached = _read_cache(cache).get(key)
    if cached:
        return Execution(**{**cached, "chosen_by": "cache"})
    timed = []
    for c in cands:
        t = _time_or_inf(c, net, example, device, training, cond or {})
        if t == float("inf") and c.precast:  # e.g. no bf16 kernel for an op: autocast runs it in fp32
            c = replace(c, precast=False)
            t = _time_or_inf(c, net, example, device, training, cond or {})
        timed.append((c, t))
    cands = [c for c, _ in timed]
    timings = {c.name: t for c, t in timed}
    best = min(cands, key=lambda c: timings[c.name])
    if timings[best.name] == float("inf"):  # nothing ran: let the default path raise its own error
        fallback = next((c for c in cands if c.precision == "float32" and c.layout == "contiguous"), cands[0])
        return replace(fallback, precast=False, chosen_by="rule")
    best = replace(best, timings={k: round(v * 1e3, 2) for k, v in timings.items() if v < float("inf")})
    _write_cache(cache, key, asdict(best))
    return best


def _time_or_inf(ex: Execution, *args) -> float:
    """:func:`_time`, or infinity for a candidate this build of torch cannot run (e.g. a bf16 kernel
    missing for one layout: CPU avg_pool3d has none for NCDHW bf16)."""
    try:
        return _time(ex, *args)
    except (RuntimeError, NotImplementedError):
        return float("inf")


def _time(ex: Execution, net: nn.Module, example, device, training: bool, cond: dict, reps: int = 2) -> float:
    """Seconds per forward (+ backward when training) of a copy of ``net`` run as ``ex``: best of ``reps``."""
    model = ex.prepare(copy.deepcopy(net).to(device).train(training))
    x = ex.input(torch.randn(example, generator=torch.Generator().manual_seed(0)).to(device))  # global RNG untouched

    def once():
        with ex.context(device), torch.set_grad_enabled(training):
            out = model(x, **cond)
        if training:
            sum(o.float().mean() for o in (out if isinstance(out, (list, tuple)) else [out])).backward()

    once()  # warm-up: oneDNN primitive creation, allocations
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - start)
    return best


def _cache_key(net: nn.Module, example, training: bool, cands: list[Execution]) -> str:
    from medseg.utils import cpu_name

    shapes = [(n, tuple(p.shape)) for n, p in net.state_dict().items()]
    parts = [cpu_name(), torch.__version__, torch.get_num_threads(), type(net).__name__, shapes, list(example),
             training, [c.name for c in cands]]  # fmt: skip
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def _read_cache(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged cache is re-measured, never an error


def _write_cache(path: Path | None, key: str, value: dict) -> None:
    if path is None:
        return
    try:
        from medseg.io.jsonio import write_text_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({**_read_cache(path), key: value}, indent=1))
    except OSError:
        pass  # a read-only home: measure again next time
