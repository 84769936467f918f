"""Warming an engine up before it serves: throwaway requests through a prompt step and a few decode steps.

Two things depend on it. The first steps of a fresh process pay one-time costs (kernel
selection and set-up, first-touch memory, on a GPU the library handles), which would land
on the first user's request. And the step costs the engine measures as it runs
(``StepCosts``: a decode step, a prompt token) are what the router's local-prefill budget and
the SLO rules read: until a worker has measured them, every prompt goes through a prefill
worker and the SLO rules do not estimate, which on a fresh worker meant its first dozen or so
requests after start-up.

Two rounds run, each one request to completion: the first pays the one-time costs, then the
measured costs are cleared and the second measures. Afterwards the engine keeps only those
costs: no request, no cached prefix, no counters of work done.
"""

from __future__ import annotations

import logging
import time

from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.slo_policy import StepCosts

logger = logging.getLogger(__name__)


def warm_up(engine: LLMEngine, num_prompt_tokens: int = 32, num_decode_steps: int = 2) -> None:
    """Run the two rounds described above on ``engine`` (which must have no requests); call it on the thread that
    will step the engine, as its costs depend on the thread (``ModelRunner.steps_off_main_thread``)."""
    if engine.has_unfinished_requests():
        raise RuntimeError("warm_up needs an idle engine")
    vocab = engine.model_config.vocab_size
    room = min(engine.max_model_len, engine.pool.num_blocks * engine.block_size) - num_decode_steps - 2  # a tiny pool too
    num_prompt_tokens = min(num_prompt_tokens, room)
    if num_prompt_tokens < 1:
        logger.info("no warm-up: the KV pool or the context is too small for a throwaway request")
        return
    params = SamplingParams(max_tokens=num_decode_steps + 1, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for round_ in range(2):
        engine.scheduler.costs = StepCosts()
        engine.decode_step_s = 0.0
        # different tokens in each round, so the second is not served from the first's cached prefix
        first = 1 + round_ * num_prompt_tokens
        engine.add_request([(first + i) % vocab for i in range(num_prompt_tokens)], params, req_id=f"warm-up-{round_}")
        while engine.has_unfinished_requests():
            engine.step()
    pool = engine.pool
    if pool.enable_prefix_caching:
        pool.reset_prefix_cache()
    pool.num_prefix_hits = pool.num_prefix_queries = 0
    engine.busy_s = 0.0
    engine.num_step_tokens = 0
    costs = engine.scheduler.costs
    logger.info("engine warmed up in %.2f s: decode step %.1f ms, prompt token %.3f ms (%d-token prompt step)",
                time.perf_counter() - start, 1e3 * (costs.decode_step_s or 0.0), 1e3 * (costs.prompt_step_s_per_token or 0.0),
                num_prompt_tokens)
