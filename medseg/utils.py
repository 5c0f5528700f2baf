"""Small shared helpers: worker counts, progress bars, devices and precision."""

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


def resolve_device(name: str):
    """A ``torch.device`` from a name; ``"auto"`` is CUDA when available, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from medseg.errors import MedsegError

    try:
        device = torch.device(name)
    except RuntimeError:
        raise MedsegError(None, f"--device: unknown device '{name}' (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MedsegError(None, f"--device {name}: this torch has no CUDA device (use --device cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MedsegError(None, f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def cpu_bf16_units() -> list[str]:
    """The native bfloat16 units torch finds on this CPU: ``avx512_bf16`` and/or ``amx`` (AMX tiles:
    bf16 convolutions several times faster; AVX512-BF16 alone: about as fast as fp32 for matmuls)."""
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = {"avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
    return [unit for unit, name in checks.items() if bool(getattr(cpu, name, lambda: False)())]


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): only then is bf16 faster than fp32."""
    return bool(cpu_bf16_units())


def autocast_dtype(device, amp: bool | None):
    """The reduced precision for ``torch.autocast`` on ``device``, or None for fp32.

    ``amp=None`` (automatic): float16 on CUDA (as nnU-Net), bfloat16 on CPUs with native bf16
    (convolutions about twice as fast), fp32 elsewhere. ``amp=True`` forces reduced precision
    (bf16 on any CPU, where it may be slower), ``amp=False`` forces fp32.
    """
    kind = getattr(device, "type", str(device))
    if amp is False or kind not in ("cuda", "cpu"):
        return None
    import torch

    if kind == "cuda":
        return torch.float16
    return torch.bfloat16 if amp or native_bf16_cpu() else None


def autocast_context(device, dtype):
    """``torch.autocast`` in ``dtype`` on ``device``'s type, or a no-op when ``dtype`` is None (fp32)."""
    import torch

    kind = getattr(device, "type", str(device))
    return torch.autocast(kind, dtype=dtype or torch.float32, enabled=dtype is not None)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description() -> str:
    """The CPU's model name and its native bf16 units, e.g. ``Intel(R) Xeon(R) Processor (avx512_bf16, amx)``:
    the model name alone does not tell the machines with AMX from those without."""
    units = cpu_bf16_units()
    return f"{cpu_name()} ({', '.join(units) if units else 'no native bf16'})"
