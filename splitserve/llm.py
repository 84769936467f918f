"""Offline generation in-process, shaped like vLLM's ``LLM`` so users know it.

    from splitserve import LLM, SamplingParams
    llm = LLM(model="/path/to/checkpoint", dtype="bfloat16")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    print(outs[0].text, outs[0].token_ids, outs[0].finish_reason, outs[0].metrics.time_to_first_token)

The same engine runs inside the prefill and decode workers; this class is also the
correctness oracle that the served paths are compared against.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.sampling_params import SamplingParams

PromptInput = str | Seq[int] | dict


def _normalize_prompts(prompts: PromptInput | Seq[PromptInput]) -> list[str | list[int]]:
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    elif isinstance(prompts, Seq) and prompts and isinstance(prompts[0], int):
        prompts = [prompts]  # a single list of token ids
    out: list[str | list[int]] = []
    for p in prompts:
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                out.append(list(p["prompt_token_ids"]))
            elif "prompt" in p:
                out.append(p["prompt"])
            else:
                raise ValueError(f"prompt dicts need 'prompt' or 'prompt_token_ids', got keys {sorted(p)}")
        elif isinstance(p, str):
            out.append(p)
        elif isinstance(p, Seq):
            out.append(list(p))
        else:
            raise ValueError(f"each prompt must be a string or a list of token ids, got {type(p).__name__}")
    return out


class LLM:
    """An engine in this process; ``generate`` runs every prompt to completion."""

    def __init__(self, model: str | None = None, dtype: str = "auto", **engine_kwargs: Any):
        self.engine = LLMEngine(EngineConfig(model=model, dtype=dtype, **engine_kwargs))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Seq[PromptInput],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Outputs in the order of ``prompts``. A bad prompt raises before any request runs."""
        items = _normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(items) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(items):
            raise ValueError(f"got {len(items)} prompts but {len(params)} sampling params; pass one, or one per prompt")
        req_ids: list[str] = []
        try:
            for prompt, sp in zip(items, params):
                req_ids.append(self.engine.add_request(prompt, sp))
        except Exception:
            for rid in req_ids:
                self.engine.abort_request(rid)
            raise
        finals: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(req_ids), desc="generate", unit="req", disable=not use_tqdm or len(req_ids) < 2)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finals[out.req_id] = out
                        bar.update(1)
        except BaseException:
            for rid in req_ids:
                self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [finals[r] for r in req_ids]
