"""Safe defaults of a local ``splitserve serve`` (issue 9, finding 8): internals on loopback, the key out of `ps`.

The Ray test starts a real local Ray the way ``splitserve serve`` does, in a
child process, and lists the listening sockets of that process tree with
``ss``; the NIXL test moves KV bytes between two agents under the same
environment and checks where UCX listens.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from splitserve.serve_cli import LOCAL_ENV, add_serve_parser, config_from_args


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


@pytest.mark.unit
def test_api_key_file_keeps_the_key_out_of_the_command_line_and_the_config(tmp_path, monkeypatch):
    monkeypatch.delenv("SPLITSERVE_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    cfg = config_from_args(_args("--api-key-file", str(key_file)))
    assert cfg.http.api_key is None and "s3cret" not in json.dumps(cfg.model_dump())  # never in the deployment's args
    assert cfg.http.resolved_api_key() == "s3cret-key"
    # the environment works as before, and a file given on the command line wins over it
    monkeypatch.setenv("SPLITSERVE_API_KEY", "from-env")
    assert config_from_args(_args()).http.resolved_api_key() == "from-env"
    assert config_from_args(_args("--api-key-file", str(key_file))).http.resolved_api_key() == "s3cret-key"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        config_from_args(_args("--api-key-file", str(empty))).http.resolved_api_key()
    with pytest.raises(ValueError, match="cannot be read"):
        config_from_args(_args("--api-key-file", str(tmp_path / "missing"))).http.resolved_api_key()
    with pytest.raises(ValueError, match="not both"):
        config_from_args(_args("--config", str(_yaml(tmp_path, key_file)), "--api-key", "x"))


def _yaml(tmp_path, key_file) -> object:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"http: {{api_key_file: {key_file}}}\n")
    return path


def _listeners(pids: set[int]) -> list[tuple[str, int]]:
    """(address, pid) of every TCP socket listening in one of ``pids``."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        local = fields[3]
        for pid in pids:
            if f"pid={pid}," in line:
                found.append((local.rsplit(":", 1)[0].strip("[]"), pid))
    return found


def _result(child: subprocess.Popen) -> dict:
    """The child's ``RESULT {json}`` line (libraries log to stdout too)."""
    for line in child.stdout:
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise AssertionError(f"the child exited ({child.wait()}) without a result")


def _is_loopback(address: str) -> bool:
    address = address.removeprefix("::ffff:")
    return address not in ("*", "0.0.0.0", "::") and ipaddress.ip_address(address).is_loopback


_RAY_CHILD = textwrap.dedent("""
    import json, os, sys, tempfile
    import psutil, ray
    from splitserve.config import ServeConfig
    from splitserve.serve_cli import start_ray
    os.environ.pop("RAY_ADDRESS", None)
    start_ray(ServeConfig(num_prefill=1, num_decode=1))

    @ray.remote(num_cpus=0)
    def worker_env():
        return os.environ.get("UCX_NET_DEVICES"), ray.util.get_node_ip_address()

    env, node_ip = ray.get(worker_env.remote())
    pids = [p.pid for p in psutil.Process().children(recursive=True)] + [os.getpid()]
    print("RESULT", json.dumps({"ucx": env, "node_ip": node_ip, "pids": pids}), flush=True)
    sys.stdin.readline()  # keep Ray up while the parent looks at the sockets
    ray.shutdown()
""")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_a_local_ray_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k not in (*LOCAL_ENV, "RAY_ADDRESS")}
    child = subprocess.Popen([sys.executable, "-c", _RAY_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        state = _result(child)
        assert state["ucx"] == "lo", "Ray workers did not inherit the loopback-only UCX setting"
        assert state["node_ip"] == "127.0.0.1"
        listening = _listeners(set(state["pids"]))
        assert len(listening) >= 3, listening  # GCS, raylet, workers: there is something to check
        assert all(_is_loopback(addr) for addr, _ in listening), [x for x in listening if not _is_loopback(x[0])]
    finally:
        child.communicate("\n", timeout=60)


_NIXL_CHILD = textwrap.dedent("""
    import json, os, subprocess, torch
    from splitserve.transfer.agent import KVTransferAgent
    a = KVTransferAgent("a", torch.zeros(4, 2, 2, 16, 2, 8))
    b = KVTransferAgent("b", torch.arange(4 * 2 * 2 * 16 * 2 * 8, dtype=torch.float32).reshape(4, 2, 2, 16, 2, 8))
    b.add_peer(a.info())
    handle = b.write_blocks("a", [2], [1], b"done")
    b.wait(handle, 10.0)
    moved = bool(torch.equal(a.kv_cache[1], b.kv_cache[2]))
    print("RESULT", json.dumps({"moved": moved, "pid": os.getpid()}), flush=True)
    input()
    a.close(); b.close()
""")


@pytest.mark.engine
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_nixl_moves_kv_and_listens_on_loopback_only_under_the_local_environment():
    env = {**os.environ, **LOCAL_ENV}
    child = subprocess.Popen([sys.executable, "-c", _NIXL_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        state = _result(child)
        assert state["moved"], "the KV block did not arrive over loopback UCX"
        listening = _listeners({state["pid"]})
        assert listening and all(_is_loopback(addr) for addr, _ in listening), listening
    finally:
        child.communicate("\n", timeout=60)


def test_a_port_in_use_is_named_before_ray_starts_and_one_coming_free_is_waited_for():
    """Serve's ingress replica failing to bind shows a page of tracebacks and blocks the port; the CLI checks first
    (a server stopped a moment ago may still hold the port: it waits for it)."""
    import socket
    import threading
    import time

    from splitserve.serve_cli import wait_for_port

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    with pytest.raises(ValueError, match=f"port {port} on 127.0.0.1 is in use .*or pass --port"):
        wait_for_port("127.0.0.1", port, wait_s=0.3)
    threading.Timer(0.3, holder.close).start()  # a server that is stopping
    t0 = time.monotonic()
    wait_for_port("127.0.0.1", port, wait_s=10.0)
    assert 0.2 < time.monotonic() - t0 < 5.0
    with pytest.raises(ValueError, match="cannot listen on 203.0.113.77"):  # an address this machine does not have
        wait_for_port("203.0.113.77", port, wait_s=0.1)
