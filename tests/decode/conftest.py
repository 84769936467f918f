"""The decode worker tests share the in-process harness of ``tests/splitserve`` (one event loop per module)."""

from __future__ import annotations

from tests.splitserve.conftest import aio  # noqa: F401 (a fixture)
