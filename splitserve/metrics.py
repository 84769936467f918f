"""Prometheus metrics of the ingress, in one ``splitserve_`` family.

Request-level numbers (TTFT, inter-token latency, status, tokens per tenant, KV
transfer bytes and seconds) are observed where requests pass; per-worker numbers
(queue depth, KV blocks in use, requests served) are copied from the workers'
load reports at scrape time, so imbalance between workers is visible. Each
ingress owns a registry of its own (several apps may share a process in tests).

Tenant labels come from clients, so they are bounded twice: the edge refuses a
tenant that does not match ``TENANT_PATTERN`` (printable, at most 64 characters;
a lone surrogate once made every later scrape fail to encode), and
``tenant_label`` maps tenants beyond the first ``max_tenants`` seen to
``"other"``, so /metrics cannot grow without bound.
"""

from __future__ import annotations

import re
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from splitserve.scheduler.types import Fallback

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0)


TENANT_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
DEFAULT_TENANT = "default"  # requests that name no tenant
OTHER_TENANT = "other"  # tenants past the cardinality cap
_TENANT_RE = re.compile(TENANT_PATTERN)


RETRY_REASONS = ("prefill_failed", "decode_busy", "reserve_failed", "decode_failed")
REQUEST_STATUSES = ("ok", "error", "timeout", "cancelled", "rejected")
ROLES = ("prefill", "decode", "both")


