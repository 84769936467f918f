"""``keep_freed_memory``: a step's temporaries, freed and allocated again, stop page-faulting.

Run in subprocesses: the allocator's thresholds are process-wide, and the default's
behaviour is the baseline the same pattern is measured against.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from splitserve.engine.host_memory import keep_freed_memory

pytestmark = [pytest.mark.unit, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")]

# Tensors of a size not seen before, as a step's gathered K/V grow with the context: under glibc's default
# thresholds each is a fresh mapping whose every page faults; with them fixed, the heap's freed memory serves it.
_PATTERN = """
import resource, sys, torch
from splitserve.engine.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(40):
    k = torch.ones(2**20 + i * 2**16)  # 4 MiB, growing by 256 KiB
    v = torch.ones(2**20 + i * 2**16)
    del k, v
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_TOUCHED = sum(2 * (4 * 2**20 + i * 2**18) // 4096 for i in range(40))


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PATTERN, mode], capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_kept_memory_is_reused_without_page_faults():
    if not keep_freed_memory():
        pytest.skip("not glibc")
    default, kept = _faults("default"), _faults("keep")
    assert default > PAGES_TOUCHED // 2, f"glibc's default thresholds faulted {default} of {PAGES_TOUCHED} pages"
    assert kept < PAGES_TOUCHED // 5, f"{kept} of {PAGES_TOUCHED} pages faulted with the thresholds fixed"
