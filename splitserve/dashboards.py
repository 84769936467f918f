"""The Grafana dashboard and the Prometheus alert rules that ship with splitserve, as data.

Every panel and every alert is a PromQL query over the ``splitserve_`` metrics the
ingress exports (``splitserve.metrics``); ``splitserve dashboard DIR`` writes them as
files an operator loads as they are (``deploy/`` holds the written copies):

* ``grafana/splitserve.json``: a dashboard whose Prometheus data source is picked
  when it is imported (the ``DS_PROMETHEUS`` input);
* ``prometheus/splitserve-alerts.yml``: alert rules (``promtool check rules``);
* ``prometheus/prometheus.yml``: a scrape config for one splitserve server.

An alert is written as ``(query) condition`` so the query alone can be evaluated
(the shipped-files test runs every panel's and every alert's query against a real
Prometheus scraping a live server and requires data back). Per-worker series are
copies of the workers' reports kept by each ingress replica, so queries over them
take ``max by (worker)`` rather than sums across replicas.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from splitserve.config import SLOTargets

RATE = "[1m]"  # the window of the dashboard's rates; alerts use their own


@dataclass(frozen=True, slots=True)
class Query:
    expr: str
    legend: str
    only_with: str = ""  # a feature without which the series does not exist (the planner): no data is then expected


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    description: str = ""


@dataclass(frozen=True, slots=True)
class Alert:
    name: str
    query: str
    condition: str  # appended to the query: "< 0.9", "> 0"
    for_: str
    severity: str
    summary: str

    @property
    def expr(self) -> str:
        return f"({self.query}) {self.condition}"


def _quantiles(metric: str, by: str = "") -> tuple[Query, ...]:
    grouping = f"le{', ' + by if by else ''}"
    suffix = f" {{{{{by}}}}}" if by else ""
    return tuple(
        Query(f"histogram_quantile({q}, sum by ({grouping}) (rate({metric}_bucket{RATE})))", f"p{int(q * 100)}{suffix}")
        for q in (0.5, 0.99)
    )


ATTAINMENT = (
    f"sum(rate(splitserve_slo_met_requests_total{RATE})) / clamp_min(sum(rate(splitserve_requests_total{{status=\"ok\"}}{RATE})), 1e-9)"
)


def panels() -> list[Panel]:
    return [
        Panel("Time to first token", _quantiles("splitserve_time_to_first_token_seconds", "mode"), "s"),
        Panel("Inter-token latency", _quantiles("splitserve_inter_token_latency_seconds", "mode"), "s"),
        Panel("Request rate by status", (Query(f"sum by (status) (rate(splitserve_requests_total{RATE}))", "{{status}}"),), "reqps"),
        Panel(
            "Goodput (requests within the SLOs)",
            (Query(f"sum(rate(splitserve_slo_met_requests_total{RATE}))", "goodput"),
             Query(f"sum(rate(splitserve_requests_total{{status=\"ok\"}}{RATE}))", "completed")),
            "reqps", "SLOs from the server config (slo.ttft_s, slo.tpot_s)",
        ),
        Panel("SLO attainment", (Query(ATTAINMENT, "attainment"),), "percentunit"),
        Panel("Queue depth per role", (Query("sum by (role) (max by (role, worker) (splitserve_queue_depth))", "{{role}}"),)),
        Panel(
            "KV blocks used per worker",
            (Query("max by (worker) (splitserve_kv_blocks_used) / max by (worker) (splitserve_kv_blocks_total)", "{{worker}}"),),
            "percentunit",
        ),
        Panel(
            "KV transfer",
            (Query(f"sum(rate(splitserve_kv_transfer_bytes_total{RATE}))", "bytes/s"),),
            "Bps", "KV bytes moved from prefill to decode workers",
        ),
        Panel("KV transfer latency", _quantiles("splitserve_kv_transfer_seconds"), "s"),
        Panel(
            "Prefix-cache hit rate",
            (Query(
                f"sum(rate(splitserve_prefix_cache_hit_tokens_total{RATE})) / clamp_min(sum(rate(splitserve_prompt_tokens_total{RATE})), 1e-9)",
                "hit tokens / prompt tokens",
            ),),
            "percentunit",
        ),
        Panel(
            "Requests per worker (spread)",
            (Query(f"sum by (worker, role) (rate(splitserve_requests_routed_total{RATE}))", "{{worker}} {{role}}"),), "reqps",
        ),
        Panel(
            "Tokens per worker (spread)",
            (Query(f"max by (worker, role) (rate(splitserve_worker_tokens{RATE}))", "{{worker}} {{role}}"),), "short",
            "tokens computed per second (prompt chunks and decodes)",
        ),
        Panel("Imbalance (max/mean, 1 = even)", (Query("max by (role, measure) (splitserve_worker_imbalance)", "{{role}} {{measure}}"),)),
        Panel(
            "Fallbacks, retries and migrations",
            (Query(f"sum by (reason) (rate(splitserve_fallbacks_total{RATE}))", "fallback {{reason}}"),
             Query(f"sum by (reason) (rate(splitserve_request_retries_total{RATE}))", "retry {{reason}}"),
             Query(f"sum(rate(splitserve_migrations_total{RATE}))", "migrations")),
            "reqps",
        ),
        Panel(
            "Replicas per role",
            (Query("max by (role) (splitserve_replicas)", "{{role}}"),
             Query("max by (role) (splitserve_planner_desired_replicas)", "planner wants {{role}}", only_with="planner")),
        ),
        Panel(
            "Busy fraction per role",
            (Query("avg by (role) (max by (role, worker) (splitserve_worker_busy_fraction))", "{{role}}"),), "percentunit",
            "engine step time over wall time (accelerator utilisation)",
        ),
        Panel(
            "Accelerator memory per worker",
            (Query("max by (worker) (splitserve_worker_accelerator_memory_bytes)", "{{worker}}"),), "bytes", "GPU memory (0 on CPU)",
        ),
        Panel(
            "Tokens per tenant",
            (Query(f"sum by (tenant) (rate(splitserve_generation_tokens_total{RATE}))", "{{tenant}} out"),
             Query(f"sum by (tenant) (rate(splitserve_prompt_tokens_total{RATE}))", "{{tenant}} prompt")),
        ),
        Panel(
            "Compute per tenant",
            (Query(f"sum by (tenant, role) (rate(splitserve_compute_seconds_total{RATE}))", "{{tenant}} {{role}}"),), "short",
            "worker-seconds per second charged to each tenant",
        ),
        Panel(
            "Cost per tenant, last hour",
            (Query("sum by (tenant) (increase(splitserve_compute_cost_total[1h]))", "{{tenant}}"),), "short",
            "needs price_per_accelerator_hour in the server config",
        ),
    ]


def alerts(slo: SLOTargets | None = None) -> list[Alert]:
    slo = slo or SLOTargets()
    return [
        Alert(
            "SplitserveSLOAttainmentLow", ATTAINMENT.replace(RATE, "[5m]"), "< 0.9", "10m", "page",
            f"fewer than 90% of requests meet TTFT <= {slo.ttft_s:g} s and TPOT <= {slo.tpot_s:g} s",
        ),
        Alert("SplitserveWorkerUnhealthy", "min by (worker, role) (splitserve_worker_healthy)", "== 0", "2m", "page",
              "worker {{ $labels.worker }} ({{ $labels.role }}) has not reported its load"),
        Alert("SplitserveDegraded", "max(splitserve_degraded)", "== 1", "2m", "page",
              "a role is down: the other one serves whole requests"),
        Alert(
            "SplitserveKVPoolNearlyFull",
            "max by (worker) (splitserve_kv_blocks_used) / max by (worker) (splitserve_kv_blocks_total)", "> 0.9", "10m", "warn",
            "worker {{ $labels.worker }} has used over 90% of its KV blocks for 10 minutes",
        ),
        Alert("SplitserveImbalance", 'max by (role) (splitserve_worker_imbalance{measure="requests"})', "> 2", "15m", "warn",
              "one {{ $labels.role }} worker takes over twice its share of requests"),
        Alert(
            "SplitserveTransferFailures", 'sum(rate(splitserve_request_retries_total{reason="prefill_failed"}[5m]))', "> 0.05", "5m",
            "warn", "prefills or their KV transfers are failing (requests retried)",
        ),
        Alert(
            "SplitserveErrors",
            'sum(rate(splitserve_requests_total{status=~"error|timeout"}[5m])) / clamp_min(sum(rate(splitserve_requests_total[5m])), 1e-9)',
            "> 0.01", "5m", "page", "over 1% of requests fail or time out",
        ),
    ]


def dashboard_json(panel_list: list[Panel] | None = None) -> dict:
    """A Grafana dashboard (schema 39): two panels a row, a data-source input chosen at import."""
    ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    out = []
    for i, p in enumerate(panel_list or panels()):
        out.append({
            "id": i + 1, "type": "timeseries", "title": p.title, "description": p.description, "datasource": ds,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + j), "expr": q.expr, "legendFormat": q.legend, "datasource": ds} for j, q in enumerate(p.queries)],
        })
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource", "pluginId": "prometheus"}],
        "title": "splitserve", "uid": "splitserve", "tags": ["splitserve", "llm"], "schemaVersion": 39, "version": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "panels": out,
    }


def alert_rules(alert_list: list[Alert] | None = None) -> dict:
    return {"groups": [{"name": "splitserve", "rules": [
        {"alert": a.name, "expr": a.expr, "for": a.for_, "labels": {"severity": a.severity}, "annotations": {"summary": a.summary}}
        for a in (alert_list or alerts())
    ]}]}


def scrape_config(target: str = "127.0.0.1:8000", interval: str = "15s") -> dict:
    """Prometheus config scraping one server's /metrics (through the Serve HTTP proxy) and loading the alerts."""
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": ["splitserve-alerts.yml"],
        "scrape_configs": [{"job_name": "splitserve", "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}],
    }


def write_all(out_dir: str | Path, slo: SLOTargets | None = None) -> list[Path]:
    """Write the dashboard, the alert rules and a scrape config under ``out_dir``; returns the paths."""
    root = Path(out_dir)
    files = {
        root / "grafana" / "splitserve.json": json.dumps(dashboard_json(), indent=2) + "\n",
        root / "prometheus" / "splitserve-alerts.yml": yaml.safe_dump(alert_rules(alerts(slo)), sort_keys=False, width=200),
        root / "prometheus" / "prometheus.yml": yaml.safe_dump(scrape_config(), sort_keys=False),
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)
