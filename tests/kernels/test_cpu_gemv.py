"""The CPU decode GEMV kernel (kernels/cpu_gemv): built here, right against a float32 reference, the same row
whatever the call, and left unused (oneDNN instead) whenever it cannot be trusted."""

from __future__ import annotations

import ctypes

import pytest
import torch

from splitserve.engine.model import Linear
from splitserve.kernels import cpu_gemv

needs_compiler = pytest.mark.skipif(cpu_gemv.find_compiler() is None, reason="no C compiler on this machine")


@pytest.fixture
def fresh_kernel():
    """Forget the loaded kernel before and after the test (it reads its environment once per process)."""
    cpu_gemv._kernel.cache_clear()
    yield
    cpu_gemv._kernel.cache_clear()


def _bf16(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(torch.bfloat16)


@needs_compiler
def test_builds_and_passes_its_check_on_this_machine():
    """With a compiler present the kernel must build, load and pass its start-up check: a silent fallback would
    hide a broken build."""
    assert cpu_gemv._kernel() is not None
    assert cpu_gemv.can_use(torch.zeros(8, 16, dtype=torch.bfloat16), None)


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows,k,n,with_bias", [(1, 576, 960, False), (2, 576, 3072, True), (1, 17, 5, True), (2, 15, 1, False), (1, 1, 33, False)])
def test_within_rounding_of_a_float32_reference(rows, k, n, with_bias, threads):
    gen = torch.Generator().manual_seed(k * 7 + n)
    x, w = _bf16(rows, k, gen=gen), _bf16(n, k, gen=gen)
    b = _bf16(n, gen=gen) if with_bias else None
    ref = x.float() @ w.float().T + (0 if b is None else b.float())
    terms = x.float().abs() @ w.float().abs().T + (0 if b is None else b.float().abs())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_gemv.gemv_bf16(x, w, b)
    finally:
        torch.set_num_threads(before)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    err = (got.float() - ref).abs()
    assert bool((err <= ref.abs() * 2.0**-8 + terms * 1e-5).all()), err.max()


@needs_compiler
def test_a_row_is_the_same_in_every_call():
    """One row alone, beside another, on one thread or two: bit for bit the same (the sum's order is fixed)."""
    gen = torch.Generator().manual_seed(1)
    x, w, b = _bf16(2, 768, gen=gen), _bf16(2048, 768, gen=gen), _bf16(2048, gen=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        pair = cpu_gemv.gemv_bf16(x, w, b)
        torch.set_num_threads(1)
        first, second = cpu_gemv.gemv_bf16(x[:1], w, b), cpu_gemv.gemv_bf16(x[1:], w, b)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(pair[0], first[0]) and torch.equal(pair[1], second[0])


@needs_compiler
def test_nan_and_inf_propagate():
    gen = torch.Generator().manual_seed(2)
    x, w = _bf16(2, 64, gen=gen), _bf16(8, 64, gen=gen)
    x[0, 3] = float("nan")
    w[5, 10] = float("inf")
    got = cpu_gemv.gemv_bf16(x, w).float()
    assert torch.isnan(got[0]).all()
    assert torch.isinf(got[1, 5]) or torch.isnan(got[1, 5])
    assert torch.isfinite(got[1, :5]).all() and torch.isfinite(got[1, 6:]).all()


@needs_compiler
@pytest.mark.parametrize("x", [torch.zeros(3, 16, dtype=torch.bfloat16), torch.zeros(1, 8, dtype=torch.bfloat16), torch.zeros(1, 16), torch.zeros(0, 16, dtype=torch.bfloat16)])
def test_shapes_the_c_code_would_misread_are_refused(x):
    with pytest.raises(ValueError):
        cpu_gemv.gemv_bf16(x, torch.zeros(4, 16, dtype=torch.bfloat16))


@needs_compiler
def test_linear_takes_it_for_one_and_two_rows_only():
    gen = torch.Generator().manual_seed(3)
    w, b = _bf16(300, 128, gen=gen), _bf16(300, gen=gen)
    lin = Linear(w, b)
    assert lin.gemv
    for rows in (1, 2):
        x = _bf16(rows, 128, gen=gen)
        assert torch.equal(lin(x), cpu_gemv.gemv_bf16(x, w, b))
    x = _bf16(3, 128, gen=gen)
    if lin.packed is not None:
        assert torch.equal(lin(x), torch.ops.mkldnn._linear_pointwise(x, lin.packed, b, "none", [], ""))
    assert not Linear(w.float()).gemv and not Linear(w.t()).gemv  # float32 weights, a transposed view


def test_off_by_environment(fresh_kernel, monkeypatch):
    monkeypatch.setenv(cpu_gemv.ENV_VAR, "0")
    assert cpu_gemv._kernel() is None
    assert not Linear(torch.zeros(8, 16, dtype=torch.bfloat16)).gemv


def test_no_compiler_means_onednn(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert cpu_gemv.find_compiler() is None
    assert cpu_gemv._kernel() is None
    assert not Linear(torch.zeros(8, 16, dtype=torch.bfloat16)).gemv


def test_a_failing_compiler_is_reported(tmp_path):
    with pytest.raises(cpu_gemv.KernelBuildError, match="false failed"):
        cpu_gemv.build_library(tmp_path, "/bin/false")


@needs_compiler
def test_build_is_cached_and_leaves_no_temporaries(tmp_path):
    compiler = cpu_gemv.find_compiler()
    first = cpu_gemv.build_library(tmp_path, compiler)
    mtime = first.stat().st_mtime_ns
    assert cpu_gemv.build_library(tmp_path, compiler) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == [first.name]
    cpu_gemv.check_kernel(cpu_gemv.load_library(first))


def test_the_check_rejects_a_wrong_kernel():
    def zeros(w_ptr, bias_ptr, x_ptr, y_ptr, m, k, n, threads):
        ctypes.memset(y_ptr, 0, m * n * 2)

    with pytest.raises(AssertionError, match="over its bound"):
        cpu_gemv.check_kernel(zeros)
