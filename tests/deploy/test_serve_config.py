"""examples/serve_config.yaml deployed for real with ``serve deploy`` on a ``ray start --head``.

The example's ``args`` are pointed at the tiny test checkpoint with small CPU shares, and
its HTTP port at a free one; everything else is the file as shipped. The test waits for
/health, sends a completion, checks ``serve status``, then ``serve shutdown``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.ray_head import REPO, RayHead, wait_http_ok

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SERVE_CONFIG = REPO / "examples" / "serve_config.yaml"


def tiny_copy(src: Path, dst: Path, model: str, http_port: int) -> Path:
    data = yaml.safe_load(src.read_text())
    data["http_options"]["port"] = http_port
    (app,) = data["applications"]
    args = app["args"]
    args["engine"] = {**(args.get("engine") or {}), "model": model, "dtype": "float32", "num_kv_blocks": 256}
    for role in ("prefill_resources", "decode_resources"):
        args[role] = {**(args.get(role) or {}), "num_cpus": 0.5}
    dst.write_text(yaml.safe_dump(data, sort_keys=False))
    return dst


def serve_applications(head: RayHead) -> dict:
    r = httpx.get(f"{head.dashboard_url}/api/serve/applications/", timeout=30)
    r.raise_for_status()
    return r.json().get("applications") or {}


def test_serve_deploy_example_config(ray_head: RayHead, tiny_model: str, tmp_path: Path):
    config = tiny_copy(SERVE_CONFIG, tmp_path / "serve_config.yaml", tiny_model, ray_head.http_port)
    url = ray_head.http_url
    t0 = time.monotonic()
    ray_head.cli("serve", "deploy", str(config), "--address", ray_head.dashboard_url, check=True, timeout=180)
    try:
        try:
            wait_http_ok(f"{url}/health", timeout_s=420)
        except TimeoutError:
            status = ray_head.cli("serve", "status", "--address", ray_head.dashboard_url, timeout=60)
            pytest.fail(f"not healthy after serve deploy; serve status:\n{status.stdout}\n{status.stderr[-2000:]}")
        ready_s = time.monotonic() - t0

        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        r = httpx.post(f"{url}/v1/completions", timeout=120,
                       json={"model": model, "prompt": "The tides are", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"], body
        assert body["usage"]["completion_tokens"] >= 1

        apps = serve_applications(ray_head)
        assert apps["splitserve"]["status"] == "RUNNING", json.dumps(apps, indent=1)[:3000]
        deployments = apps["splitserve"]["deployments"]
        assert set(deployments) == {"Ingress", "prefill", "decode"}
        assert all(d["status"] == "HEALTHY" for d in deployments.values()), deployments
        status = ray_head.cli("serve", "status", "--address", ray_head.dashboard_url, check=True, timeout=60)
        assert "RUNNING" in status.stdout
        print(f"\nserve deploy -> /health 200 in {ready_s:.1f} s")
    finally:
        ray_head.cli("serve", "shutdown", "--address", ray_head.dashboard_url, "--yes", check=True, timeout=120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=2)
        except httpx.HTTPError:
            break  # the proxy is gone
        time.sleep(1)
    else:
        pytest.fail("Serve still answers after serve shutdown")
