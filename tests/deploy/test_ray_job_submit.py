"""examples/ray_job.py submitted with ``ray job submit`` to a ``ray start --head``.

The command is the one in ray_job.py's docstring (and README), with the tiny checkpoint,
small CPU shares and a free HTTP port: the job deploys splitserve, runs 4 requests over
HTTP, prints a RESULTS line and deletes the application. Checked: ``ray job submit`` exits
0, ``ray job status`` says SUCCEEDED, ``ray job logs`` holds four ok lines and
``RESULTS ok=4 failed=0``, and the application is gone afterwards.
"""

from __future__ import annotations

import re
import subprocess
import uuid

import httpx
import pytest

from tests.deploy.ray_head import REPO, RayHead

pytestmark = [pytest.mark.ray, pytest.mark.slow]

JOB_SCRIPT = REPO / "examples" / "ray_job.py"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def documented_runtime_env() -> str:
    """The ``--runtime-env-json`` value from ray_job.py's docstring: the test runs what the docs say."""
    m = re.search(r"--runtime-env-json '([^']+)'", JOB_SCRIPT.read_text())
    assert m, "ray_job.py's docstring shows the submit command with --runtime-env-json"
    return m.group(1)


def test_ray_job_submit(ray_head: RayHead, tiny_model: str):
    sid = f"splitserve-test-{uuid.uuid4().hex[:8]}"
    dash = ray_head.dashboard_url
    submit = [
        "ray", "job", "submit", "--address", dash, "--submission-id", sid,
        "--working-dir", str(REPO), "--runtime-env-json", documented_runtime_env(),
        "--", "python", "examples/ray_job.py", "--model", tiny_model, "--num-requests", "4",
        "--port", str(ray_head.http_port), "--worker-cpus", "0.5", "--dtype", "float32", "--num-kv-blocks", "256",
    ]
    try:
        cp = ray_head.cli(*submit, timeout=540)  # blocks, tailing the job's logs, until the job ends
    except subprocess.TimeoutExpired:
        ray_head.cli("ray", "job", "stop", "--address", dash, sid, timeout=60)
        logs = ray_head.cli("ray", "job", "logs", "--address", dash, sid, timeout=60)
        pytest.fail(f"job {sid} still running after 540 s; logs:\n{logs.stdout[-4000:]}")

    status = ray_head.cli("ray", "job", "status", "--address", dash, sid, timeout=60)
    logs = ray_head.cli("ray", "job", "logs", "--address", dash, sid, timeout=60)
    status_text = ANSI.sub("", status.stdout + status.stderr)
    diagnostics = f"submit rc={cp.returncode}\n{cp.stderr[-3000:]}\nstatus:\n{status_text[-1500:]}\nlogs:\n{logs.stdout[-6000:]}"
    assert cp.returncode == 0, diagnostics
    assert re.search(rf"Job '{sid}' succeeded", status_text), diagnostics  # the CLI's words for SUCCEEDED
    job = httpx.get(f"{dash}/api/jobs/{sid}", timeout=30).json()
    assert job["status"] == "SUCCEEDED", diagnostics
    out = logs.stdout
    assert re.search(r"^RESULTS ok=4 failed=0 requests=4 ", out, re.M), diagnostics
    for i in range(4):
        assert re.search(rf"^request {i}: ok status=200 .*completion_tokens=[1-9]", out, re.M), diagnostics
    assert "deleted application 'splitserve'" in out, diagnostics

    apps = httpx.get(f"{dash}/api/serve/applications/", timeout=30).json().get("applications") or {}
    assert "splitserve" not in apps, f"the job left its application running: {list(apps)}"
