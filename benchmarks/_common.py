"""Shared helpers for the side-by-side benchmark scripts (standard library only).

* peer virtual environments in ``benchmarks/.venvs/<peer>`` built from ``requirements-peers.txt``
* ``run_measured``: wall time and memory of a child process tree (peak RSS of the largest
  process from ``/usr/bin/time``/wait4, and peak summed RSS and PSS over the whole tree, sampled
  from /proc every 0.1 s so that background workers are counted; PSS counts pages shared
  between forked workers once)
* machine / version / load information and the markdown results file
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
VENVS = BENCH_DIR / ".venvs"
RESULTS = BENCH_DIR / "results"
REQUIREMENTS = BENCH_DIR / "requirements-peers.txt"
TORCH_PIN = "torch==2.13.0"


def default_data_root() -> Path:
    return Path(os.environ.get("MEDSEG_SHARED_DATA", REPO.parent / "shared" / "data"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- environments


def medseg_python() -> Path:
    py = REPO / ".venv" / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"{py} not found: run `bash scripts/install.sh` first")
    return py


def venv_python(peer: str) -> Path:
    return VENVS / peer / "bin" / "python"


def _peer_sections() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for raw in REQUIREMENTS.read_text().splitlines():
        line = raw.strip()
        if line.startswith("# [") and line.endswith("]"):
            current = line[3:-1]
            sections[current] = []
        elif line and not line.startswith("#") and current is not None:
            sections[current].append(line)
    return sections


def _pip(py: Path, args: list[str]) -> None:
    cmd = [str(py), "-m", "pip", "install", "-q", *args]
    log("$ " + " ".join(shlex.quote(a) for a in cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = "\n".join(line for line in proc.stdout.splitlines() if not line.startswith("WARNING: Location"))
    if proc.returncode != 0:
        raise SystemExit(f"pip failed ({proc.returncode}):\n{out}")


def ensure_venv(peer: str, check: str, *, rebuild: bool = False) -> Path:
    """Create/refresh benchmarks/.venvs/<peer>; ``check`` is Python code that must run in it."""
    sections = _peer_sections()
    if peer not in sections:
        raise SystemExit(f"no [{peer}] section in {REQUIREMENTS}")
    root = VENVS / peer
    py = venv_python(peer)
    marker = root / ".bench-installed"
    if rebuild and root.exists():
        shutil.rmtree(root)
    fresh = marker.exists() and marker.stat().st_mtime >= REQUIREMENTS.stat().st_mtime
    if not fresh:
        log(f"building peer environment {root}")
        VENVS.mkdir(parents=True, exist_ok=True)
        if not py.exists():
            subprocess.run(
                [sys.executable if sys.prefix == sys.base_prefix else _base_python(), "-m", "venv", str(root)],
                check=True,
            )
        constraints = VENVS / "constraints.txt"
        constraints.write_text(TORCH_PIN + "\n")
        _pip(py, [TORCH_PIN])
        if sections[peer]:
            _pip(py, ["-c", str(constraints), *sections[peer]])
        if sections.get(f"{peer}:no-deps"):
            _pip(py, ["--no-deps", *sections[f"{peer}:no-deps"]])
        if f"{peer}:medseg" in sections:
            _pip(py, ["-c", str(constraints), "-e", str(REPO)])
    proc = subprocess.run([str(py), "-c", check], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(
            f"peer environment {root} is broken ({check!r}):\n{proc.stderr[-3000:]}\nrebuild it with --rebuild-venv"
        )
    marker.touch()
    return py


def _base_python() -> str:
    """A python outside any virtualenv to create venvs from (venv-in-venv works too, but keep it clean)."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(base) if base.exists() else sys.executable


def package_versions(py: Path, names: list[str]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except Exception: out[n] = 'not installed'\n"
        "print(json.dumps(out))"
    )
    proc = subprocess.run([str(py), "-c", code, *names], capture_output=True, text=True)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {n: "?" for n in names}