class Metrics:
    def __init__(self, max_tenants: int = 100, price_per_accelerator_hour: float | None = None) -> None:
        self.max_tenants = max_tenants
        self.price_per_accelerator_hour = price_per_accelerator_hour
        self._tenants: set[str] = set()
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("splitserve_time_to_first_token_seconds", "Time to first token", ["mode"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("splitserve_inter_token_latency_seconds", "Time between streamed tokens", ["mode"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("splitserve_e2e_request_latency_seconds", "Whole request latency", ["mode"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("splitserve_requests", "Requests by final status", ["status", "tenant"], registry=r)
        self.prompt_tokens = Counter("splitserve_prompt_tokens", "Prompt tokens", ["tenant"], registry=r)
        self.generation_tokens = Counter("splitserve_generation_tokens", "Generated tokens", ["tenant"], registry=r)
        self.routed = Counter("splitserve_requests_routed", "Requests sent to each worker", ["worker", "role"], registry=r)
        self.retries = Counter("splitserve_request_retries", "Retried attempts by reason", ["reason"], registry=r)
        self.transfer_bytes = Counter("splitserve_kv_transfer_bytes", "KV bytes moved prefill -> decode", registry=r)
        self.transfer_seconds = Histogram("splitserve_kv_transfer_seconds", "Duration of one KV transfer", buckets=LATENCY_BUCKETS, registry=r)
        self.prefix_cached_tokens = Counter("splitserve_prefix_cache_hit_tokens", "Prompt tokens served from a prefix cache", registry=r)
        self.response_cache = Counter(
            "splitserve_response_cache_lookups", "Deterministic requests looked up in the response cache, by result (hit, miss)",
            ["result"], registry=r,
        )
        self.response_cache_entries = Gauge("splitserve_response_cache_entries", "Answers held in the response cache", registry=r)
        self.queue_depth = Gauge("splitserve_queue_depth", "Requests waiting in a worker", ["role", "worker"], registry=r)
        self.running = Gauge("splitserve_running_requests", "Sequences running in a worker", ["role", "worker"], registry=r)
        self.kv_blocks_used = Gauge("splitserve_kv_blocks_used", "KV blocks referenced in a worker", ["worker"], registry=r)
        self.kv_blocks_total = Gauge("splitserve_kv_blocks_total", "KV blocks in a worker's pool", ["worker"], registry=r)
        self.worker_requests = Gauge("splitserve_worker_requests", "Requests a worker has received since it started", ["role", "worker"], registry=r)
        self.worker_healthy = Gauge("splitserve_worker_healthy", "1 when the worker's last load report is fresh", ["role", "worker"], registry=r)
        self.fallbacks = Counter(
            "splitserve_fallbacks", "Departures from the normal path by reason (local prefill, degraded mode, retries, migrations)",
            ["reason"], registry=r,
        )
        self.migrations = Counter("splitserve_migrations", "Streams resumed on another worker after theirs died", registry=r)
        self.cleanup_failures = Counter(
            "splitserve_cleanup_failures", "Release/abort calls that did not complete (the worker's reaper frees them)", ["call"], registry=r,
        )
        self.degraded = Gauge("splitserve_degraded", "1 while a role is down and the other serves whole requests", registry=r)
        self.replicas = Gauge("splitserve_replicas", "Live worker replicas per role", ["role"], registry=r)
        self.planner_desired = Gauge("splitserve_planner_desired_replicas", "Replicas the SLA planner last asked for", ["role"], registry=r)
        self.planner_decisions = Counter(
            "splitserve_planner_decisions", "SLA planner decisions seen by this ingress, by role and action (up, down, hold)",
            ["role", "action"], registry=r,
        )
        self.imbalance = Gauge(
            "splitserve_worker_imbalance", "max/mean over a role's workers of in-flight requests, or of requests started in "
            "the last 60 s (1 = even)", ["role", "measure"], registry=r,
        )
        self.compute_seconds = Counter(
            "splitserve_compute_seconds", "Worker engine time charged to each tenant's requests (a prefill's steps; its share "
            "of every batched step)", ["tenant", "role"], registry=r,
        )
        self.compute_cost = Counter(
            "splitserve_compute_cost", "compute_seconds priced at http.price_per_accelerator_hour (a worker replica counts as one "
            "accelerator)", ["tenant", "role"], registry=r,
        )
        self.busy_seconds = Gauge(
            "splitserve_worker_busy_seconds", "Engine step time since the worker started (grows like a counter)", ["role", "worker"],
            registry=r,
        )
        self.busy_fraction = Gauge("splitserve_worker_busy_fraction", "Engine step time over wall time, recent window", ["role", "worker"], registry=r)
        self.accelerator_memory = Gauge(
            "splitserve_worker_accelerator_memory_bytes", "GPU memory allocated by the worker (0 on CPU)", ["role", "worker"], registry=r,
        )
        self.slo_met = Counter(
            "splitserve_slo_met_requests", "Requests that finished within the configured SLOs (TTFT and time per output token)",
            ["mode"], registry=r,
        )
        self.worker_tokens = Gauge(
            "splitserve_worker_tokens", "Tokens a worker's engine computed since it started (prompt and generated; grows like a counter)",
            ["role", "worker"], registry=r,
        )
        self._worker_labels: set[tuple[str, str]] = set()
        self._planner_seen: dict[str, float] = {}

    def tenant_label(self, tenant: str | None) -> str:
        """The label a request's tenant is counted under: itself while fewer than ``max_tenants`` are known, else "other".

        The edge validates tenants; anything that still does not match the
        pattern (a caller that skipped the edge) is counted as "other" too.
        """
        if tenant is None:
            return DEFAULT_TENANT
        if tenant in self._tenants:
            return tenant
        if len(self._tenants) >= self.max_tenants or not _TENANT_RE.fullmatch(tenant):
            return OTHER_TENANT
        self._tenants.add(tenant)
        return tenant

    def start_series(self, mode: str) -> None:
        """Create the label sets dashboards and alerts query, at 0, so a quiet server answers them with zeros."""
        for reason in RETRY_REASONS:
            self.retries.labels(reason)
        for reason in Fallback:
            self.fallbacks.labels(reason.value)
        for status in REQUEST_STATUSES:
            self.requests.labels(status, DEFAULT_TENANT)
        for role in ROLES:
            self.replicas.labels(role)
        self.slo_met.labels(mode)

    def charge_compute(self, tenant: str | None, role: str, seconds: float) -> None:
        """Add a request's engine time on one worker to its tenant (and its cost, when a price is configured)."""
        if seconds <= 0:
            return
        label = self.tenant_label(tenant)
        self.compute_seconds.labels(label, role).inc(seconds)
        if self.price_per_accelerator_hour is not None:
            self.compute_cost.labels(label, role).inc(seconds * self.price_per_accelerator_hour / 3600)

    def update_workers(self, reports: list[dict[str, Any]], healthy: set[str]) -> None:
        """Copy the workers' latest reports into the per-worker gauges; drop the series of workers that left."""
        current = {(rep["role"], rep["worker_id"]) for rep in reports}
        for role, w in self._worker_labels - current:
            for gauge in self._per_worker_role_gauges:
                gauge.remove(role, w)
            for gauge in (self.kv_blocks_used, self.kv_blocks_total):
                gauge.remove(w)
        self._worker_labels = current
        for role in ROLES:
            self.replicas.labels(role).set(sum(1 for r, _ in current if r == role))
        for rep in reports:
            w, role = rep["worker_id"], rep["role"]
            self.queue_depth.labels(role, w).set(rep["num_waiting"])
            self.running.labels(role, w).set(rep["num_running"])
            self.kv_blocks_used.labels(w).set(rep["num_total_blocks"] - rep["num_free_blocks"])
            self.kv_blocks_total.labels(w).set(rep["num_total_blocks"])
            self.worker_requests.labels(role, w).set(rep["num_requests"])
            self.worker_healthy.labels(role, w).set(1.0 if w in healthy else 0.0)
            self.busy_seconds.labels(role, w).set(rep.get("busy_s", 0.0))
            self.busy_fraction.labels(role, w).set(rep.get("busy_fraction", 0.0))
            self.accelerator_memory.labels(role, w).set(rep.get("accelerator_memory_bytes", 0))
            self.worker_tokens.labels(role, w).set(rep.get("num_tokens", 0))

    @property
    def _per_worker_role_gauges(self) -> tuple[Gauge, ...]:
        return (
            self.queue_depth, self.running, self.worker_requests, self.worker_healthy, self.busy_seconds, self.busy_fraction,
            self.accelerator_memory, self.worker_tokens,
        )

    def update_spread(self, summary: dict[str, dict[str, Any]]) -> None:
        """Per-role imbalance from ``scheduler.spread.SpreadTracker.summary``."""
        for role, v in summary.items():
            for measure, value in v["imbalance"].items():
                self.imbalance.labels(role, measure).set(value)

    def update_planner(self, decisions: dict[str, dict[str, Any]]) -> None:
        """The SLA planner's last decision per role (``planner_policy.read_decisions``); each new one counted once."""
        for role, d in decisions.items():
            self.planner_desired.labels(role).set(d["desired"])
            if self._planner_seen.get(role) != d["time"]:
                self._planner_seen[role] = d["time"]
                action = "up" if d["desired"] > d["current"] else "down" if d["desired"] < d["current"] else "hold"
                self.planner_decisions.labels(role, action).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
