"""The OpenAI-compatible HTTP front: validate, tokenize, route, stream.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE when
``stream``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus),
``GET /admin/workers`` (per-worker load and KV blocks in use), ``GET /admin/requests``
(this replica's requests in flight and the decode worker streaming each).

Every bad request is answered with a 4xx and OpenAI's error body naming the
problem: malformed JSON, lone surrogates, nesting or integers it cannot hold
(400), a field out of range (400), an unknown model (404), a body over the size
limit (413), a body that is not ``application/json`` (415), a missing or wrong
API key (401), a prompt that does not fit the context (400). No capacity: 503
with Retry-After. Anything unexpected is a 500 saying "internal error (request
id X)", its details in the log under that id (``splitserve.http_guard``): no
response carries a traceback, path, address, pid or actor id. Parsing, the chat
template and tokenizing run off the event loop (``splitserve.request_prep``).
The request bodies' schemas are published in ``/openapi.json``.
The app object is built by ``build_http_app(core)``; the Ray Serve ``Ingress``
deployment (``splitserve.app``) wraps the same app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from splitserve import openai_protocol as oai
from splitserve.config import HTTPConfig, ServeConfig
from splitserve.engine.aio import cancel_and_wait
from splitserve.engine.config import resolve_max_model_len
from splitserve.engine.model_config import ModelConfig
from splitserve.engine.sampling_params import InvalidSamplingParam, SamplingParams
from splitserve.engine.tokenizer import load_tokenizer
from splitserve.http_guard import APIError, HTTPGuard
from splitserve.metrics import Metrics
from splitserve.openapi_bodies import openapi_with_request_bodies, request_body_schema
from splitserve.planner_policy import read_decisions
from splitserve.request_prep import PromptBuilder, near_loop
from splitserve.response_cache import CachedGeneration, ResponseCache, cache_key
from splitserve.responses import ClosingStreamingResponse, ended_early, error_for, sse_events
from splitserve.router import RequestFailed, RoutedRequest, Router
from splitserve.scheduler import LeastLoadedPolicy, NoWorkerAvailable
from splitserve.scheduler.directory import Directory
from splitserve.scheduler.spread import SpreadTracker
from splitserve.scheduler.worker_registry import WorkerRegistry
from splitserve.worker_messages import OutputChunk

logger = logging.getLogger(__name__)


class IngressCore:
    """State shared by the routes: tokenizer, limits, router, metrics."""

    def __init__(self, cfg: ServeConfig, model_path: str, directory: Directory):
        """``directory``: where the workers are (``ServeDirectory`` in a deployment, ``LocalDirectory`` in tests)."""
        self.cfg = cfg
        self.model_path = model_path
        mc = ModelConfig.from_pretrained(model_path)
        self.max_model_len = resolve_max_model_len(cfg.engine.max_model_len, mc)
        self.vocab_size = mc.vocab_size
        self.tokenizer = load_tokenizer(model_path)
        self.served_name = cfg.http.served_model_name or _default_name(cfg, model_path)
        self.model_names = list(dict.fromkeys([self.served_name, model_path, cfg.engine.model or model_path, *_aliases(cfg)]))
        self.metrics = Metrics(max_tenants=cfg.http.max_metric_tenants, price_per_accelerator_hour=cfg.price_per_accelerator_hour)
        self.metrics.start_series(cfg.mode)
        self.prep = PromptBuilder(self.tokenizer, self.vocab_size, cfg.http)
        r = cfg.routing
        self.registry = WorkerRegistry(directory, max_age_s=r.load_max_age_s, track_prefixes=r.prefix_aware,
                                       refresh_after_s=max(1.0, 4 * r.load_report_interval_s))
        self.spread = SpreadTracker()
        policy = LeastLoadedPolicy(
            local_prefill_threshold_tokens=r.local_prefill_threshold_tokens, local_prefill_budget_s=r.local_prefill_budget_s,
            max_prefill_queue_tokens=r.max_prefill_queue_tokens,
            degraded_mode=r.degraded_mode, ttft_target_s=cfg.slo.ttft_s if r.slo_local_prefill else None,
            itl_target_s=cfg.slo.tpot_s if r.slo_local_prefill else None,
        )
        self.router = Router(
            self.registry, self.metrics, mode=cfg.mode, policy=policy, max_attempts=r.max_attempts, prefill_timeout_s=r.prefill_timeout_s,
            migration_limit=r.migration_limit, max_queue_wait_s=r.max_queue_wait_s,
        )
        rc = cfg.response_cache
        self.responses = ResponseCache(rc.max_entries, rc.max_bytes, rc.ttl_s) if rc.max_entries else None

    # ---- request preparation -----------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_names:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.served_name!r}", "NotFoundError", "model")

    async def prompt_ids(self, req: oai.CompletionRequest | oai.ChatCompletionRequest, chat: bool) -> list[int]:
        """Template (always) and tokenize (unless short) off the event loop (see ``splitserve.request_prep``)."""
        if not chat:
            return await near_loop(self.prep.completion_size(req), self.prep.completion_ids, req)
        text = await self.prep.chat_text_bounded(req)
        return await near_loop(len(text), self.prep.chat_ids, text)

    def routed(
        self, req: oai.CompletionRequest | oai.ChatCompletionRequest, prompt_ids: list[int], chat: bool, req_id: str | None = None,
    ) -> RoutedRequest:
        n = len(prompt_ids)
        param = "messages" if chat else "prompt"
        if n == 0:
            raise APIError(400, "the prompt is empty", param=param)
        room = self.max_model_len - n
        if room < 1:
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} tokens, but the prompt has {n} tokens", param=param)
        default_max = room if chat else min(16, room)
        try:
            params = req.to_sampling_params(default_max)
        except ValueError as e:
            raise APIError(400, str(e), param=e.field if isinstance(e, InvalidSamplingParam) else None) from e
        params.stream_interval = self.cfg.http.stream_interval
        if n + params.max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"this model's maximum context length is {self.max_model_len} tokens; you requested {n + params.max_tokens} "
                f"({n} in the prompt, {params.max_tokens} in max_tokens): reduce the prompt or max_tokens",
                param="max_tokens",
            )
        _check_stop_limits(params, self.cfg.http)
        bad_stop = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad_stop:
            raise APIError(400, f"stop_token_ids must be in [0, {self.vocab_size - 1}]; got {bad_stop}", param="stop_token_ids")
        return RoutedRequest(req_id or uuid.uuid4().hex, prompt_ids, params, priority=req.priority, tenant=req.tenant)

    # ---- the response cache ------------------------------------------------------
    def lookup(self, rreq: RoutedRequest, cache_control: str) -> tuple[bytes | None, CachedGeneration | None]:
        """The request's response-cache key (None: no cache, not greedy or seeded, or ``no-store``) and a stored answer.

        ``Cache-Control: no-cache`` generates anew (and stores the answer); ``no-store`` neither reads nor stores.
        """
        directives = cache_control.lower()
        if self.responses is None or "no-store" in directives:
            return None, None
        key = cache_key(rreq.prompt_token_ids, rreq.params)
        if key is None:
            return None, None
        hit = None if "no-cache" in directives else self.responses.get(key)
        self.metrics.response_cache.labels("hit" if hit is not None else "miss").inc()
        return key, hit

    def answer(self, rreq: RoutedRequest, key: bytes | None, hit: CachedGeneration | None) -> AsyncGenerator[OutputChunk, None]:
        """The request's chunks: a stored answer as one chunk, or ``chunks`` (a whole new answer under ``key`` is stored)."""
        if hit is not None:
            return self._replay(rreq, hit)
        return self.chunks(rreq) if key is None else self._stored(rreq, key)

    async def _replay(self, rreq: RoutedRequest, hit: CachedGeneration) -> AsyncGenerator[OutputChunk, None]:
        self.metrics.requests.labels("ok", self.metrics.tenant_label(rreq.tenant)).inc()
        yield OutputChunk(rreq.req_id, list(hit.token_ids), hit.text, True, hit.finish_reason, hit.num_prompt_tokens,
                          hit.num_output_tokens, hit.num_prompt_tokens)

    async def _stored(self, rreq: RoutedRequest, key: bytes) -> AsyncGenerator[OutputChunk, None]:
        assert self.responses is not None  # a key is only made when there is a cache
        text: list[str] = []
        token_ids: list[int] = []
        async with contextlib.aclosing(self.chunks(rreq)) as chunks:
            async for chunk in chunks:
                text.append(chunk.new_text)
                token_ids.extend(chunk.new_token_ids)
                if chunk.finished and chunk.finish_reason in ("stop", "length"):
                    self.responses.put(key, CachedGeneration("".join(text), tuple(token_ids), chunk.finish_reason, chunk.num_prompt_tokens))
                yield chunk

    # ---- streaming ---------------------------------------------------------------
    async def chunks(self, rreq: RoutedRequest) -> AsyncGenerator[OutputChunk, None]:
        """The router's chunks with metrics recorded and the whole request bounded in time."""
        self.registry.start()
        tenant = self.metrics.tenant_label(rreq.tenant)  # bounded: at most http.max_metric_tenants labels
        m, mode = self.metrics, self.cfg.mode
        ttft, itl = m.ttft.labels(mode), m.itl.labels(mode)  # looked up once, observed per chunk
        limit_s = self.cfg.routing.request_timeout_s
        first = last = None
        status = "error"
        try:
            # asyncio.timeout cancels this task at the deadline: no helper task races the stream's own cleanup
            async with asyncio.timeout(max(0.0, limit_s - (time.monotonic() - rreq.arrival))):
                async with contextlib.aclosing(self.router.stream(rreq)) as stream:
                    async for chunk in stream:
                        now = time.monotonic()
                        if chunk.new_token_ids:
                            if last is None:
                                first = now
                                ttft.observe(now - rreq.arrival)
                            else:
                                itl.observe((now - last) / len(chunk.new_token_ids))
                            last = now
                        if chunk.finished:
                            status = "ok" if chunk.finish_reason in ("stop", "length") else chunk.finish_reason
                            m.prompt_tokens.labels(tenant).inc(chunk.num_prompt_tokens)
                            m.generation_tokens.labels(tenant).inc(chunk.num_output_tokens)
                            m.e2e.labels(mode).observe(now - rreq.arrival)
                            if status == "ok" and first is not None and self._within_slo(rreq.arrival, first, now, chunk.num_output_tokens):
                                m.slo_met.labels(mode).inc()
                        yield chunk
        except TimeoutError as e:
            status = "timeout"
            raise RequestFailed(f"request exceeded {limit_s:.0f} s") from e
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        except NoWorkerAvailable:
            status = "rejected"
            raise
        finally:
            m.requests.labels(status, tenant).inc()

    def _within_slo(self, arrival: float, first_token: float, finished: float, num_output_tokens: int) -> bool:
        """TTFT and mean time per output token after the first, against ``cfg.slo``."""
        slo = self.cfg.slo
        tpot = (finished - first_token) / (num_output_tokens - 1) if num_output_tokens > 1 else 0.0
        return first_token - arrival <= slo.ttft_s and tpot <= slo.tpot_s