def medseg_git() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "medseg"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return rev + (" (medseg/ has uncommitted changes)" if dirty else "")
    except OSError:
        return "?"


# ---------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU's model name and native bf16 units (AMX or not: the model name does not say)."""
    from medseg.utils import cpu_description

    return cpu_description()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def mem_total_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")


def other_busy_processes(threshold_cpu_s: float = 0.5, window_s: float = 1.0) -> list[str]:
    """Processes outside this one's tree that used > threshold of a core over a short window."""
    mine = {os.getpid(), os.getppid()}

    def cpu_times():
        out = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                out[int(d.name)] = (int(fields[11]) + int(fields[12]), stat[stat.index("(") + 1 : stat.rindex(")")])
            except (OSError, ValueError):
                continue
        return out

    a = cpu_times()
    time.sleep(window_s)
    b = cpu_times()
    tick = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (t1, name) in b.items():
        if pid in mine or pid not in a:
            continue
        used = (t1 - a[pid][0]) / tick / window_s
        if used > threshold_cpu_s:
            try:
                cmd = (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]).strip()
            except OSError:
                cmd = name
            busy.append(f"pid {pid} ({used:.1f} cores): {cmd or name}")
    return busy


def machine_info() -> dict:
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "memory_gb": round(mem_total_gb(), 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
        "busy": other_busy_processes(),
    }


# ---------------------------------------------------------------------------- measuring


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024 if hasattr(os, "sysconf") else 4


def _rss_kb(pid: int) -> int:
    """Resident set size from /proc/<pid>/statm (cheap: no page-table walk)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0


def _pss_kb(pid: int) -> int:
    """Proportional set size from /proc/<pid>/smaps_rollup (walks the page tables: ~ms per GiB)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return _rss_kb(pid)


class TreeSampler(threading.Thread):
    """Peak RSS (every ``interval`` s) and PSS of a process tree, at a bounded cost to the measurement.

    RSS comes from ``statm`` (microseconds); PSS needs ``smaps_rollup``, which walks page tables and
    costs milliseconds per large process, so it is sampled only as often as keeps this thread's CPU use
    under ~2 % (``max_overhead``). The thread's own CPU seconds are reported (``sampler_cpu_s``)."""

    def __init__(self, pid: int, interval: float = 0.1, skip_root: bool = False, max_overhead: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.interval, self.skip_root, self.max_overhead = pid, interval, skip_root, max_overhead
        self.peak_rss_kb = self.peak_pss_kb = 0
        self.max_procs = 0
        self.cpu_s = 0.0
        self._halt = threading.Event()

    def run(self):
        start_cpu = time.thread_time()
        next_pss, now = 0.0, time.monotonic()
        while not self._halt.is_set():
            pids = _tree(self.pid)
            if self.skip_root:  # the /usr/bin/time wrapper
                pids = pids[1:]
            self.peak_rss_kb = max(self.peak_rss_kb, sum(_rss_kb(p) for p in pids))
            now = time.monotonic()
            if now >= next_pss:
                c0 = time.thread_time()
                self.peak_pss_kb = max(self.peak_pss_kb, sum(_pss_kb(p) for p in pids))
                next_pss = now + max(self.interval, (time.thread_time() - c0) / self.max_overhead)
            self.max_procs = max(self.max_procs, len(pids))
            self._halt.wait(self.interval)
        self.cpu_s = time.thread_time() - start_cpu

    def stop(self):
        self._halt.set()
        self.join()


def run_measured(
    cmd: list[str],
    *,
    env: dict | None = None,
    cwd: Path | None = None,
    log_file: Path | None = None,
    timeout: float | None = None,
    check: bool = True,
) -> dict:
    """Run ``cmd``; returns wall seconds, peak RSS of the largest process, peak RSS/PSS summed over the tree."""
    timefile = Path(tempfile.mkstemp(prefix="bench_time_")[1])
    full = cmd
    if Path("/usr/bin/time").exists():
        full = ["/usr/bin/time", "-f", "%M", "-o", str(timefile), *cmd]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    if log_file:
        out.write(("\n$ " + " ".join(shlex.quote(str(a)) for a in cmd) + "\n").encode())
        out.flush()
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(a) for a in full], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    sampler = TreeSampler(proc.pid, skip_root=full is not cmd)
    sampler.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    wall = time.perf_counter() - t0
    sampler.stop()
    if log_file:
        out.close()
    max_rss_kb = None
    try:
        txt = timefile.read_text().strip().splitlines()
        max_rss_kb = int(txt[-1]) if txt and txt[-1].strip().isdigit() else None
    except OSError:
        pass
    timefile.unlink(missing_ok=True)
    if check and rc != 0:
        tail = Path(log_file).read_text()[-4000:] if log_file else ""
        raise RuntimeError(f"command failed (rc={rc}): {' '.join(map(str, cmd))}\n{tail}")
    return {
        "wall_s": wall,
        "rc": rc,
        "max_rss_mb": max_rss_kb / 1024 if max_rss_kb else None,
        "tree_rss_mb": sampler.peak_rss_kb / 1024,
        "tree_pss_mb": sampler.peak_pss_kb / 1024,
        "max_procs": sampler.max_procs,
        "sampler_cpu_s": round(sampler.cpu_s, 2),
    }


