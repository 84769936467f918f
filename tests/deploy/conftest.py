"""The ``ray_head`` fixture: one real ``ray start --head`` shared by the tests of this folder
(package scope), stopped at the end without ``ray stop``; see ray_head.py for how it keeps
apart from any other Ray on this machine."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.deploy.ray_head import start_head


@pytest.fixture(scope="package")
def ray_head():
    t0 = time.monotonic()
    head = start_head()
    print(f"\nRay head up in {time.monotonic() - t0:.1f} s: gcs {head.gcs_address}, dashboard {head.dashboard_url}, temp {head.temp_dir}")
    try:
        yield head
    finally:
        try:
            head.cli("serve", "shutdown", "--address", head.dashboard_url, "--yes", timeout=90)
        except Exception:  # noqa: BLE001 - best effort; the head goes next anyway
            pass
        t1 = time.monotonic()
        head.stop()
        print(f"\nRay head stopped in {time.monotonic() - t1:.1f} s")
        shutil.rmtree(head.temp_dir, ignore_errors=True)
