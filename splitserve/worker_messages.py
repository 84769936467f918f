"""The typed messages between the router and the workers: one leaf module, plain dataclasses.

Ray pickles them across processes and the in-process test handles pass them as
they are. A request's prompt crosses each hop once: to the decode worker in
``GenerateRequest`` (it reserves, waits for the KV and decodes in one streaming
call, so Serve counts it as busy with the request from the first block reserved
to the last token), and to the prefill worker in ``PrefillRequest``.

Worker -> router: ``Reservation`` (the first item of a prefilled stream),
``PrefillResult``, ``OutputChunk`` (every later stream item, or gathered per engine step into the
``TokenBatch``es of a token feed) and ``WorkerStats``
(the load a worker publishes through Serve's routing stats).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import msgpack

from splitserve.engine.outputs import RequestOutput
from splitserve.engine.sampling_params import SamplingParams


# a prefill worker's KV notification is msgpack ``[transfer_id, first_token]``; this token says "no write into that
# reservation will land" (the prefill failed or was cancelled: the decode worker may reuse the blocks)
VOID_TOKEN = -1


@dataclass(slots=True)
class GenerateRequest:
    """One request for a worker: stream it whole (``generate``), or decode it once its KV arrived (``serve_prefilled``)."""

    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0


@dataclass(slots=True)
class Reservation:
    """A decode worker's blocks for an incoming prompt: the prefill worker writes the prompt's blocks from
    ``num_cached_blocks`` on (the leading ones it already caches) into ``block_ids``, by ``write_by``, and
    notifies ``transfer_id`` (``splitserve.decode.kv_landings``)."""

    num_cached_blocks: int
    block_ids: list[int]
    transfer_id: str  # names this reservation in the writer's notification
    write_by: float  # wall-clock time (time.time()) after which no write may start or go on


@dataclass(slots=True)
class PrefillRequest:
    """Prefill ``req`` and write its KV into the decode worker's reserved blocks."""

    req: GenerateRequest
    decode_worker_id: str
    reservation: Reservation


@dataclass(slots=True)
class PrefillResult:
    req_id: str
    first_token: int
    num_cached_tokens: int
    prefill_s: float
    transfer_bytes: int
    transfer_s: float
    compute_s: float = 0.0  # engine time charged to this prefill (its share of the steps it was in)


@dataclass(slots=True)
class OutputChunk:
    """New tokens of one request (several when the consumer lagged and they were coalesced)."""

    req_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    compute_s: float = 0.0  # engine time charged to the request on this worker so far (cumulative)

    def then(self, later: "OutputChunk") -> "OutputChunk":
        """This chunk and a later one of the same request as one: tokens and text joined, the rest from ``later``."""
        return replace(later, new_token_ids=self.new_token_ids + later.new_token_ids, new_text=self.new_text + later.new_text)

    @classmethod
    def of(cls, out: RequestOutput) -> "OutputChunk":
        return cls(
            out.req_id, out.new_token_ids, out.new_text, out.finished, out.finish_reason, len(out.prompt_token_ids),
            len(out.token_ids), out.metrics.num_cached_tokens, out.metrics.compute_s,
        )


@dataclass(slots=True)
class TokenBatch:
    """One item of a token feed (``splitserve.token_feed``): the new chunks of every request bound to it.

    Pickled as one msgpack blob of the chunks' fields (``__reduce__``): Ray's cloudpickle visits every object
    of a plain dataclass tree in Python, ~290 µs for a 64-request step against ~30 µs (and ~120 against ~40 to
    load). Every engine step of every decode worker sends one, so it is the hot message; it arrives as the
    same typed ``TokenBatch`` of ``OutputChunk``s.
    """

    chunks: list[OutputChunk]

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        rows = [
            (c.req_id, c.new_token_ids, c.new_text, c.finished, c.finish_reason, c.num_prompt_tokens, c.num_output_tokens,
             c.num_cached_tokens, c.compute_s)
            for c in self.chunks
        ]
        return _token_batch_from_wire, (msgpack.packb(rows, unicode_errors="surrogatepass"),)


def _token_batch_from_wire(blob: bytes) -> TokenBatch:
    return TokenBatch([OutputChunk(*row) for row in msgpack.unpackb(blob, unicode_errors="surrogatepass")])


@dataclass(slots=True)
class ResumeRequest:
    """Continue a request whose decode worker died mid-stream, on another worker.

    ``output_token_ids`` are the tokens the client already received and
    ``num_sent_chars`` the length of the text it received (the dead worker may
    have held some back for a stop string); the new worker prefills prompt +
    those tokens and streams on from there (``LLMEngine.resume_request``).
    """

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_sent_chars: int
    params: SamplingParams
    priority: int = 0
    num_migrations: int = 1
    origin_worker_ids: list[str] = field(default_factory=list)  # the workers it ran on before, oldest first


@dataclass(slots=True)
class WorkerStats:
    """A worker's load, as it publishes it (Serve's routing stats) and as ``/admin/workers`` shows it.

    ``seq`` grows with every report of one worker: a router keeps the newest. ``prefix_version`` changes
    when the worker's prefix cache does; the hashes themselves are fetched only then (``prefix_summary``).
    """

    worker_id: str
    role: str
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_total_blocks: int
    num_blocks_in_flight: int
    block_size: int
    num_queued_tokens: int
    num_requests: int = 0
    num_failed: int = 0
    num_resumed: int = 0
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0
    prefix_hits: int = 0
    prefix_queries: int = 0
    prefix_version: int = -1
    num_tokens: int = 0  # tokens the engine computed since start (prompt chunks and decodes)
    busy_s: float = 0.0  # engine step time since start (every second of it charged to some request)
    decode_step_s: float = 0.0  # moving average of decoding steps' time (its streams' inter-token gap)
    prompt_s_per_token: float = 0.0  # moving average of step time per token of prompt-only steps (0.0: none yet)
    busy_fraction: float = 0.0  # busy time over wall time in the last ``meter_window_s``
    accelerator_memory_bytes: int = 0  # GPU memory allocated by this worker (0 on CPU)
    seq: int = 0
    time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WorkerStats":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
