"""Request migration: a stream whose decode worker dies goes on from another worker.

The router records what the client has received (``StreamProgress``: token ids
and the length of the text). When the worker streaming a request fails after
the first chunk, ``plan_migration`` decides whether to resume it and builds the
``ResumeRequest``: the same prompt and sampling settings, the tokens already
streamed, the text already sent. The new worker prefills prompt + those tokens
(locally: the policy is asked for a ``local_only`` placement) and streams on,
so greedy output is token-identical to an uninterrupted run and the client sees
one continuous stream. Each resumed attempt gets its own request id
(``<req_id>-m<n>``) so a late abort meant for the dead attempt can never hit it.

Not resumed (the stream ends with an error, as before): a request already
migrated ``migration_limit`` times, and failures that are the request's own
(``ValueError``: another worker would refuse it too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from splitserve.engine.sampling_params import SamplingParams
from splitserve.worker_messages import OutputChunk, ResumeRequest
from splitserve.failures import describe


@dataclass(slots=True)
class StreamProgress:
    """What the client has received of one request so far, across migrations."""

    output_token_ids: list[int] = field(default_factory=list)
    num_sent_chars: int = 0
    num_migrations: int = 0
    worker_ids: list[str] = field(default_factory=list)  # the workers that streamed it, in order
    started: float = field(default_factory=time.monotonic)

    def record(self, chunk: OutputChunk) -> None:
        self.output_token_ids.extend(chunk.new_token_ids)
        self.num_sent_chars += len(chunk.new_text)


class StreamBroken(Exception):
    """The worker streaming a request failed after the client received part of it."""

    def __init__(self, worker_id: str, cause: BaseException) -> None:
        super().__init__(f"worker {worker_id} failed mid-stream: {describe(cause)}")
        self.worker_id, self.cause = worker_id, cause


class NotMigrated(RuntimeError):
    """A broken stream that will not be resumed; the message says why."""


def plan_migration(
    req_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int, progress: StreamProgress,
    broken: StreamBroken, migration_limit: int,
) -> ResumeRequest:
    """The ``ResumeRequest`` that continues a broken stream, or ``NotMigrated`` saying why not."""
    n = len(progress.output_token_ids)
    what = f"request {req_id}: {broken.worker_id} failed after {n} streamed tokens ({describe(broken.cause)})"
    if isinstance(broken.cause, ValueError):
        raise NotMigrated(f"{what}; not resumed: the request itself was refused")
    if progress.num_migrations >= migration_limit:
        raise NotMigrated(f"{what}; not resumed: it was already moved {progress.num_migrations} times (routing.migration_limit)")
    progress.num_migrations += 1
    return ResumeRequest(
        req_id=f"{req_id}-m{progress.num_migrations}",
        prompt_token_ids=list(prompt_token_ids),
        output_token_ids=list(progress.output_token_ids),
        num_sent_chars=progress.num_sent_chars,
        params=params,
        priority=priority,
        num_migrations=progress.num_migrations,
        origin_worker_ids=list(progress.worker_ids),
    )
