"""The CPU decode steps' matrix-vector kernel (``cpu_gemv.c``), built with the machine's C compiler on first use.

A decode step of one or two sequences multiplies each weight matrix by one or two rows of bf16
activations: it reads every weight once and is bound by memory bandwidth. oneDNN's bf16 kernel
(``Linear``'s path for every other step) reaches ~17 GB/s there against ~41 GB/s of read bandwidth on
the 2-core machines measured; ``cpu_gemv.c`` reaches ~24-28 GB/s on the same matrices, and a SmolLM2
batch-1 decode step went from ~31 to ~20 ms (docs/benchmarks.md). From three rows on, oneDNN's kernel
is as fast, and it stays in use.

Build: ``$CC`` (else ``cc``, else ``gcc``) compiles the source with ``-O3 -march=native -fopenmp`` and
links it *without* an OpenMP runtime: its ``GOMP_*`` calls resolve, when it is loaded, to the runtime
torch already runs in this process (GNU's, or the LLVM one engine workers preload: ``engine/openmp.py``),
so the kernel and torch's ops share one thread team instead of two teams spinning on the same cores.
The library goes to ``$SPLITSERVE_CACHE/kernels/<key>/`` (the key hashes the source, the compiler's
version, the flags and the CPU's feature flags, which ``-march=native`` depends on); it is written under
a temporary name and renamed, so processes starting together never load half a file.

Before first use the loaded kernel is checked against a float32 reference on small cases (one and two
rows, a length that is not a multiple of 16, a bias, several threads). No compiler, a failed build or
load, or a wrong result: the kernel is not used, the log says why once, and ``Linear`` keeps oneDNN.
``SPLITSERVE_CPU_GEMV=0`` turns it off.
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

import torch

from splitserve.engine.model_cache import cache_root

logger = logging.getLogger(__name__)

ENV_VAR = "SPLITSERVE_CPU_GEMV"
GEMV_MAX_ROWS = 2  # rows of activations the kernel takes; from 3 on oneDNN's GEMM is as fast (measured)
SOURCE = Path(__file__).with_name("cpu_gemv.c")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC")
_BUILD_TIMEOUT_S = 120

GemvFn = Callable[..., None]


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
    parts = [SOURCE.read_bytes(), version.encode(), " ".join(CFLAGS).encode(), _cpu_features().encode(), platform.machine().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    target = cache_dir / key / "libsplitserve_gemv.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        obj, lib = Path(tmp) / "gemv.o", Path(tmp) / "gemv.so"
        _run([compiler, *CFLAGS, "-c", str(SOURCE), "-o", str(obj)])
        _run([compiler, "-shared", str(obj), "-o", str(lib)])  # no -fopenmp here: the process's runtime serves it
        os.replace(lib, target)
    return target


def load_library(path: Path) -> GemvFn:
    """The kernel's entry point; ctypes loads with ``RTLD_NOW``, so a symbol the process lacks fails here, not mid-step."""
    fn = ctypes.CDLL(str(path)).splitserve_gemv_bf16
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    return fn


def _call(fn: GemvFn, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threads: int) -> torch.Tensor:
    x = x.contiguous()
    (m, k), n = x.shape, weight.shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16)
    fn(weight.data_ptr(), None if bias is None else bias.data_ptr(), x.data_ptr(), y.data_ptr(), m, k, n, threads)
    return y


def check_kernel(fn: GemvFn) -> None:
    """Raise ``AssertionError`` unless ``fn`` agrees with a float32 reference: within bf16's rounding of the
    result plus float32 reordering of the sum (1e-5 of the sum of |terms|)."""
    gen = torch.Generator().manual_seed(0)
    cases = ((1, 64, 300, False, 1), (2, 40, 37, True, 2), (1, 1000, 700, True, 2), (2, 576, 129, False, 2), (1, 7, 3, True, 1))
    for m, k, n, with_bias, threads in cases:
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
        b = torch.randn(n, generator=gen).to(torch.bfloat16) if with_bias else None
        ref = x.float() @ w.float().T + (0 if b is None else b.float())
        terms = x.float().abs() @ w.float().abs().T + (0 if b is None else b.float().abs())
        err = (_call(fn, x, w, b, threads).float() - ref).abs()
        bound = ref.abs() * 2.0**-8 + terms * 1e-5
        assert bool((err <= bound).all()), f"m={m} k={k} n={n}: error {err.max().item():.3g} over its bound"


@functools.cache
def _kernel() -> GemvFn | None:
    if os.environ.get(ENV_VAR, "").strip() == "0":
        logger.info("CPU GEMV kernel off (%s=0): decode steps use oneDNN", ENV_VAR)
        return None
    compiler = find_compiler()
    if compiler is None:
        logger.info("CPU GEMV kernel unavailable: no C compiler ($CC, cc, gcc); decode steps use oneDNN")
        return None
    try:
        fn = load_library(build_library(cache_root() / "kernels", compiler))
        check_kernel(fn)
    except (KernelBuildError, OSError, AttributeError, AssertionError) as e:
        logger.warning("CPU GEMV kernel unavailable (%s); decode steps use oneDNN", e)
        return None
    return fn


def can_use(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``gemv_bf16`` serves this layer: a contiguous 2-D bf16 weight on the CPU (and a matching bias), and
    the kernel built and checked on this machine."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.dim() != 2 or not weight.is_contiguous():
        return False
    if bias is not None and (bias.dtype != torch.bfloat16 or bias.shape != weight.shape[:1] or not bias.is_contiguous()):
        return False
    return _kernel() is not None


def gemv_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for 1 to ``GEMV_MAX_ROWS`` rows of bf16 ``x``, on torch's current thread count; only
    for a layer ``can_use`` accepted (the shapes are checked here: the C code trusts them)."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.dim() != 2 or not 0 < x.shape[0] <= GEMV_MAX_ROWS or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv_bf16: x {tuple(x.shape)} {x.dtype} against weight {tuple(weight.shape)}")
    return _call(_kernel(), x, weight, bias, torch.get_num_threads())
