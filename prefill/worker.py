"""Prefill worker: computes prompt KV, pushes it to a decode worker over NIXL, returns the first token.

Request lifecycle on this worker:
  1. ``prefill(PrefillRequest)`` arrives with the prompt, the sampling settings
     and the destination: the decode worker's name and its ``Reservation`` (the
     block ids it reserved, and how many of the prompt's leading blocks it
     already caches: those are not sent).
  2. waiting -> prefilling: the engine batches it with other prompts under the
     token budget (chunked when long, cached prefix blocks skipped) and samples
     the first token; the request's blocks are *held* (not freed) at the end.
  3. transferring: one NIXL WRITE of the prompt's remaining blocks into the decode
     worker's blocks, carrying a notification ``[transfer_id, first_token]``;
     bounded by ``transfer_timeout_s`` and by the reservation's ``write_by`` (none
     starts after it: the decode worker may have reused the blocks).
  4. done: the held blocks are released (they stay as prefix cache) and a
     ``PrefillResult`` (first token, timings) goes back to the caller. On any
     failure or cancellation the blocks are released too and the error propagates;
     unless a write may still land, the decode worker is told ``[transfer_id,
     VOID_TOKEN]`` first, so it can reuse its reserved blocks at once
     (``splitserve.decode.kv_landings``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import msgpack

from splitserve.engine.sampling_params import SamplingParams
from splitserve.worker_base import EngineWorker
from splitserve.worker_messages import VOID_TOKEN, PrefillRequest, PrefillResult

logger = logging.getLogger(__name__)


class PrefillFailed(RuntimeError):
    """The engine ended this request without a first token (its sequence failed; the batch went on)."""


def prefill_only(params: SamplingParams) -> SamplingParams:
    """The request's sampling settings, cut to one token with no stop rule (the decode side applies them)."""
    return replace(params, max_tokens=1, stop=[], stop_token_ids=[], ignore_eos=True)


class ReservationExpired(RuntimeError):
    """The decode worker's reservation passed its ``write_by`` before the KV was ready: writing now could land in
    blocks it has given to another request."""


class PrefillWorker(EngineWorker):
    role = "prefill"

    def _say_void(self, decode_worker_id: str, tid: str) -> None:
        """Tell the decode worker that no write into reservation ``tid`` will land (it may reuse the blocks)."""
        try:
            self.agent.send_notification(decode_worker_id, msgpack.packb([tid, VOID_TOKEN]))
        except Exception as e:  # an unknown or unreachable peer: its fence ends at write_by
            logger.warning("could not tell %s that %s is void: %r", decode_worker_id, tid, e)

    async def prefill(self, msg: PrefillRequest) -> PrefillResult:
        """Prefill ``msg.req`` and write its KV into ``msg.decode_worker_id``'s reserved blocks."""
        req, reservation = msg.req, msg.reservation
        req_id, prompt_ids = req.req_id, req.prompt_token_ids
        self.num_requests += 1
        t0 = time.monotonic()
        self.meters.on_arrival(t0, len(prompt_ids))
        final = handle = None
        tid = reservation.transfer_id
        try:
            async for out in self.aengine.generate(req_id, prompt_ids, prefill_only(req.params), priority=req.priority, keep_kv=True):
                final = out
            assert final is not None and final.finished
            if final.finish_reason != "length":  # "error": sampling its first token failed (logged by the engine)
                raise PrefillFailed(f"prefill of {req_id} ended with finish reason {final.finish_reason!r}")
            prefill_s = time.monotonic() - t0
            first_token = final.token_ids[0]
            num_blocks = -(-len(prompt_ids) // self.engine.block_size)
            skip = reservation.num_cached_blocks  # leading blocks the decode worker already holds
            if not 0 <= skip < num_blocks:
                raise ValueError(f"decode worker claims {skip} cached blocks of a {num_blocks}-block prompt")
            src = final.kv_block_ids[skip:num_blocks]
            dst = reservation.block_ids[: num_blocks - skip]
            if len(dst) < num_blocks - skip:
                raise ValueError(f"decode worker reserved {len(dst)} blocks, the prompt needs {num_blocks - skip} more")
            time_left_s = reservation.write_by - time.time()  # the decode worker reuses the blocks after write_by
            if time_left_s <= 0:
                raise ReservationExpired(f"the reservation for {req_id} expired {-time_left_s:.1f} s before its KV was ready")
            handle = self.agent.write_blocks(msg.decode_worker_id, src, dst, msgpack.packb([tid, first_token]))
            try:
                await self.agent.wait_async(handle, min(self.options.transfer_timeout_s, time_left_s))
            except BaseException:
                self.agent.cancel(handle, "prefill request ended before its transfer")
                if not handle.may_still_land:
                    handle = None  # nothing of it can land any more: the decode worker may have the blocks back
                raise
            transfer_s = time.monotonic() - t0 - prefill_s
            self.transfer_bytes += handle.num_bytes
            self.transfer_seconds += transfer_s
            self.meters.on_first_token(time.monotonic(), prefill_s + transfer_s)
        except BaseException:
            self.num_failed += 1
            if handle is None:  # no write was started, or it was cancelled: say so, or D keeps the blocks until write_by
                self._say_void(msg.decode_worker_id, tid)
            raise
        finally:
            await self.aengine.call(lambda: self.engine.release_kv(req_id))
        return PrefillResult(
            req_id, first_token, final.metrics.num_cached_tokens, prefill_s, handle.num_bytes, transfer_s, final.metrics.compute_s,
        )
