"""The load generator against a fake SSE server, the CSV / plot writers, and the two CLI sub-commands (no Ray)."""

from __future__ import annotations

import asyncio
import csv
import json

import httpx
import pytest

from splitserve.cli import build_parser, main
from splitserve.tune.loadgen import make_prompts, run_load_async
from splitserve.tune.planner import Row
from splitserve.tune.report import format_table, plot_goodput, plot_latency, write_requests_csv, write_results_csv
from splitserve.tune.workload import SLO, RequestSpec, record_from_token_times, summarize
from tests.tune.factories import make_profiles

pytestmark = pytest.mark.unit


def sse(*events) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def chunk(token_ids: list[int], text: str = "x") -> dict:
    return {"choices": [{"index": 0, "text": text, "token_ids": token_ids, "finish_reason": None}]}


def fake_server(seen: list[dict]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        n = body["max_tokens"]
        if n == 7:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        if n == 5:  # stops short
            return httpx.Response(200, content=sse(chunk([1]), chunk([2]), "[DONE]"))
        if n == 6:
            return httpx.Response(200, content=sse(chunk([1]), {"error": {"message": "worker died"}}, "[DONE]"))
        # the first token alone, then the rest two per chunk, and a text-only chunk in between
        events = [chunk([1])] + [chunk(list(range(i, min(i + 2, n))) or [0]) for i in range(1, n, 2)]
        return httpx.Response(200, content=sse(events[0], chunk([], text="held"), *events[1:], "[DONE]"))

    return httpx.MockTransport(handler)


def test_loadgen_counts_every_token_and_records_failures():
    specs = [RequestSpec(0, 0.0, 12, 4), RequestSpec(1, 0.01, 3, 5), RequestSpec(2, 0.02, 3, 6), RequestSpec(3, 0.03, 3, 7)]
    seen: list[dict] = []
    prompts = make_prompts(specs, vocab_size=100, seed=1)
    recs = asyncio.run(run_load_async("http://fake", "m", specs, prompts, request_timeout_s=5, transport=fake_server(seen)))
    assert [len(b["prompt"]) for b in sorted(seen, key=lambda b: b["max_tokens"])] == [12, 3, 3, 3]
    assert all(b["stream"] and b["ignore_eos"] and b["return_token_ids"] and b["model"] == "m" for b in seen)
    assert recs[0].completed and recs[0].num_output_tokens == 4 and recs[0].ttft_s >= 0
    assert "2 of 5" in recs[1].error and "worker died" in recs[2].error and "HTTP 503" in recs[3].error
    assert not any(r.completed for r in recs[1:])
    assert make_prompts(specs, 100, 1) == prompts and make_prompts(specs, 100, 2) != prompts
    assert all(5 <= t < 100 for p in prompts for t in p)


def _rows() -> tuple[list[Row], dict]:
    slo = SLO(1.0, 0.1)
    recs = {}
    rows = []
    for split, slow in (("1P1D", 0.0), ("agg2", 0.5)):
        for rate in (1.0, 2.0):
            rs = [record_from_token_times(RequestSpec(i, i / rate, 10, 3), [i / rate + 0.2 + slow * i, i / rate + 0.25 + slow * i,
                                                                           i / rate + 0.3 + slow * i]) for i in range(4)]
            recs[(split, rate)] = rs
            rows.append(Row(split, rate, summarize(rs, slo)))
    return rows, recs


def test_results_csv_table_and_plots(tmp_path):
    rows, recs = _rows()
    slo = SLO(1.0, 0.1)
    path = write_results_csv(rows, tmp_path / "results.csv", {("1P1D", 1.0): {"sim_goodput": 0.9}})
    table = list(csv.DictReader(open(path)))
    assert len(table) == 4 and table[0]["split"] == "1P1D" and float(table[0]["goodput"]) > 0
    assert {"ttft_p50", "ttft_p90", "ttft_p99", "itl_p50", "itl_p90", "itl_p99", "completed", "sim_goodput"} <= set(table[0])
    assert table[0]["sim_goodput"] == "0.9" and table[1]["sim_goodput"] == ""
    write_requests_csv(recs, slo, tmp_path / "requests.csv")
    assert len(list(csv.DictReader(open(tmp_path / "requests.csv")))) == 16
    text = format_table(rows, {(r.split, r.rate): r.summary.goodput * 1.1 for r in rows})
    assert "sim err %" in text and "+10" in text
    pytest.importorskip("matplotlib")
    plot_goodput(rows, tmp_path / "goodput.png", "t", {("1P1D", 1.0): 0.5})
    plot_latency(rows, slo, tmp_path / "latency.png", "t")
    assert (tmp_path / "goodput.png").stat().st_size > 1000 and (tmp_path / "latency.png").stat().st_size > 1000


def test_cli_registers_tune_and_simulate():
    parser = build_parser()
    args = parser.parse_args(["tune", "--rates", "0.5,1", "--units", "3", "--splits", "1P2D,agg3", "--workload", "chat"])
    assert args.rates == [0.5, 1.0] and args.units == 3 and args.ttft_slo == 2.0 and args.itl_slo == 0.2
    args = parser.parse_args(["simulate", "--units", "8,16"])
    assert args.units == [8, 16] and args.profile == "h200:llama-3-8b"
    with pytest.raises(SystemExit):
        parser.parse_args(["tune", "--rates", "0,-1"])


def test_simulate_command_prints_the_best_split(tmp_path, capsys):
    from splitserve.tune.profile import save_profile

    prof = save_profile(make_profiles(), tmp_path / "p.json")
    rc = main(["simulate", "--profile", str(prof), "--units", "2,3", "--workload", "chat", "--prompt-len", "200",
               "--output-len", "20", "--num-requests", "60", "--ttft-slo", "1", "--itl-slo", "0.1", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0 and "best:" in out and "recommendation:" in out and "profile:" in out
    assert (tmp_path / "o" / "simulate.csv").is_file()
    assert main(["simulate", "--profile", "tpu:llama", "--units", "2"]) == 2
    assert "neither a file nor" in capsys.readouterr().err