# ---------------------------------------------------------------------------- reporting


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=2, unit=""):
    if x is None:
        return "n/a"
    return f"{x:.{digits}f}{unit}"


def spread(xs, digits=2):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return fmt(xs[0], digits)
    return f"{fmt(statistics.median(xs), digits)} ({fmt(min(xs), digits)}–{fmt(max(xs), digits)})"


def command_line() -> str:
    return " ".join(
        shlex.quote(a)
        for a in [
            os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable,
            os.path.relpath(sys.argv[0], REPO),
            *sys.argv[1:],
        ]
    )


def header_lines(title: str, info: dict, versions: dict[str, dict[str, str]], quick: bool) -> list[str]:
    lines = [f"# {title}", ""]
    if quick:
        lines += ["> **QUICK SMOKE TEST (`--quick`): tiny sizes, not a measurement.**", ""]
    lines += [
        f"* command (from the repository root): `{command_line()}`",
        f"* date: {info['date_utc']}",
        f"* machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GiB RAM, {info['os']}, "
        f"Python {info['python']}",
        f"* medseg commit: {medseg_git()}",
    ]
    for env, vers in versions.items():
        lines.append(f"* {env}: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    load = info["loadavg"]
    lines.append(f"* load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if info["busy"]:
        lines += [
            "",
            "> **WARNING: other processes were using the CPU when this run started; timings are not valid:**",
        ] + [f"> * {b}" for b in info["busy"]]
    lines.append("")
    return lines


def write_results(name: str, lines: list[str], quick: bool, out: Path | None = None) -> Path:
    path = out or RESULTS / (f"{name}-quick.md" if quick else f"{name}.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")
    log(f"results written to {path}")
    return path


def add_common_args(parser, *, workdir_default: str) -> None:
    parser.add_argument("--quick", action="store_true", help="Tiny smoke test (seconds to a few minutes).")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / workdir_default,
        help="Scratch folder for data/outputs (default: %(default)s).",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="Results markdown (default: benchmarks/results/<name>.md, <name>-quick.md with --quick).",
    )
    parser.add_argument("--rebuild-venv", action="store_true", help="Recreate the peer virtual environment.")
    parser.add_argument(
        "--allow-busy",
        action="store_true",
        help="Run even if other processes are using the CPU (the results are marked as invalid).",
    )


def guard_busy(info: dict, allow: bool, quick: bool) -> None:
    if info["busy"] and not (allow or quick):
        raise SystemExit(
            "other processes are using the CPU, timings would not be valid:\n  "
            + "\n  ".join(info["busy"])
            + "\n(pass --allow-busy to run anyway; results get marked)"
        )
