"""Native CPU kernels (``cpu_native.c``, ``cpu_decode_step.c``), built with the machine's C compiler on first use.

Four users: ``cpu_gemv`` (decode steps' matrix-vector products), ``cpu_decode_attention`` (decode
attention read from the paged cache in place), ``cpu_layer_ops`` (a bf16 layer's residual add + RMSNorm
and rotary embedding) and ``cpu_decode_step`` (a bf16 decode step's layers in one call). Each checks its entry points against a float32
reference before first use and falls back to torch's kernels if the library is missing or wrong.

Build: ``$CC`` (else ``cc``, else ``gcc``) compiles the sources with ``-O3 -march=native -fopenmp`` and
links it *without* an OpenMP runtime: its ``GOMP_*`` calls resolve, when it is loaded, to the runtime
torch already runs in this process (GNU's, or the LLVM one engine workers preload: ``engine/openmp.py``),
so the kernels and torch's ops share one thread team instead of two teams spinning on the same cores.
The library goes to ``$SPLITSERVE_CACHE/kernels/<key>/`` (the key hashes the sources, the compiler's
version, the flags and the CPU's feature flags, which ``-march=native`` depends on); it is written under
a temporary name and renamed, so processes starting together never load half a file.

No compiler or a failed build or load: ``library()`` is None, the log says why once, and torch's kernels
serve. ``SPLITSERVE_CPU_KERNELS=0`` turns the native kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from splitserve.engine.model_cache import cache_root

logger = logging.getLogger(__name__)

ENV_VAR = "SPLITSERVE_CPU_KERNELS"
SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_native.c", "cpu_decode_step.c"))
HEADER = Path(__file__).with_name("cpu_vec.h")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC")
_BUILD_TIMEOUT_S = 120

Kernels = TypeVar("Kernels")


class KernelBuildError(RuntimeError):
    """The C compiler failed (its message is attached) or could not be run."""


def find_compiler() -> str | None:
    """``$CC`` if set, else ``cc`` or ``gcc`` on the PATH; None when there is none."""
    chosen = os.environ.get("CC", "").strip()
    if chosen:
        return shutil.which(chosen) or (chosen if os.path.isfile(chosen) else None)
    return shutil.which("cc") or shutil.which("gcc")


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _run(cmd: list[str]) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
    except subprocess.CalledProcessError as e:
        raise KernelBuildError(f"{Path(cmd[0]).name} failed: {(e.stderr or e.stdout).strip()[-600:]}") from None
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelBuildError(f"could not run {Path(cmd[0]).name}: {e}") from None


def build_library(cache_dir: Path, compiler: str) -> Path:
    """The compiled library's path under ``cache_dir``, built there first if missing; raises ``KernelBuildError``."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelBuildError(f"could not run {compiler}: {e}") from None
    parts = [*(path.read_bytes() for path in (*SOURCES, HEADER)), version.encode(), " ".join(CFLAGS).encode(), _cpu_features().encode(), platform.machine().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    target = cache_dir / key / "libsplitserve_cpu.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        objects = [str(Path(tmp) / f"{source.stem}.o") for source in SOURCES]
        for source, obj in zip(SOURCES, objects):
            _run([compiler, *CFLAGS, "-c", str(source), "-o", obj])
        lib = Path(tmp) / "cpu_native.so"
        _run([compiler, "-shared", *objects, "-o", str(lib), "-lm"])  # no -fopenmp here: the process's runtime serves it
        os.replace(lib, target)
    return target


def entry_point(lib: ctypes.CDLL, name: str, argtypes: list, restype: type | None = None) -> ctypes._CFuncPtr:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library, or None (off, no compiler, or a failed build or load; logged once). ctypes loads with
    ``RTLD_NOW``, so a symbol the process lacks fails here, not in the middle of a step."""
    if os.environ.get(ENV_VAR, "").strip() == "0":
        logger.info("native CPU kernels off (%s=0): torch's kernels serve", ENV_VAR)
        return None
    compiler = find_compiler()
    if compiler is None:
        logger.info("native CPU kernels unavailable: no C compiler ($CC, cc, gcc); torch's kernels serve")
        return None
    try:
        return ctypes.CDLL(str(build_library(cache_root() / "kernels", compiler)))
    except (KernelBuildError, OSError) as e:
        logger.warning("native CPU kernels unavailable (%s); torch's kernels serve", e)
        return None


def checked_kernels(bind: Callable[[ctypes.CDLL], Kernels], check: Callable[[Kernels], None], what: str, fallback: str) -> Kernels | None:
    """What ``bind`` takes from the library (its entry points), once ``check`` passed on it; None when the library is
    missing, lacks a symbol or fails the check, which is logged as "<what> unusable (<why>); <fallback>"."""
    lib = library()
    if lib is None:
        return None
    try:
        kernels = bind(lib)
        check(kernels)
    except (AttributeError, AssertionError) as e:
        logger.warning("%s unusable (%s); %s", what, e, fallback)
        return None
    return kernels
