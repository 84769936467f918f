"""Which OpenMP runtime the engine workers get (``engine.openmp``), and that a preloaded one serves torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from splitserve.engine import openmp

pytestmark = pytest.mark.unit


def test_the_operator_chooses_by_environment(monkeypatch):
    monkeypatch.setenv(openmp.OPENMP_ENV_VAR, "gnu")
    assert openmp.llvm_openmp_library() is None
    monkeypatch.setenv(openmp.OPENMP_ENV_VAR, "/opt/omp/libomp.so")
    assert openmp.llvm_openmp_library() == "/opt/omp/libomp.so"


def test_found_runtime_is_intels_wheel_first_then_the_systems(monkeypatch):
    monkeypatch.delenv(openmp.OPENMP_ENV_VAR, raising=False)
    monkeypatch.setattr(openmp, "_intel_wheel_library", lambda: "/venv/lib/libiomp5.so")
    monkeypatch.setattr(openmp, "_system_llvm_library", lambda: "libomp.so.5")
    assert openmp.llvm_openmp_library() == "/venv/lib/libiomp5.so"
    monkeypatch.setattr(openmp, "_intel_wheel_library", lambda: None)
    assert openmp.llvm_openmp_library() == "libomp.so.5"
    monkeypatch.setattr(openmp, "_system_llvm_library", lambda: None)
    assert openmp.llvm_openmp_library() is None


def test_env_puts_the_runtime_first_and_keeps_an_operators_preloads():
    assert openmp.openmp_env(None, "/x/libjemalloc.so") == {}
    env = openmp.openmp_env("/v/libiomp5.so", "/x/libjemalloc.so:/v/libiomp5.so")
    assert env == {"LD_PRELOAD": "/v/libiomp5.so:/x/libjemalloc.so", "KMP_BLOCKTIME": openmp.KMP_BLOCKTIME_MS}


def test_loaded_runtime_is_read_from_the_process_memory_map(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0\n7f02-7f03 rw-p 0 0:0 0\n")
    assert not openmp.llvm_openmp_loaded(str(maps))
    maps.write_text(maps.read_text() + "7f04-7f05 r-xp 00000000 08:01 2 /venv/lib/libiomp5.so\n")
    assert openmp.llvm_openmp_loaded(str(maps))
    assert not openmp.llvm_openmp_loaded(str(tmp_path / "absent"))


@pytest.mark.skipif(openmp.llvm_openmp_library() is None, reason="no LLVM OpenMP runtime installed (the `cpu` extra)")
def test_a_process_started_with_the_env_runs_torch_on_the_runtime_and_computes_the_same():
    """The env is what the engine workers get; in such a process torch's parallel ops run on the runtime."""
    probe = (
        "import torch; from splitserve.engine.openmp import llvm_openmp_loaded; torch.manual_seed(0);"
        "a = torch.randn(512, 512); print(llvm_openmp_loaded(), torch.get_num_threads(), float((a @ a).sum()))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("LD_PRELOAD", None)
    plain = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout.split()
    env.update(openmp.openmp_env(openmp.llvm_openmp_library(), ""))
    preloaded = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert plain[:2] == ["False", "2"] and preloaded[:2] == ["True", "2"]
    assert abs(float(plain[2]) - float(preloaded[2])) <= 1e-3 * max(1.0, abs(float(plain[2])))


def test_worker_actor_options_preload_the_runtime_and_keep_an_operators_env(monkeypatch):
    from splitserve import app
    from splitserve.config import WorkerResources

    monkeypatch.setattr(app, "llvm_openmp_library", lambda: "/venv/lib/libiomp5.so")
    own = WorkerResources(num_cpus=2, runtime_env={"env_vars": {"LD_PRELOAD": "/x/libjemalloc.so", "KMP_BLOCKTIME": "5"}})
    env_vars = app._actor_options(own, None)["runtime_env"]["env_vars"]
    assert (env_vars["LD_PRELOAD"], env_vars["KMP_BLOCKTIME"]) == ("/venv/lib/libiomp5.so:/x/libjemalloc.so", "5")
    assert own.runtime_env["env_vars"]["LD_PRELOAD"] == "/x/libjemalloc.so"  # the config's own dict is untouched
    plain = app._actor_options(WorkerResources(num_cpus=1), None)["runtime_env"]["env_vars"]
    assert (plain["LD_PRELOAD"], plain["KMP_BLOCKTIME"]) == ("/venv/lib/libiomp5.so", openmp.KMP_BLOCKTIME_MS)
    monkeypatch.setattr(app, "llvm_openmp_library", lambda: None)  # none installed, or SPLITSERVE_OPENMP=gnu
    assert not {"LD_PRELOAD", "KMP_BLOCKTIME"} & set(app._actor_options(WorkerResources(num_cpus=1), None)["runtime_env"]["env_vars"])
