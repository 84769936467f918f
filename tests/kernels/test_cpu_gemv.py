"""The CPU decode GEMV kernel (kernels/cpu_gemv): right against a float32 reference, the same row whatever the
call, taken by ``Linear`` for up to ``GEMV_MAX_ROWS`` rows beside oneDNN's bf16 kernel (for all without it), and
refused when it is wrong. Building and the fallbacks
when it cannot be built: test_cpu_native.py."""

from __future__ import annotations

import ctypes

import pytest
import torch

from splitserve.engine.model import Linear
from splitserve.kernels import cpu_gemv
from tests.helpers import needs_compiler, torch_threads


def _bf16(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(torch.bfloat16)


@needs_compiler
def test_passes_its_check_on_this_machine():
    assert cpu_gemv._kernel() is not None
    assert cpu_gemv.can_use(torch.zeros(8, 16, dtype=torch.bfloat16), None)


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows,k,n,with_bias", [(1, 576, 960, False), (2, 576, 3072, True), (3, 1536, 576, True), (1, 17, 5, True), (2, 15, 1, False), (1, 1, 33, False)])
def test_within_rounding_of_a_float32_reference(rows, k, n, with_bias, threads):
    gen = torch.Generator().manual_seed(k * 7 + n)
    x, w = _bf16(rows, k, gen=gen), _bf16(n, k, gen=gen)
    b = _bf16(n, gen=gen) if with_bias else None
    ref = x.float() @ w.float().T + (0 if b is None else b.float())
    terms = x.float().abs() @ w.float().abs().T + (0 if b is None else b.float().abs())
    with torch_threads(threads):
        got = cpu_gemv.gemv_bf16(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    err = (got.float() - ref).abs()
    assert bool((err <= ref.abs() * 2.0**-8 + terms * 1e-5).all()), err.max()


@needs_compiler
def test_a_row_is_the_same_in_every_call():
    """One row alone or beside others, on one thread or two: bit for bit the same (the sum's order is fixed)."""
    gen = torch.Generator().manual_seed(1)
    x, w, b = _bf16(3, 768, gen=gen), _bf16(2048, 768, gen=gen), _bf16(2048, gen=gen)
    with torch_threads(2):
        three, two = cpu_gemv.gemv_bf16(x, w, b), cpu_gemv.gemv_bf16(x[1:], w, b)
    with torch_threads(1):
        alone = [cpu_gemv.gemv_bf16(x[i : i + 1], w, b)[0] for i in range(3)]
    assert all(torch.equal(three[i], alone[i]) for i in range(3))
    assert torch.equal(two[0], alone[1]) and torch.equal(two[1], alone[2])


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
@pytest.mark.parametrize("x", [torch.zeros(1, 8, dtype=torch.bfloat16), torch.zeros(1, 16), torch.zeros(0, 16, dtype=torch.bfloat16), torch.zeros(16, dtype=torch.bfloat16)])
def test_shapes_the_c_code_would_misread_are_refused(x):
    with pytest.raises(ValueError):
        cpu_gemv.gemv_bf16(x, torch.zeros(4, 16, dtype=torch.bfloat16))


@needs_compiler
def test_linear_takes_it_for_few_rows_beside_onednn_and_for_every_row_count_without():
    gen = torch.Generator().manual_seed(3)
    w, b = _bf16(300, 128, gen=gen), _bf16(300, gen=gen)
    lin = Linear(w, b)
    for rows in range(1, cpu_gemv.GEMV_MAX_ROWS + 1):
        x = _bf16(rows, 128, gen=gen)
        assert torch.equal(lin(x), cpu_gemv.gemv_bf16(x, w, b))
    x = _bf16(40, 128, gen=gen)
    if lin.packed is not None:  # oneDNN has a bf16 kernel here: it takes four rows and more
        assert lin.gemv_rows == cpu_gemv.GEMV_MAX_ROWS
        assert torch.equal(lin(x[:4]), torch.ops.mkldnn._linear_pointwise(x[:4], lin.packed, b, "none", [], ""))
    else:
        assert torch.equal(lin(x), cpu_gemv.gemv_bf16(x, w, b))
    assert not Linear(w.float()).gemv_rows and not Linear(w.t()).gemv_rows  # float32 weights, a transposed view


@needs_compiler
def test_many_rows_match_the_reference_and_each_row_alone():
    """More than four rows take chunks of weight rows once per group of four rows of x: every row's result is still
    the one it gets alone (same summation order), and within bf16 rounding of a float64 reference."""
    gen = torch.Generator().manual_seed(4)
    x, w, b = _bf16(13, 200, gen=gen), _bf16(1000, 200, gen=gen), _bf16(1000, gen=gen)
    got = cpu_gemv.gemv_bf16(x, w, b)
    ref = x.double() @ w.double().T + b.double()
    assert float(((got.double() - ref).abs() / (ref.abs() + 1)).max()) < 2.0**-7
    for i in (0, 5, 12):
        assert torch.equal(got[i], cpu_gemv.gemv_bf16(x[i : i + 1], w, b)[0])


def test_the_check_rejects_a_wrong_kernel():
    def zeros(w_ptr, bias_ptr, x_ptr, y_ptr, m, k, n, threads):
        ctypes.memset(y_ptr, 0, m * n * 2)
        return 0

    with pytest.raises(AssertionError, match="over its bound"):
        cpu_gemv.check_kernel(zeros)


@needs_compiler
def test_the_prepared_call_is_the_generic_one_and_checks_its_input():
    gen = torch.Generator().manual_seed(6)
    w, b = _bf16(300, 128, gen=gen), _bf16(300, gen=gen)
    prepared = cpu_gemv.PreparedGemv(w, b)
    for rows in (1, 3, 9):
        x = _bf16(rows, 128, gen=gen)
        assert torch.equal(prepared(x), cpu_gemv.gemv_bf16(x, w, b))
    strided = _bf16(128, 2, gen=gen).t()  # rows of x need not be contiguous
    assert torch.equal(prepared(strided), prepared(strided.contiguous()))
    for bad in (torch.zeros(1, 127, dtype=torch.bfloat16), torch.zeros(1, 128), torch.zeros(0, 128, dtype=torch.bfloat16)):
        with pytest.raises(ValueError):
            prepared(bad)
    with pytest.raises(ValueError):
        cpu_gemv.PreparedGemv(w.float())
