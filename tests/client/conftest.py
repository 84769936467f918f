"""A real splitserve HTTP server in this process, for the client tests: no Ray, real sockets.

One aggregated worker (``DecodeWorker`` with role "both") on the tiny checkpoint
behind ``LocalHandle``, a real ``IngressCore`` and its FastAPI app, served by
uvicorn on a free 127.0.0.1 port in a background thread. The worker, the core
and the app are built *inside* that thread's event loop, so every asyncio
object they create (the engine loop, the registry poller) lives on uvicorn's
loop. The server requires an API key, so every test also exercises auth.
After the folder's last test the server stops and the worker must hold no KV
block and no request (leak check).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import assert_no_leaks

API_KEY = "test-key"
SERVED_NAME = "tiny"


class LiveServer:
    """``start()`` serves the tiny model at ``url``; ``stop()`` shuts it down and checks for leaks."""

    def __init__(self, model: str, api_key: str | None = API_KEY) -> None:
        self.model = model
        self.api_key = api_key
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.worker: Any = None
        self.error: BaseException | None = None
        self.leak_error: BaseException | None = None
        self._server: Any = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="live-server", daemon=True)

    async def _main(self) -> None:
        import uvicorn

        from splitserve.config import ServeConfig
        from splitserve.decode.worker import DecodeWorker
        from splitserve.ingress import IngressCore, build_http_app
        from splitserve.scheduler.directory import LocalDirectory
        from tests.fakes import LocalHandle

        core = None
        try:
            self.worker = DecodeWorker({"model": self.model, "dtype": "float32", "num_kv_blocks": 512}, worker_id="worker-0", role="both")
            cfg = ServeConfig(mode="aggregated", num_prefill=0, num_decode=1, engine={"model": self.model},
                              http={"served_model_name": SERVED_NAME, "api_key": self.api_key})
            core = IngressCore(cfg, self.model, LocalDirectory({"worker-0": LocalHandle(self.worker)}))
            config = uvicorn.Config(build_http_app(core), log_level="warning", lifespan="off", access_log=False)
            self._server = uvicorn.Server(config)
            await self._server.serve(sockets=[self._sock])
        except BaseException as e:  # reported by start() / stop()
            self.error = e
        finally:
            await self._shutdown(core)

    async def _shutdown(self, core: Any) -> None:
        if core is not None:
            await core.registry.stop()
        w = self.worker
        if w is None:
            return
        deadline = time.monotonic() + 5  # aborts of dropped streams land asynchronously
        while time.monotonic() < deadline and (w.engine.has_unfinished_requests() or w.engine.pool.num_free_blocks != w.engine.pool.num_blocks):
            await asyncio.sleep(0.02)
        try:
            assert_no_leaks(w.engine)
        except AssertionError as e:
            self.leak_error = e
        poller = getattr(w, "_poller", None)
        if poller is not None and not poller.done():
            poller.cancel()
        await w.aengine.stop()
        w.agent.close()

    def start(self, timeout_s: float = 180.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.error is not None or not self._thread.is_alive():
                raise RuntimeError(f"the test server failed to start: {self.error!r}") from self.error
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the test server did not become healthy in {timeout_s} s")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(30)
        assert not self._thread.is_alive(), "the test server did not stop"


_live: LiveServer | None = None  # shared by every test in this folder, stopped when the run leaves it


@pytest.fixture(scope="module")
def live_server(tiny_model) -> LiveServer:
    global _live
    if _live is None:
        server = LiveServer(tiny_model)
        try:
            server.start()
        except BaseException:
            server.stop()
            raise
        _live = server
    return _live


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the shared server after the last test of this folder (not at the end of the whole session)."""
    global _live
    if _live is not None and (nextitem is None or Path(nextitem.path).parent != Path(__file__).parent):
        server, _live = _live, None
        server.stop()
        if server.leak_error is not None:
            raise server.leak_error


@pytest.fixture(scope="module")
def offline_llm(tiny_model):
    """The correctness oracle: the offline engine on the same checkpoint."""
    from splitserve import LLM

    llm = LLM(tiny_model, dtype="float32", num_kv_blocks=512)
    yield llm
    assert_no_leaks(llm.engine)


def greedy_ids(llm: Any, prompts: list, max_tokens: int) -> list[list[int]]:
    """Greedy token ids with EOS ignored, one list per prompt."""
    from splitserve import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [list(out.outputs[0].token_ids) for out in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture
def closed_port() -> int:
    """A 127.0.0.1 port with nothing listening (connections are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def silent_port():
    """A port that accepts connections (the kernel's backlog) but never answers: reads time out."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()
