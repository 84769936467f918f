"""One local Ray + Serve for the tests of this package (stopped after its last test, so its
idle replicas do not share the cores with the tests that follow), and the apps deployed on it.

Apps share one HTTP proxy under different route prefixes: ``/d11`` (1 prefill +
1 decode), ``/d12`` (1 prefill + 2 decode), ``/agg`` (1 aggregated worker),
``/faulty`` (2 prefill + 1 decode with failing and slow KV transfers) and
``/slowxfer`` (every transfer held 4 s).

The tiny checkpoint prefills a short prompt far within ``routing.local_prefill_budget_s``, so the apps
whose tests are about the transfer path set it to 0 (every prompt goes through a prefill worker);
``/d12`` keeps the default and so serves a mix of local and remote prefills.
"""

from __future__ import annotations

import os
import socket
import time

import httpx
import pytest

APPS = {
    "d11": dict(mode="disaggregated", num_prefill=1, num_decode=1, price_per_accelerator_hour=2.5, routing=dict(local_prefill_budget_s=0.0)),
    "agg": dict(mode="aggregated", num_prefill=0, num_decode=1),
    "faulty": dict(
        mode="disaggregated", num_prefill=2, num_decode=1, transfer_timeout_s=1.0,
        faults=dict(fail_fraction=0.3, delay_fraction=0.2, delay_s=3.0, seed=7),
        routing=dict(max_attempts=4, prefill_timeout_s=20.0, local_prefill_budget_s=0.0),
    ),
    # two decode workers: a stream whose decode replica is killed resumes on the other (migration)
    "d12": dict(mode="disaggregated", num_prefill=1, num_decode=2),
    # every transfer takes 4 s, so a test can kill the prefill replica mid-request
    "slowxfer": dict(
        mode="disaggregated", num_prefill=2, num_decode=1, transfer_timeout_s=30.0,
        faults=dict(delay_fraction=1.0, delay_s=4.0), routing=dict(max_attempts=3, prefill_timeout_s=30.0, local_prefill_budget_s=0.0),
    ),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="package")
def serve_port():
    import ray
    from ray import serve

    from splitserve.serve_cli import SERVE_ENV

    for key, value in SERVE_ENV.items():  # as `splitserve serve` does: the HTTP proxy calls the ingress over gRPC
        os.environ.setdefault(key, value)
    port = _free_port()
    # address="local": never attach to a cluster some other test or user started with `ray start`
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


def wait_healthy(url: str, timeout_s: float = 180.0) -> None:
    """Until every role is healthy ("ok"; a "degraded" app answers 200 too while one role stands in for the other)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            if r.status_code == 200 and r.json()["status"] == "ok":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s")


@pytest.fixture(scope="package")
def apps(serve_port, tiny_model) -> dict[str, str]:
    """Base URLs (…/<prefix>) of the deployed apps, all healthy."""
    from ray import serve

    from splitserve.app import build_app
    from splitserve.config import ServeConfig

    urls = {}
    for name, spec in APPS.items():
        cfg = ServeConfig.model_validate({
            **spec,
            "app_name": name,
            "engine": {"model": tiny_model, "dtype": "float32", "num_kv_blocks": 400, "max_num_batched_tokens": 512},
            "http": {"served_model_name": "tiny"},
            "prefill_resources": {"num_cpus": 0.5},
            "decode_resources": {"num_cpus": 0.5},
        })
        serve.run(build_app(cfg), name=name, route_prefix=f"/{name}", blocking=False)
        urls[name] = f"http://127.0.0.1:{serve_port}/{name}"
    for url in urls.values():
        wait_healthy(url)
    return urls


def wait_all_blocks_free(url: str, timeout_s: float = 15.0) -> list[dict]:
    """Poll /admin/workers until every worker reports all KV blocks free; returns the reports."""
    deadline = time.monotonic() + timeout_s
    reports: list[dict] = []
    while time.monotonic() < deadline:
        reports = httpx.get(f"{url}/admin/workers", timeout=5).json()["workers"]
        if reports and all(r["num_free_blocks"] == r["num_total_blocks"] and r["num_running"] == 0 and r["num_waiting"] == 0 for r in reports):
            return reports
        time.sleep(0.2)
    raise AssertionError(f"KV blocks still in use after {timeout_s} s: {reports}")
