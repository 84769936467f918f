"""``splitserve top``: a terminal view of a running server for the operator without Grafana.

Every ``interval`` seconds it reads ``/admin/workers`` and ``/metrics`` and redraws:
request, goodput and token rates (from the change in the counters since the last
read), replicas and imbalance per role, and one line per worker (health, running
and waiting sequences, KV blocks used, busy fraction, share of its role's
requests). ``render`` is pure (snapshots in, text out); ``run`` does the I/O.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def total(samples: Samples, name: str, **match: str) -> float:
    """The sum of ``name``'s samples whose labels include ``match``."""
    want = set(match.items())
    return sum(v for (n, labels), v in samples.items() if n == name and want <= labels)


@dataclass(slots=True)
class Snapshot:
    time: float
    admin: dict
    samples: Samples


def _rate(now: Snapshot, before: Snapshot | None, name: str, **match: str) -> float | None:
    if before is None or now.time <= before.time:
        return None
    return max(0.0, total(now.samples, name, **match) - total(before.samples, name, **match)) / (now.time - before.time)


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def render(now: Snapshot, before: Snapshot | None, url: str) -> str:
    """The screen for one refresh; rates need the previous snapshot ("-" on the first)."""
    workers = now.admin.get("workers", [])
    roles = sorted({w["role"] for w in workers})
    lines = [
        f"splitserve top  {url}  {time.strftime('%H:%M:%S', time.localtime(now.time))}",
        "requests/s {}  ok/s {}  failed/s {}  goodput/s {}  tokens out/s {}".format(
            _fmt(_rate(now, before, "splitserve_requests_total")),
            _fmt(_rate(now, before, "splitserve_requests_total", status="ok")),
            _fmt(sum(_rate(now, before, "splitserve_requests_total", status=s) or 0.0 for s in ("error", "timeout")) if before else None),
            _fmt(_rate(now, before, "splitserve_slo_met_requests_total")),
            _fmt(_rate(now, before, "splitserve_generation_tokens_total"), ".1f"),
        ),
        "replicas " + "  ".join(f"{r} {sum(1 for w in workers if w['role'] == r)}" for r in roles)
        + "   imbalance " + "  ".join(
            f"{r} {v.get('in_flight', 1.0):.2f}/{v.get('requests', 1.0):.2f}" for r, v in sorted(now.admin.get("imbalance", {}).items())
        ) + " (in flight/requests, max/mean)",
        "",
        f"{'WORKER':<34} {'ROLE':<8} {'OK':<3} {'RUN':>4} {'WAIT':>4} {'KV%':>5} {'BUSY%':>6} {'SHARE':>6} {'REQS':>7} {'TOK/S':>8}",
    ]
    prev = {w["worker_id"]: w for w in (before.admin.get("workers", []) if before else [])}
    for w in workers:
        kv = 100.0 * (w["num_total_blocks"] - w["num_free_blocks"]) / max(1, w["num_total_blocks"])
        share = (w.get("share") or {}).get("requests")
        old = prev.get(w["worker_id"])
        tok_rate = None
        if old is not None and before is not None and now.time > before.time:
            tok_rate = max(0, w.get("num_tokens", 0) - old.get("num_tokens", 0)) / (now.time - before.time)
        lines.append(
            f"{w['worker_id'][:34]:<34} {w['role']:<8} {'yes' if w.get('healthy') else 'NO':<3} {w['num_running']:>4} "
            f"{w['num_waiting']:>4} {kv:>5.1f} {100.0 * w.get('busy_fraction', 0.0):>6.1f} {_fmt(share):>6} "
            f"{w.get('num_requests', 0):>7} {_fmt(tok_rate, '.1f'):>8}"
        )
    if not workers:
        lines.append("(no workers reported yet)")
    return "\n".join(lines)


def snapshot(client: httpx.Client) -> Snapshot:
    admin = client.get("/admin/workers")
    admin.raise_for_status()
    metrics = client.get("/metrics")
    metrics.raise_for_status()
    return Snapshot(time.time(), admin.json(), parse_samples(metrics.text))


def run(url: str, api_key: str | None = None, interval_s: float = 2.0, iterations: int | None = None,
        write: Callable[[str], None] | None = None) -> int:
    """Redraw every ``interval_s`` until interrupted (or ``iterations`` times; the screen is cleared only on a TTY)."""
    write = write or sys.stdout.write
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    before = None
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        n = 0
        while iterations is None or n < iterations:
            if n:
                time.sleep(interval_s)
            now = snapshot(client)
            write(clear + render(now, before, url) + "\n")
            before = now
            n += 1
    return 0
