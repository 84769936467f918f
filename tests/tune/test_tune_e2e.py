"""``splitserve tune`` end to end on the tiny model: a private local Ray, two splits x two rates, CSV + plots + best split.

It runs as a subprocess so its Ray (``ray.init(address="local")``, shut down when
the sweep ends) never meets the session-wide Ray of the other end-to-end tests.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys

import pytest

from splitserve.tune.profile import save_profile
from tests.tune.factories import make_profiles

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tune_writes_csv_plots_and_names_the_best_split(tiny_model, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "tune"
    profile = save_profile(make_profiles(), tmp_path / "profile.json")
    cmd = [sys.executable, "-m", "splitserve.cli", "tune", "--model", tiny_model, "--workload", "chat", "--prompt-len", "normal:48,8,32,64",
           "--output-len", "6", "--rates", "1,2", "--num-requests", "6", "--units", "2", "--splits", "agg1,1P1D",
           "--ttft-slo", "5", "--itl-slo", "1", "--out", str(out), "--port", str(_free_port()), "--profile", str(profile),
           "--num-kv-blocks", "256", "--ready-timeout", "150", "--request-timeout", "60"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "best split: " in proc.stdout and "| split | rate | goodput" in proc.stdout
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["split"], float(r["rate"])) for r in rows] == [("agg1", 1.0), ("agg1", 2.0), ("1P1D", 1.0), ("1P1D", 2.0)]
    for r in rows:
        assert int(r["completed"]) == 6 and float(r["goodput"]) > 0 and float(r["ttft_p50"]) > 0 and r["sim_goodput"] != ""
    for name in ("goodput.png", "latency.png", "requests.csv", "summary.md"):
        assert (out / name).stat().st_size > 0, name
