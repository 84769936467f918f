"""Helpers shared by the benchmark scripts: machine description, timing, tables.

Every benchmark prints the machine it ran on and the exact command, so a table
pasted into ``docs/benchmarks.md`` says where its numbers come from.
"""

from __future__ import annotations

import os
import platform
import shlex
import socket
import statistics
import sys
import time
from collections.abc import Callable


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (for a server this benchmark starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"
    except OSError:
        return "n/a"


def machine_lines(num_threads: int, openmp: bool = True) -> list[str]:
    """Markdown bullet lines: CPU, cores, ISA, torch version, threads (and this process's OpenMP runtime), load, command."""
    import torch

    from splitserve.engine.openmp import llvm_openmp_loaded

    flags = cpu_flags()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    runtime = "LLVM's (preloaded, as in the serving workers)" if llvm_openmp_loaded() else "GNU (torch's own)"
    return [
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores visible ({', '.join(isa) or 'no AVX flags found'})",
        f"- torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()} kernels), {num_threads} intra-op threads" + (f", {runtime} OpenMP" if openmp else ""),
        f"- Python {platform.python_version()}, load average at start {load_average()}",
        f"- command: `{command_line()}`",
    ]


def on_workers_openmp() -> None:
    """Re-run this process with the OpenMP runtime the engine workers preload (``splitserve.engine.openmp``), so a
    benchmark measures the engine as it serves; a no-op where none is installed, it is loaded, or ``SPLITSERVE_OPENMP=gnu``."""
    from splitserve.engine.openmp import llvm_openmp_library, llvm_openmp_loaded, openmp_env

    library = llvm_openmp_library()
    if library is None or llvm_openmp_loaded():
        return
    env = {**os.environ, **openmp_env(library, os.environ.get("LD_PRELOAD", ""))}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return min(timed(fn) for _ in range(repeats))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])
