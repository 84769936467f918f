"""Typed messages from the router to the workers (newer calls; the older ones still take plain dicts).

Plain dataclasses of builtins: Ray pickles them across processes and the
in-process test handles pass them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ResumeRequest:
    """Continue a request whose decode worker died mid-stream, on another worker.

    ``output_token_ids`` are the tokens the client already received and
    ``num_sent_chars`` the length of the text it received (the dead worker may
    have held some back for a stop string); the new worker prefills prompt +
    those tokens and streams on from there (``LLMEngine.resume_request``).
    ``sampling`` is ``SamplingParams.to_dict()`` of the original request.
    """

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_sent_chars: int
    sampling: dict[str, Any]
    priority: int = 0
    num_migrations: int = 1
    origin_worker_ids: list[str] = field(default_factory=list)  # the workers it ran on before, oldest first