def _check_stop_limits(params: SamplingParams, http: HTTPConfig) -> None:
    """Every stop string is looked for after every token: their number and length are this request's work on the batch."""
    for name, values in (("stop", params.stop), ("stop_token_ids", params.stop_token_ids)):
        if len(values) > http.max_stop_sequences:
            raise APIError(400, f"{name} takes at most {http.max_stop_sequences} entries; got {len(values)}", param=name)
    longest = max((len(s) for s in params.stop), default=0)
    if longest > http.max_stop_chars:
        raise APIError(400, f"a stop string may have at most {http.max_stop_chars} characters; got one of {longest}", param="stop")


def _aliases(cfg: ServeConfig) -> tuple[str, ...]:
    """Other names clients may use for the default model (its Hub id)."""
    if cfg.engine.model is not None:
        return ()
    from splitserve.engine.default_model import DEFAULT_MODEL_ALIASES

    return DEFAULT_MODEL_ALIASES


def _default_name(cfg: ServeConfig, model_path: str) -> str:
    if cfg.engine.model is None:
        from splitserve.engine.default_model import DEFAULT_SERVED_NAME

        return DEFAULT_SERVED_NAME
    return model_path.rstrip("/").split("/")[-1]


def _spread_summary(core: "IngressCore") -> dict:
    reports = list(core.registry.reports.values())
    core.spread.observe(time.monotonic(), reports)
    return core.spread.summary(reports)


