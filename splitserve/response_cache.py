"""Deterministic requests answered again from memory: the ingress's response cache.

A request is deterministic when its sampling is greedy (``temperature`` 0) or
seeded (``seed``): the same prompt gives the same tokens, so a repeat (a RAG
pipeline re-asking a question over the same documents, a retried batch, an
evaluation run again) need not reach a worker. The key is what the engine
would be given: the prompt's token ids and every sampling setting that shapes
the output (all of ``SamplingParams`` but ``stream_interval``, which only
groups tokens into events). So a chat request and a completion of its
templated prompt share an entry, and the response is built anew on each hit
(its own id and ``created``; the same text, tokens, finish reason and usage).

Only whole generations are kept (finish reason ``stop`` or ``length``): a
request that failed, timed out or was cancelled stores nothing. The cache is
bounded by entries, by bytes (text and token ids), and by age (``ttl_s``);
the least recently used entry goes first. It lives in one ingress replica's
memory: replicas do not share it, and a restart empties it. Off unless
``response_cache.max_entries`` is set. Pure logic, no I/O.

Greedy output in the default (non-deterministic) batch mode can differ in a
late token between batch mixes; a hit returns one of those answers, as a new
run could. ``--deterministic`` servers make every answer the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgpack

from splitserve.engine.sampling_params import GREEDY_TEMPERATURE, SamplingParams

_ENTRY_OVERHEAD_BYTES = 256  # the entry's objects and the index's slot, roughly
_NOT_IN_KEY = ("stream_interval",)


@dataclass(frozen=True, slots=True)
class CachedGeneration:
    """What a whole generation produced: enough to build either response shape, streamed or not."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    num_prompt_tokens: int

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8", "surrogatepass")) + 8 * len(self.token_ids) + _ENTRY_OVERHEAD_BYTES


def is_deterministic(params: SamplingParams) -> bool:
    """Greedy or seeded: a repeat of the request gives the same tokens."""
    return params.temperature < GREEDY_TEMPERATURE or params.seed is not None


def cache_key(prompt_ids: Sequence[int], params: SamplingParams) -> bytes | None:
    """The entry a request reads and fills, or None when its output is not deterministic."""
    if not is_deterministic(params):
        return None
    settings = sorted((k, v) for k, v in dataclasses.asdict(params).items() if k not in _NOT_IN_KEY)
    packed = msgpack.packb([list(prompt_ids), settings], use_bin_type=True)
    return hashlib.blake2b(packed, digest_size=20).digest()


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0


class ResponseCache:
    """A bounded LRU of ``CachedGeneration`` by ``cache_key``, entries older than ``ttl_s`` unseen."""

    def __init__(
        self, max_entries: int, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or max_bytes < 1 or ttl_s <= 0:
            raise ValueError("max_entries, max_bytes and ttl_s must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, CachedGeneration]] = OrderedDict()
        self.nbytes = 0
        self.counters = CacheCounters()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> CachedGeneration | None:
        found = self._entries.get(key)
        if found is not None and self._clock() - found[0] > self.ttl_s:
            self._drop(key)
            found = None
        if found is None:
            self.counters.misses += 1
            return None
        self._entries.move_to_end(key)
        self.counters.hits += 1
        return found[1]

    def put(self, key: bytes, generation: CachedGeneration) -> bool:
        """Keep ``generation`` (False when it alone is over ``max_bytes``, or did not finish whole)."""
        if generation.finish_reason not in ("stop", "length") or generation.nbytes > self.max_bytes:
            return False
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self._clock(), generation)
        self.nbytes += generation.nbytes
        self.counters.stores += 1
        while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.counters.evictions += 1
        return True

    def _drop(self, key: bytes) -> None:
        _, generation = self._entries.pop(key)
        self.nbytes -= generation.nbytes
