"""The splitserve client: completions, chat, streaming and paced batches over HTTP.

Works against splitserve and any OpenAI-compatible server (only standard
fields are required; ``return_token_ids``, ``ignore_eos``, ``priority`` and
``tenant`` are sent only when given). Depends on httpx (and tqdm for progress
bars) only, never on torch: importing it is cheap.

- ``Client`` / ``AsyncClient``: ``complete``, ``chat``, ``stream``, ``stream_chat``,
  ``batch``, ``batch_chat``, ``run_batch``, ``models``.
- ``Completion`` results carry ``usage`` and client-side ``timings`` (TTFT, ITL, total).
- ``errors``: ``SplitserveError`` and its subclasses.
- ``pacing``: the pure ``AIMDController``, ``RetryPolicy`` and ``PendingQueue``.
- ``rag``: prompts with the shared documents first and the question last.
"""

from __future__ import annotations

from splitserve.client.async_client import AsyncClient, AsyncCompletionStream
from splitserve.client.errors import (
    APIError,
    AuthenticationFailed,
    BadRequest,
    BatchFailed,
    ConnectionFailed,
    MalformedResponse,
    Overloaded,
    RequestTimeout,
    ServerError,
    SplitserveError,
)
from splitserve.client.pacing import AIMDController, RetryPolicy
from splitserve.client.rag import Document, load_documents, rag_messages, rag_prefix, rag_prompt
from splitserve.client.sync import Client, CompletionStream
from splitserve.client.types import Chunk, Completion, Request, Timings, Usage

__all__ = [
    "AIMDController", "APIError", "AsyncClient", "AsyncCompletionStream", "AuthenticationFailed", "BadRequest",
    "BatchFailed", "Chunk", "Client", "Completion", "CompletionStream", "ConnectionFailed", "Document",
    "MalformedResponse", "Overloaded", "Request", "RequestTimeout", "RetryPolicy", "ServerError", "SplitserveError",
    "Timings", "Usage", "load_documents", "rag_messages", "rag_prefix", "rag_prompt",
]
