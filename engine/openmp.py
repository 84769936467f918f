"""The OpenMP runtime under a serving worker's torch ops, and the process environment that selects it.

torch's CPU wheel links GNU OpenMP (libgomp). A serving worker runs its steps on
``AsyncEngine``'s thread, not the process's main thread, and there libgomp is slow
when the team is as large as the CPUs: it counts the idle main thread among the
threads it manages, sees more threads than CPUs, and lets its team sleep (futex)
after every parallel region instead of spinning, so each of a decode step's few
hundred small ops pays a wake-up. LLVM's runtime (``libomp``; Intel's ``libiomp5``
is built from the same source) spins for ``KMP_BLOCKTIME`` after a region whatever
the count, and serves the ``GOMP_*`` entry points torch calls. Measured on 2 CPUs
(one SmolLM2 decode step, 2 threads, three runs each): from a worker thread 50-64 ms
with libgomp, 29-37 ms with either LLVM runtime, as fast as from the main thread.

A runtime replaces libgomp only when the dynamic loader sees it first, so it is
preloaded (``LD_PRELOAD``) into the engine workers' processes through their Ray
runtime env. Which one: ``SPLITSERVE_OPENMP`` names a library path, or ``gnu`` to
keep libgomp; otherwise Intel's from an installed ``intel-openmp`` wheel (the
``cpu`` extra, x86-64 Linux), else LLVM's from the system (Debian: ``libomp5``),
else none and libgomp stays.
"""

from __future__ import annotations

import ctypes.util
import importlib.metadata
import os

OPENMP_ENV_VAR = "SPLITSERVE_OPENMP"
# How long (ms) an idle team spins before sleeping: covers the gaps between a step's ops (tens of µs of Python)
# but not the wait for the next request, so an idle worker does not burn its cores (LLVM's default is 200 ms).
KMP_BLOCKTIME_MS = "1"
_LLVM_RUNTIME_NAMES = ("libiomp5.so", "libomp.so")


def _intel_wheel_library() -> str | None:
    try:
        files = importlib.metadata.files("intel-openmp") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for path in files:
        if path.name == "libiomp5.so":
            located = os.path.realpath(str(path.locate()))
            if os.path.isfile(located):
                return located
    return None


def _system_llvm_library() -> str | None:
    name = ctypes.util.find_library("omp")  # e.g. "libomp.so.5"; the loader resolves a bare soname
    return name if name and "gomp" not in name else None


def llvm_openmp_library() -> str | None:
    """The LLVM-lineage OpenMP runtime to preload into engine workers, or None to keep GNU OpenMP."""
    chosen = os.environ.get(OPENMP_ENV_VAR, "").strip()
    if chosen.lower() == "gnu":
        return None
    if chosen:
        return chosen
    return _intel_wheel_library() or _system_llvm_library()


def openmp_env(library: str | None, inherited_preload: str = "") -> dict[str, str]:
    """Environment variables that make a new process run its OpenMP regions on ``library`` (none for None)."""
    if library is None:
        return {}
    preload = [library] + [p for p in inherited_preload.split(":") if p and p != library]
    return {"LD_PRELOAD": ":".join(preload), "KMP_BLOCKTIME": KMP_BLOCKTIME_MS}


def llvm_openmp_loaded(maps_path: str = "/proc/self/maps") -> bool:
    """Whether this process has an LLVM-lineage OpenMP runtime mapped (then it serves torch's OpenMP calls)."""
    try:
        with open(maps_path, encoding="utf-8", errors="replace") as maps:
            return any(os.path.basename(line.split()[-1]).startswith(_LLVM_RUNTIME_NAMES) for line in maps if "/" in line)
    except OSError:
        return False
