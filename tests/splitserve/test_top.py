"""``splitserve top``'s screen from two hand-made snapshots: rates from counter changes, one line per worker."""

from __future__ import annotations

from splitserve.top import Snapshot, parse_samples, render

METRICS_BEFORE = """# TYPE splitserve_requests counter
splitserve_requests_total{status="ok",tenant="a"} 10
splitserve_requests_total{status="error",tenant="a"} 1
splitserve_generation_tokens_total{tenant="a"} 100
splitserve_slo_met_requests_total{mode="disaggregated"} 8
"""
METRICS_AFTER = """# TYPE splitserve_requests counter
splitserve_requests_total{status="ok",tenant="a"} 14
splitserve_requests_total{status="ok",tenant="b"} 4
splitserve_requests_total{status="error",tenant="a"} 3
splitserve_generation_tokens_total{tenant="a"} 500
splitserve_slo_met_requests_total{mode="disaggregated"} 14
"""


def _worker(wid: str, role: str, tokens: int, **kw) -> dict:
    return {"worker_id": wid, "role": role, "healthy": True, "num_running": 2, "num_waiting": 1, "num_total_blocks": 200,
            "num_free_blocks": 150, "busy_fraction": 0.42, "share": {"requests": 1.25}, "num_requests": 9, "num_tokens": tokens, **kw}


def test_rates_come_from_counter_changes_and_each_worker_has_a_line():
    before = Snapshot(100.0, {"workers": [_worker("decode-1", "decode", 1000)]}, parse_samples(METRICS_BEFORE))
    after = Snapshot(
        102.0, {"workers": [_worker("decode-1", "decode", 1600), _worker("decode-2", "decode", 50, healthy=False)],
                "imbalance": {"decode": {"in_flight": 1.0, "requests": 1.25}}},
        parse_samples(METRICS_AFTER),
    )
    first = render(before, None, "http://x")
    assert "requests/s -" in first and "decode-1" in first  # no rates without a previous read
    screen = render(after, before, "http://x")
    # (14 + 4 + 3) - (10 + 1) = 10 requests in 2 s; ok 8 in 2 s; errors 2 in 2 s; 6 within the SLOs; 400 tokens
    assert "requests/s 5.00  ok/s 4.00  failed/s 1.00  goodput/s 3.00  tokens out/s 200.0" in screen
    assert "decode 1.00/1.25" in screen and "replicas decode 2" in screen
    line1 = next(line for line in screen.splitlines() if line.startswith("decode-1"))
    assert line1.split()[1:] == ["decode", "yes", "2", "1", "25.0", "42.0", "1.25", "9", "300.0"]
    line2 = next(line for line in screen.splitlines() if line.startswith("decode-2"))
    assert line2.split()[2] == "NO" and line2.split()[-1] == "-"  # a new worker: no token rate yet
