"""A real Ray head started with ``ray start --head`` for the deployment tests (see conftest.py).

Another test session may run its own local Ray on this machine at the same time, so the
head is kept apart from it:

- every port is explicit and free (GCS, dashboard, client server, raylet, object manager,
  dashboard agent, runtime-env agent, metrics); workers get OS-assigned ports;
- its own ``--temp-dir``, so ``ray_current_cluster`` is written there and a plain
  ``ray.init()`` elsewhere never attaches to this head;
- clients get the addresses explicitly (``--address`` and ``RAY_ADDRESS``);
- teardown never runs ``ray stop`` (it kills every Ray process on the machine, the other
  session's too): it stops this head's ``ray start --block`` process with SIGTERM (Ray
  drains the node and stops its own children), then SIGKILLs, by pid, whatever of this
  head's process tree is still alive.

Ray 2.60 turns token authentication on for ``ray start`` when ``~/.ray/auth_token`` exists,
while the ``ray job`` / ``serve`` CLIs only send a token when ``RAY_AUTH_MODE=token``: the
head and its clients run with ``RAY_AUTH_MODE=disabled`` (the dashboard listens on
127.0.0.1 only).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from splitserve.serve_cli import SERVE_ENV

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The head offers the custom resources of ray_cluster.yaml's node types, so configs that
# target them place here too.
HEAD_RESOURCES = {"prefill_node": 8, "decode_node": 8, "head_node": 1}


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, cmdline) for every process we can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        table[pid] = (ppid, cmd)
    return table


@dataclass
class RayHead:
    proc: subprocess.Popen
    temp_dir: str
    gcs_port: int
    dashboard_port: int
    http_port: int
    env: dict[str, str]
    log_path: Path
    gcs_address: str = ""

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def cli(self, *args: str, timeout: float = 120.0, check: bool = False) -> subprocess.CompletedProcess:
        """Run ``ray`` / ``serve`` (from this venv) against this head; output captured."""
        exe, *rest = args
        cp = subprocess.run([str(BIN / exe), *rest], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if check and cp.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {cp.returncode}\nstdout:\n{cp.stdout[-4000:]}\nstderr:\n{cp.stderr[-4000:]}")
        return cp

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def _mine(self) -> set[tuple[int, str]]:
        """(pid, start time) of this head's processes: the ``ray start`` tree plus anything
        naming this head's temp dir or GCS port (processes re-parented after a crash)."""
        table = _process_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        found, stack = set(), [self.proc.pid]
        while stack:
            pid = stack.pop()
            if pid in found:
                continue
            found.add(pid)
            stack.extend(children.get(pid, []))
        markers = (self.temp_dir, f":{self.gcs_port} ", f":{self.gcs_port}\n")
        for pid, (_, cmd) in table.items():
            if any(m in cmd + "\n" for m in markers) and pid != os.getpid():
                found.add(pid)
        return {(pid, st) for pid in found if (st := _proc_start_time(pid)) is not None}

    def stop(self) -> None:
        mine = self._mine()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # Ray drains the node, then stops its children
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_proc_start_time(p) == st for p, st in mine):
            time.sleep(0.5)
        for pid, st in mine:
            if _proc_start_time(pid) == st:  # still the same process: kill it by pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return None


def start_head(startup_timeout_s: float = 240.0) -> RayHead:
    (gcs, dash, client, node_mgr, obj_mgr, agent_http, agent_grpc, rt_env, metrics, http) = free_ports(10)
    temp_dir = tempfile.mkdtemp(prefix="ssdep-", dir="/tmp")  # short: Ray puts unix sockets under it
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this venv's
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **SERVE_ENV,  # as ray_cluster.yaml starts its nodes
    })
    log_path = Path(temp_dir) / "ray_start.log"
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--port", str(gcs), "--ray-client-server-port", str(client),
        "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(rt_env), "--metrics-export-port", str(metrics),
        "--min-worker-port", "0", "--max-worker-port", "0",
        "--num-cpus", "4", "--num-gpus", "0", "--resources", json.dumps(HEAD_RESOURCES),
        "--object-store-memory", str(200 * 2**20), "--temp-dir", temp_dir,
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    head = RayHead(proc=proc, temp_dir=temp_dir, gcs_port=gcs, dashboard_port=dash, http_port=http, env=env, log_path=log_path)
    try:
        deadline = time.monotonic() + startup_timeout_s
        address_file = Path(temp_dir) / "ray_current_cluster"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}:\n{head.log_tail()}")
            if not head.gcs_address and address_file.is_file():
                head.gcs_address = address_file.read_text().strip()
            # the job API answering 200 means the dashboard head and its job module are up
            if head.gcs_address and _http_status(f"{head.dashboard_url}/api/jobs/") == 200:
                break
            time.sleep(1)
        else:
            raise TimeoutError(f"Ray head not ready within {startup_timeout_s:.0f} s:\n{head.log_tail()}")
        head.env["RAY_ADDRESS"] = head.gcs_address  # for any client that would otherwise look for a cluster
        return head
    except BaseException:
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise


def wait_http_ok(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _http_status(url) == 200:
            return
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s")
