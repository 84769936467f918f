"""The shipped dashboard and alerts against a real Prometheus scraping a running server.

Prometheus (Debian's ``prometheus`` package; ``scripts/test.sh`` installs it where
it can) scrapes the ``d11`` app every second with the shipped alert rules loaded.
After mixed two-tenant traffic, every dashboard query and every alert's query is
run through Prometheus' HTTP API and must return data, every metric a query names
must be exported, and Prometheus must report every rule healthy. ``splitserve top``
renders the same server. Without the binary the test skips and says why.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from splitserve.dashboards import alerts, panels, scrape_config, write_all
from splitserve.top import parse_samples, run as run_top

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
needs_prometheus = pytest.mark.skipif(
    not Path(PROMETHEUS).is_file() or not Path(PROMTOOL).is_file(),
    reason="Prometheus is not installed (apt-get install prometheus; scripts/test.sh does it when run as root with apt)",
)
METRIC = re.compile(r"\bsplitserve_[a-z_]+")


def test_shipped_files_are_the_generated_ones(tmp_path):
    """deploy/ holds what ``splitserve dashboard`` writes (regenerate it after changing splitserve/dashboards.py)."""
    for path in write_all(tmp_path):
        shipped = ROOT / "deploy" / path.relative_to(tmp_path)
        assert shipped.read_text() == path.read_text(), f"{shipped} is stale: run `splitserve dashboard deploy`"


@needs_prometheus
def test_promtool_accepts_the_rules_and_config():
    for args in (["check", "rules", "deploy/prometheus/splitserve-alerts.yml"], ["check", "config", "deploy/prometheus/prometheus.yml"]):
        out = subprocess.run([PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prometheus(apps, tmp_path):
    """A Prometheus on loopback scraping the d11 app every second, the shipped rules loaded; yields its API URL."""
    target = apps["d11"].removeprefix("http://")
    host, prefix = target.split("/", 1)
    config = scrape_config(host, interval="1s")
    config["scrape_configs"][0]["metrics_path"] = f"/{prefix}/metrics"
    config["rule_files"] = [str(ROOT / "deploy" / "prometheus" / "splitserve-alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _query(prom: str, expr: str) -> list:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "success", (expr, r.text[:500])
    return r.json()["data"]["result"]


def _wait_scrapes(prom: str, n: int, timeout_s: float = 60) -> None:
    """Until the target has been up for ``n`` scrapes in a row (rates need two samples in their window)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        res = _query(prom, "count_over_time(up[1m])")
        up = _query(prom, "up")
        if res and up and float(up[0]["value"][1]) == 1 and float(res[0]["value"][1]) >= n:
            return
        time.sleep(0.5)
    raise AssertionError(f"Prometheus did not scrape the server {n} times: {_query(prom, 'up')}")


@needs_prometheus
def test_every_panel_and_alert_query_gets_data_from_a_live_server(apps, prometheus, capsys):
    url = apps["d11"]
    _wait_scrapes(prometheus, 2)
    bodies = [
        {"model": "tiny", "prompt": [5 + i] * (40 + 30 * i), "max_tokens": 12, "temperature": 0, "ignore_eos": True, "tenant": tenant}
        for i, tenant in enumerate(["team-a", "team-b", "team-a", "team-b"])
    ]
    with httpx.Client(timeout=120) as c:
        for body in bodies:
            assert c.post(f"{url}/v1/completions", json=body).status_code == 200
    text = httpx.get(f"{url}/metrics", timeout=10).text
    exported = {name for name, _ in parse_samples(text)}
    help_lines = set(METRIC.findall(text))  # every family, with samples or not (# HELP / # TYPE lines)
    first = time.monotonic()
    _wait_scrapes(prometheus, 4)
    while time.monotonic() - first < 3:  # two scrapes after the traffic: every rate has a change to show
        time.sleep(0.5)

    missing = []
    for panel in panels():
        for q in panel.queries:
            names = set(METRIC.findall(q.expr))
            unknown = {n for n in names if n not in help_lines and n.removesuffix("_bucket") not in help_lines}
            assert not unknown, f"panel {panel.title!r} names metrics the server does not export: {unknown}"
            if not q.only_with and not _query(prometheus, q.expr):
                missing.append(f"panel {panel.title!r}: {q.expr}")
    for alert in alerts():
        if not _query(prometheus, alert.query):
            missing.append(f"alert {alert.name}: {alert.query}")
    assert not missing, "queries without data:\n" + "\n".join(missing)
    assert {"splitserve_compute_seconds_total", "splitserve_compute_cost_total"} <= exported

    tenants = {r["metric"]["tenant"] for r in _query(prometheus, "sum by (tenant) (splitserve_compute_seconds_total)")}
    assert {"team-a", "team-b"} <= tenants

    rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"][0]["rules"]
    assert sorted(r["name"] for r in rules) == sorted(a.name for a in alerts())
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]

    # the operator's terminal view of the same server: every worker on its own line, rates after the second read
    assert run_top(url, interval_s=0.2, iterations=2) == 0
    screen = capsys.readouterr().out.split("splitserve top")[-1]
    admin = httpx.get(f"{url}/admin/workers", timeout=10).json()
    for w in admin["workers"]:
        assert w["worker_id"][:34] in screen
    assert re.search(r"requests/s \d+\.\d\d", screen), screen  # a rate, not "-": the second read has a previous one
