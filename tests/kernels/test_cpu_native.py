"""Building the native CPU kernels (kernels/cpu_native): built once per machine and cached, and when they cannot
be built or are turned off, torch's kernels serve and nothing breaks."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.model import Linear
from splitserve.kernels import cpu_decode_attention, cpu_decode_step, cpu_gemv, cpu_layer_ops, cpu_native
from splitserve.kernels.cache_ops import kv_cache_shape
from tests.helpers import needs_compiler


@pytest.fixture
def fresh_kernels():
    """Forget the loaded library and checked kernels before and after the test (the environment is read once)."""
    caches = (cpu_native.library, cpu_gemv._kernel, cpu_decode_attention._kernels, cpu_layer_ops._kernels, cpu_decode_step._kernel)
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


def _nothing_native() -> None:
    assert cpu_native.library() is None
    assert not Linear(torch.zeros(8, 16, dtype=torch.bfloat16)).gemv_rows
    assert not cpu_decode_attention.serves(torch.zeros(kv_cache_shape(4, 2, 16, 2, 16), dtype=torch.bfloat16))
    assert not cpu_layer_ops.available()
    assert not cpu_decode_step.available()


@needs_compiler
def test_builds_and_loads_on_this_machine(fresh_kernels):
    """With a compiler present the library must build and load: a silent fallback would hide a broken build."""
    assert cpu_native.library() is not None


def test_off_by_environment(fresh_kernels, monkeypatch):
    monkeypatch.setenv(cpu_native.ENV_VAR, "0")
    _nothing_native()


def test_no_compiler_means_torch_kernels(fresh_kernels, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert cpu_native.find_compiler() is None
    _nothing_native()


def test_a_failing_compiler_is_reported(tmp_path):
    with pytest.raises(cpu_native.KernelBuildError, match="false failed"):
        cpu_native.build_library(tmp_path, "/bin/false")


@needs_compiler
def test_build_is_cached_and_leaves_no_temporaries(tmp_path):
    compiler = cpu_native.find_compiler()
    first = cpu_native.build_library(tmp_path, compiler)
    mtime = first.stat().st_mtime_ns
    assert cpu_native.build_library(tmp_path, compiler) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == [first.name]


@needs_compiler
def test_kernels_that_fail_their_check_or_lack_a_symbol_are_not_used_and_the_log_says_why(caplog):
    def wrong(kernels):
        raise AssertionError("off by one")

    assert cpu_native.checked_kernels(lambda lib: lib.splitserve_gemv_bf16, lambda k: None, "GEMV", "oneDNN serves") is not None
    with caplog.at_level("WARNING"):
        assert cpu_native.checked_kernels(lambda lib: lib.splitserve_gemv_bf16, wrong, "GEMV", "oneDNN serves") is None
        assert cpu_native.checked_kernels(lambda lib: lib.splitserve_no_such_kernel, lambda k: None, "missing", "torch serves") is None
    assert "GEMV unusable (off by one); oneDNN serves" in caplog.text
    assert "missing unusable" in caplog.text and "splitserve_no_such_kernel" in caplog.text
