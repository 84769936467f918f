"""A three-node Ray cluster on this machine, with splitserve and its SLA planner on it (run as a script).

``python -m tests.deploy.multi_node --model DIR --out result.json`` starts a Ray
cluster of three nodes with ``ray.cluster_utils.Cluster`` (a head with
``head_node``, a prefill node with ``prefill_node: 2``, a decode node with
``decode_node: 1``; every node its own raylet and object store, as on separate
machines), deploys a disaggregated app whose prefill role is a 1..2 range under
the SLA planner and whose decode role is one replica, and drives it:

1. one greedy request (its tokens are checked by the test against the offline engine);
2. a load step (``step_rate`` req/s) above one prefill replica's capacity on the
   profile, then a trickle (``trickle_rate``) below it, until the planner has
   scaled prefill up to two replicas and back down to one; every third request
   is a stream whose client hangs up after three events;
3. at the end, the decode worker's KV pool must be whole again.

Everything it saw goes into the JSON file (the test asserts on it): where each
replica ran, every request's status, the prefill replica count over time, the
planner's decisions, the new replica's cold-start phases and the workers' final
reports. It runs in a process of its own because a process can hold one Ray
driver, and the test session has its own local Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from splitserve.tune.curves import DecodeProfile, PrefillProfile, Profiles, TransferProfile

PROMPT = "The history of the river valley is long, and the towns along it grew from"
# One prefill replica keeps TTFT under 2 s up to ~1.7 req/s on this profile (0.5 s per prompt, M/D/1).
PROFILE = Profiles(
    PrefillProfile(a_s=0.5, b_s_per_token=0.0), DecodeProfile(a_s=0.01, b_s_per_seq=0.0, c_s_per_ctx_token=0.0),
    TransferProfile(bytes_per_token=1.0, bandwidth_bytes_per_s=1e12), meta={"note": "synthetic, for the multi-node test"},
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Traffic:
    """Open-loop completions at a settable rate from a thread, every third a stream whose client hangs up; every
    outcome recorded."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.rate = 0.0
        self.results: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _one(self, i: int) -> None:
        t0 = time.time()
        try:
            status, detail = self._hang_up(i) if i % 3 == 2 else self._complete(i)
        except httpx.HTTPError as e:
            status, detail = -1, repr(e)[:300]
        with self._lock:
            self.results.append({"i": i, "start": t0, "status": status, "seconds": time.time() - t0, "detail": detail})

    def _complete(self, i: int) -> tuple[int, str]:
        r = httpx.post(f"{self.url}/v1/completions", timeout=120, json={
            "model": self.model, "prompt": f"{i}: {PROMPT}", "max_tokens": 8, "temperature": 0})
        return r.status_code, (r.text[:300] if r.status_code != 200 else "")

    def _hang_up(self, i: int) -> tuple[int, str]:
        """A stream of 64 tokens whose client leaves after the third event (its KV must be freed on the decode node)."""
        body = {"model": self.model, "prompt": f"{i}: {PROMPT}", "max_tokens": 64, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{self.url}/v1/completions", timeout=120, json=body) as r:
            if r.status_code != 200:
                return r.status_code, r.read().decode()[:300]
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data:")
                if events == 3:
                    return 200, ""
        return -1, f"the stream ended after {events} events"

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            if self.rate <= 0:
                time.sleep(0.05)
                continue
            t = threading.Thread(target=self._one, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
            i += 1
            time.sleep(1.0 / self.rate)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=150)


def placement(report: dict[str, Any]) -> dict[str, str]:
    """worker id -> the Ray node it runs on (each worker asks Ray's runtime context)."""
    return {w["worker_id"]: w["node_id"] for w in report["workers"]}


def admin(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/admin/workers", timeout=10).json()


def wait_until(what: str, predicate, timeout_s: float, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _ray_default_temp_dir() -> str:
    try:
        from ray._common.utils import get_default_ray_temp_dir
    except ImportError:  # Ray before 2.47
        from ray._private.utils import get_ray_temp_dir as get_default_ray_temp_dir
    return get_default_ray_temp_dir()


def run(model: str, workdir: Path, step_rate: float, trickle_rate: float) -> dict[str, Any]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from splitserve.app import build_app
    from splitserve.config import ServeConfig

    out: dict[str, Any] = {"events": []}
    t_start = time.monotonic()

    def event(name: str, **kw: Any) -> None:
        out["events"].append({"t": round(time.monotonic() - t_start, 2), "event": name, **kw})
        print(f"[{time.monotonic() - t_start:6.1f} s] {name} {kw if kw else ''}", flush=True)

    profile_path = workdir / "profile.json"
    profile_path.write_text(json.dumps(PROFILE.to_dict()))
    # Cluster writes the head's address to ray_current_cluster in Ray's default temp dir without creating the
    # directory, which does not exist yet on a machine where Ray never ran (a fresh CI machine)
    os.makedirs(_ray_default_temp_dir(), exist_ok=True)
    node = {"node_ip_address": "127.0.0.1", "include_dashboard": False, "object_store_memory": 100 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={
        **node, "num_cpus": 2, "resources": {"head_node": 1}, "temp_dir": tempfile.mkdtemp(prefix="ssmn-"),
        "gcs_server_port": free_port()})
    nodes = {
        "prefill": cluster.add_node(**node, num_cpus=2, resources={"prefill_node": 2}),
        "decode": cluster.add_node(**node, num_cpus=2, resources={"decode_node": 1}),
    }
    cluster.wait_for_nodes()
    event("cluster up", nodes=3)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    node_ids = {role: n.node_id for role, n in nodes.items()}
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        cfg = ServeConfig.model_validate({
            "mode": "disaggregated", "app_name": "mn", "num_prefill": {"min": 1, "max": 2}, "num_decode": 1,
            "planner": {"ttft_slo_s": 2.0, "itl_slo_s": 0.5, "profile": str(profile_path), "interval_s": 1.0,
                        "predictor": "constant", "scale_down_headroom": 0.2},
            "drain_timeout_s": 30.0,
            "routing": {"local_prefill_budget_s": 0.0},  # every prompt through a prefill replica and NIXL (the tiny model's would stay local)
            "engine": {"model": model, "dtype": "float32", "num_kv_blocks": 256},
            "prefill_resources": {"num_cpus": 0.5, "resources": {"prefill_node": 1}},
            "decode_resources": {"num_cpus": 0.5, "resources": {"decode_node": 1}},
        })
        serve.run(build_app(cfg), name="mn", route_prefix="/mn")
        url = f"http://127.0.0.1:{port}/mn"
        wait_until("health ok", lambda: httpx.get(f"{url}/health", timeout=5).json().get("status") == "ok", 300)
        event("serving")
        served = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]

        r = httpx.post(f"{url}/v1/completions", timeout=60, json={"model": served, "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
        out["greedy"] = {"status": r.status_code, "text": r.json()["choices"][0]["text"] if r.status_code == 200 else r.text}

        out["placement"] = placement(admin(url))
        out["node_ids"] = node_ids

        traffic = Traffic(url, served)
        traffic.start()
        traffic.rate = step_rate
        event("load step", rate=step_rate)
        timeline: list[tuple[float, int]] = []
        decisions: list[dict[str, Any]] = []

        def prefill_count() -> int:
            report = admin(url)
            n = sum(1 for w in report["workers"] if w["role"] == "prefill" and w["healthy"])
            timeline.append((round(time.monotonic() - t_start, 2), n))
            decision = report.get("planner", {}).get("prefill")
            if decision and (not decisions or decision["time"] != decisions[-1]["time"]) and decision["reason"] != "hold":
                decisions.append({**decision, "t": timeline[-1][0]})
            return n

        wait_until("two prefill replicas", lambda: prefill_count() == 2, 120)
        event("scaled up")
        time.sleep(4)  # the new replica takes work
        out["scaled_up"] = admin(url)
        out["placement"].update(placement(out["scaled_up"]))
        traffic.rate = trickle_rate
        event("trickle", rate=trickle_rate)
        wait_until("back to one prefill replica", lambda: prefill_count() == 1, 120)
        event("scaled down")
        time.sleep(3)  # a few more requests through the remaining replica
        traffic.stop()
        event("load stopped", requests=len(traffic.results))
        out["requests"] = traffic.results
        out["prefill_replicas_over_time"] = timeline
        out["planner_decisions"] = decisions
        report = wait_until("the decode pool whole again", lambda: _pool_whole(admin(url)), 60)
        out["final"] = report
        out["planner"] = report.get("planner", {})
        return out
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


def _pool_whole(report: dict[str, Any]) -> dict[str, Any] | None:
    decode = [w for w in report["workers"] if w["role"] == "decode"]
    if decode and all(w["num_free_blocks"] == w["num_total_blocks"] and w["num_running"] == 0 for w in decode):
        return report
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--step-rate", type=float, default=4.0)
    ap.add_argument("--trickle-rate", type=float, default=0.5)
    args = ap.parse_args()
    from splitserve.serve_cli import LOCAL_ENV, SERVE_ENV  # no Ray import: these must be set before Ray loads

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    for key, value in {**LOCAL_ENV, **SERVE_ENV}.items():  # every node on loopback, Serve as `splitserve serve` runs it
        os.environ.setdefault(key, value)
    with tempfile.TemporaryDirectory() as d:
        result = run(args.model, Path(d), args.step_rate, args.trickle_rate)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