def build_http_app(core: IngressCore) -> FastAPI:
    cfg = core.cfg.http
    app = FastAPI(title="splitserve", version="0.1.0")
    app.add_middleware(HTTPGuard, http=cfg, api_key=cfg.resolved_api_key())
    app.openapi = lambda: openapi_with_request_bodies(app)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        """Starlette's own refusals (no such route: 404, wrong method: 405) in OpenAI's error shape, like every other."""
        kind = "NotFoundError" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(oai.error_body(str(e.detail), kind, None, e.status_code), e.status_code, headers=e.headers)

    async def parse(request: Request, model: type) -> Any:
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > cfg.max_request_bytes:
                raise APIError(413, f"request body exceeds the limit of {cfg.max_request_bytes} bytes")
        return await near_loop(len(body), core.prep.parse, bytes(body), model)

    async def serve_request(request: Request, chat: bool) -> Response:
        req_id = request.state.request_id  # set by HTTPGuard; the request's id on every worker and in every log line
        try:
            req = await parse(request, oai.ChatCompletionRequest if chat else oai.CompletionRequest)
            core.check_model(req.model)
            prompt_ids = await core.prompt_ids(req, chat)
            rreq = core.routed(req, prompt_ids, chat, req_id)
            key, hit = core.lookup(rreq, request.headers.get("cache-control", ""))
            core.registry.start()
            if hit is None:
                core.router.check_capacity(rreq)  # a full cluster is a 503 with Retry-After, also for streams
        except APIError as e:
            return e.response()
        except NoWorkerAvailable as e:
            core.metrics.requests.labels("rejected", core.metrics.tenant_label(req.tenant)).inc()
            return error_for(e, req_id).response()
        model = req.model or core.served_name
        created = int(time.time())
        cache_headers = {} if key is None else {"x-splitserve-cache": "hit" if hit is not None else "miss"}
        if req.stream:
            chunks = core.answer(rreq, key, hit)
            stream = sse_events(chunks, rreq.req_id, len(prompt_ids), model, created, chat, req.include_usage, req.return_token_ids)
            return ClosingStreamingResponse(stream, media_type="text/event-stream", headers=cache_headers)
        text, token_ids, finish, n_out = [], [], None, 0

        async def collect() -> None:
            nonlocal finish, n_out
            async for chunk in core.answer(rreq, key, hit):
                text.append(chunk.new_text)
                token_ids.extend(chunk.new_token_ids)
                finish, n_out = chunk.finish_reason, chunk.num_output_tokens

        try:
            if not await _unless_disconnected(request, collect(), core.cfg.http.disconnect_poll_s):
                return Response(status_code=499)  # nobody is listening; the request was aborted on its worker
        except (NoWorkerAvailable, RequestFailed) as e:
            return error_for(e, req_id).response()
        if finish not in ("stop", "length"):
            return ended_early(finish, req_id).response()
        build = oai.chat_completion_response if chat else oai.completion_response
        body = build(rreq.req_id, model, "".join(text), finish, len(prompt_ids), n_out, created)
        if req.return_token_ids:
            body["choices"][0]["token_ids"] = token_ids
            body["prompt_token_ids"] = prompt_ids
        return JSONResponse(body, headers=cache_headers)

    @app.post("/v1/completions", openapi_extra=request_body_schema(oai.CompletionRequest))
    async def completions(request: Request) -> Response:
        return await serve_request(request, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=request_body_schema(oai.ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await serve_request(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict:
        return oai.models_list([core.served_name])  # other accepted names (the checkpoint path) are not advertised

    @app.get("/health")
    async def health() -> Response:
        core.registry.start()
        healthy = core.registry.healthy_ids()
        decoders = [w for w in core.registry.decode if w in healthy]
        prefills = [w for w in core.registry.prefill if w in healthy]
        state = core.router.serving_state()  # "degraded": one role serves for the missing other (200)
        body = {"status": state.status, "healthy_decode": decoders, "healthy_prefill": prefills}
        if state.status != "ok":
            body["detail"] = state.detail
        return JSONResponse(body, status_code=200 if state.is_serving else 503)

    app.head("/health", include_in_schema=False)(health)  # load balancers' probes use HEAD too

    @app.get("/metrics")
    async def metrics() -> Response:
        core.metrics.update_workers(list(core.registry.reports.values()), core.registry.healthy_ids())
        core.metrics.degraded.set(core.router.serving_state().status == "degraded")
        core.metrics.update_planner(read_decisions(core.cfg.app_name))
        core.metrics.update_spread(_spread_summary(core))
        core.metrics.response_cache_entries.set(len(core.responses) if core.responses is not None else 0)
        return Response(core.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/admin/workers")
    async def workers() -> dict:
        healthy = core.registry.healthy_ids()
        registry = core.registry
        spread = _spread_summary(core)
        workers = [
            {**rep, **registry.info(wid), "healthy": wid in healthy, "share": spread.get(rep["role"], {}).get("share", {}).get(wid)}
            for wid, rep in sorted(registry.reports.items())
        ]
        planner = read_decisions(core.cfg.app_name)
        # + serving state, fallbacks, migrations, cleanups; the planner's last decision per role when it runs
        imbalance = {role: v["imbalance"] for role, v in spread.items()}  # max/mean per role; 1.0 is even
        return {"workers": workers, "imbalance": imbalance, **core.router.summary(), **({"planner": planner} if planner else {})}

    @app.get("/admin/requests", response_model=None)
    async def requests_in_flight(request: Request) -> dict | JSONResponse:
        raw = request.query_params.get("limit", "100")
        if not raw.isdigit() or int(raw) > 10_000:
            return APIError(400, f"limit must be an integer in [0, 10000]; got {raw[:20]!r}", param="limit").response()
        return core.router.in_flight_view(int(raw))

    return app


async def _unless_disconnected(request: Request, work: Awaitable[None], poll_s: float) -> bool:
    """Run ``work`` while checking every ``poll_s`` that the client is still connected.

    A client that hangs up on a non-streaming request would otherwise keep a worker
    generating up to ``max_tokens`` for nobody: the work is cancelled, which closes
    the router's stream and aborts the request on its worker (freeing its KV blocks).
    Returns False when that happened. (A streaming response notices on its next write.)
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                task.result()  # re-raise what the work raised
                return True
            if await request.is_disconnected():
                logger.info("client went away; aborting its request")
                await cancel_and_wait(task)
                return False
    except asyncio.CancelledError:  # the server itself cancelled us (e.g. Ray Serve saw the disconnect)
        await cancel_and_wait(task)
        raise
