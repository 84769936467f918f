"""OpenAI protocol: request validation, SamplingParams mapping, error shapes, and responses the real client parses."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from splitserve.engine.sampling_params import SamplingParams
from splitserve.openai_protocol import (
    ChatCompletionRequest,
    TextEvents,
    CompletionRequest,
    chat_chunk,
    chat_completion_response,
    chat_usage_chunk,
    completion_chunk,
    completion_response,
    completion_usage_chunk,
    error_body,
    models_list,
    sse_event,
    usage_info,
    validation_error_body,
    validation_error_message,
)

pytestmark = pytest.mark.unit

MSGS = [{"role": "user", "content": "hi"}]


def completion(**kw) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hello", **kw})


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MSGS, **kw})


def error_of(factory, **kw) -> str:
    with pytest.raises(ValidationError) as info:
        factory(**kw)
    return validation_error_message(info.value)


# --- requests ---------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, text, ids",
    [("hello", "hello", None), (["hello"], "hello", None), ([1, 2, 3], None, [1, 2, 3]), ([[4, 5]], None, [4, 5])],
)
def test_prompt_forms_normalise_to_text_or_token_ids(prompt, text, ids):
    request = completion(prompt=prompt)
    assert (request.prompt_text, request.prompt_token_ids) == (text, ids)


@pytest.mark.parametrize(
    "prompt, fragment",
    [
        (["a", "b"], "prompt: batched prompts are not supported (2 prompts in one request)"),
        ([[1], [2], [3]], "batched prompts are not supported (3 prompts"),
        ([], "prompt: prompt must be a string, a list of token ids"),
        ([1, "a"], "prompt: prompt must be a string"),
        (5, "prompt: prompt must be a string"),
        ([3, -1], "prompt: prompt token ids must be >= 0"),
    ],
)
def test_bad_prompts_are_refused_naming_the_field(prompt, fragment):
    assert fragment in error_of(completion, prompt=prompt)


def test_missing_prompt_and_messages_are_named():
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m"})
    assert validation_error_message(info.value) == "prompt: Field required"
    assert "messages: List should have at least 1 item" in error_of(chat, messages=[])


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("max_tokens", 0, "max_tokens: Input should be greater than or equal to 1"),
        ("temperature", -0.5, "temperature: Input should be greater than or equal to 0"),
        ("top_p", 0, "top_p: Input should be greater than 0"),
        ("top_p", 1.5, "top_p: Input should be less than or equal to 1"),
        ("top_k", -2, "top_k: top_k must be -1 or 0 (disabled) or an integer >= 1, got -2"),
        ("stop_token_ids", [1, -3], "stop_token_ids.1: Input should be greater than or equal to 0"),
        ("stop", 5, "stop: Input should be a valid string"),
        ("max_tokens", "many", "max_tokens: Input should be a valid integer"),
        # issue 9: what the sampler's int64 tensors cannot hold, and labels /metrics cannot print
        ("top_k", 2**63, "top_k: Input should be less than or equal to 9223372036854775807"),
        ("max_tokens", 2**64, "max_tokens: Input should be less than or equal to 9223372036854775807"),
        ("priority", -(2**63) - 1, "priority: Input should be greater than or equal to -9223372036854775808"),
        ("stop_token_ids", [2**63], "stop_token_ids.0: Input should be less than or equal to 9223372036854775807"),
        ("tenant", "\ud800", "tenant: Input should be a valid string"),
        ("tenant", "a" * 65, "tenant: String should match pattern"),
        ("tenant", "team a", "tenant: String should match pattern"),
    ],
)
def test_range_errors_name_the_field(field, value, expected):
    assert expected in error_of(completion, **{field: value})
    assert expected in error_of(chat, **{field: value})


def test_seeds_and_tiny_temperatures_are_mapped_not_refused():
    params = completion(seed=2**64 + 3, temperature=1e-40, top_k=2**62).to_sampling_params(16)
    assert params.seed == 3 and params.is_greedy and params.top_k == 2**62
    assert completion(seed=-(2**63) - 1).to_sampling_params(16).seed == 2**63 - 1
    assert completion(tenant="team-a.b:c_1").tenant == "team-a.b:c_1"


def test_nan_is_refused():
    assert "temperature: Input should be a finite number" in error_of(completion, temperature=float("nan"))


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 2), ("presence_penalty", 0.5), ("frequency_penalty", -1.0), ("echo", True), ("logit_bias", {"1": 5.0}),
        ("repetition_penalty", 1.2), ("min_tokens", 3), ("best_of", 2), ("logprobs", 0), ("logprobs", 5),
        ("suffix", "x"), ("use_beam_search", True), ("prompt_logprobs", 1),
    ],
)
def test_unsupported_completion_parameters_are_refused(field, value):
    message = error_of(completion, **{field: value})
    assert message.startswith(f"{field}: {field}={value!r} is not supported by splitserve")


@pytest.mark.parametrize(
    "field, value",
    [
        ("logprobs", True), ("top_logprobs", 3), ("n", 3), ("echo", True),
        ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
        ("response_format", {"type": "json_object"}),
    ],
)
def test_unsupported_chat_parameters_are_refused(field, value):
    assert f"{field}: {field}={value!r} is not supported" in error_of(chat, **{field: value})


def test_neutral_values_of_unsupported_parameters_are_accepted():
    completion(n=1, presence_penalty=0, frequency_penalty=0.0, echo=False, logprobs=None, best_of=1,
               logit_bias={}, repetition_penalty=1.0, min_tokens=0, suffix=None)
    chat(logprobs=False, top_logprobs=0, tools=[], tool_choice="none", response_format={"type": "text"}, n=1)


def test_unknown_fields_are_ignored():
    request = completion(frobnicate=True, metadata={"a": 1})
    assert not hasattr(request, "frobnicate")


def test_chat_content_forms():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
        {"role": "developer", "content": "x", "name": "dev"},
    ]
    request = chat(messages=messages)
    assert request.conversation() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
        {"role": "developer", "content": "x"},
    ]


def test_chat_refuses_non_text_parts_and_unknown_roles():
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    message = error_of(chat, messages=[{"role": "user", "content": image}])
    assert "messages.0.content: content part of type 'image_url' is not supported" in message
    assert "messages.0.role: Input should be" in error_of(chat, messages=[{"role": "robot", "content": "x"}])


def test_stream_options():
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage
    assert not chat(stream=True).include_usage
    assert "stream_options can only be set when stream is true" in error_of(
        chat, stream_options={"include_usage": True}
    )


def test_to_sampling_params_defaults_and_mapping():
    params = completion().to_sampling_params(default_max_tokens=77)
    assert params == SamplingParams(max_tokens=77)
    params = completion(
        max_tokens=5, temperature=0, top_p=0.9, top_k=40, seed=7, stop="END", stop_token_ids=[2],
        ignore_eos=True, skip_special_tokens=False, include_stop_str_in_output=True,
    ).to_sampling_params(100)
    assert params.to_dict() == {
        "max_tokens": 5, "temperature": 0.0, "top_p": 0.9, "top_k": 40, "seed": 7, "stop": ["END"],
        "stop_token_ids": [2], "ignore_eos": True, "skip_special_tokens": False, "include_stop_str_in_output": True,
        "stream_interval": 1,  # set by the server (http.stream_interval), not by the client
    }
    assert params.is_greedy


def test_chat_max_completion_tokens_wins():
    assert chat(max_tokens=10, max_completion_tokens=3).to_sampling_params(100).max_tokens == 3
    assert chat(max_tokens=10).to_sampling_params(100).max_tokens == 10
    message = error_of(chat, max_completion_tokens=0)
    assert "max_completion_tokens: Input should be greater than or equal to 1" in message


def test_sampling_params_value_error_propagates_naming_the_field():
    with pytest.raises(ValueError, match="stop must be a list of non-empty strings"):
        completion(stop=["ok", ""]).to_sampling_params(16)


def test_extensions_priority_and_tenant():
    request = chat(priority=3, tenant="team-a")
    assert (request.priority, request.tenant) == (3, "team-a")
    assert (completion().priority, completion().tenant) == (0, None)


def test_continue_final_message_needs_no_generation_prompt():
    assert "add_generation_prompt=false" in error_of(chat, continue_final_message=True)
    chat(continue_final_message=True, add_generation_prompt=False)


# --- errors -----------------------------------------------------------------


def test_error_body_shape():
    assert error_body("bad", param="max_tokens", code=400) == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "max_tokens", "code": 400}
    }
    assert error_body("busy", type_="server_overloaded")["error"]["param"] is None


def test_validation_error_body_names_first_param_and_all_problems():
    with pytest.raises(ValidationError) as info:
        completion(max_tokens=0, top_p=2)
    body = validation_error_body(info.value)["error"]
    assert body["param"] == "max_tokens" and body["code"] == 400
    assert body["message"] == (
        "max_tokens: Input should be greater than or equal to 1; top_p: Input should be less than or equal to 1"
    )


# --- responses --------------------------------------------------------------


def test_sse_event_framing():
    assert sse_event("[DONE]") == b"data: [DONE]\n\n"
    assert sse_event({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert sse_event("x\ny") == b"data: x\ndata: y\n\n"


def test_builders_ids_usage_and_models():
    body = completion_response("abc", "m", "hi", "length", 3, 4, created=5)
    assert body["id"] == "cmpl-abc" and body["object"] == "text_completion" and body["created"] == 5
    assert body["usage"] == usage_info(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert chat_completion_response("chatcmpl-x", "m", "", "stop", 1, 0)["id"] == "chatcmpl-x"
    assert chat_chunk("x", "m", "", role="assistant")["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chat_chunk("x", "m", None, finish_reason="stop")["choices"][0]["delta"] == {}
    assert models_list(["a"], created=1) == {
        "object": "list", "data": [{"id": "a", "object": "model", "created": 1, "owned_by": "splitserve"}]
    }
    with pytest.raises(AssertionError):
        completion_response("x", "m", "", None, 1, 1)
    with pytest.raises(AssertionError):
        chat_chunk("x", "m", "t", finish_reason="abort")


def test_whole_responses_parse_as_openai_types():
    openai_types = pytest.importorskip("openai.types")
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    done = openai_types.Completion.model_validate(completion_response("r", "m", "hi", "stop", 2, 1))
    assert done.choices[0].text == "hi" and done.usage.total_tokens == 3
    chat_done = ChatCompletion.model_validate(chat_completion_response("r", "m", "yo", "length", 2, 5))
    assert chat_done.choices[0].message.content == "yo" and chat_done.choices[0].finish_reason == "length"
    assert chat_done.object == "chat.completion" and chat_done.id == "chatcmpl-r"
    first = ChatCompletionChunk.model_validate(chat_chunk("r", "m", "", role="assistant"))
    assert first.choices[0].delta.role == "assistant" and first.choices[0].finish_reason is None
    usage = ChatCompletionChunk.model_validate(chat_usage_chunk("r", "m", 2, 5))
    assert usage.choices == [] and usage.usage.completion_tokens == 5
    assert openai_types.Completion.model_validate(completion_usage_chunk("r", "m", 1, 1)).usage.total_tokens == 2


def _client(handler):
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    return openai.OpenAI(api_key="k", base_url="http://ingress/v1", http_client=httpx.Client(
        transport=httpx.MockTransport(handler)), max_retries=0)


def _sse(*events: dict | str) -> bytes:
    return b"".join(sse_event(e) for e in events)


def test_real_client_streams_chat_and_its_request_validates():
    import httpx

    seen: list[ChatCompletionRequest] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(ChatCompletionRequest.model_validate(json.loads(request.content)))
        body = _sse(
            chat_chunk("r", "m", "", role="assistant", created=9), chat_chunk("r", "m", "Hel", created=9),
            chat_chunk("r", "m", "lo", finish_reason="stop", created=9), chat_usage_chunk("r", "m", 4, 2, created=9),
            "[DONE]",
        )
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    stream = _client(handler).chat.completions.create(
        model="m", messages=MSGS, stream=True, stream_options={"include_usage": True},
        max_completion_tokens=8, temperature=0, seed=1, stop=["\n"], extra_body={"priority": 2, "top_k": 5},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, None, "stop"]
    assert chunks[-1].usage.total_tokens == 6 and all(c.id == "chatcmpl-r" for c in chunks)
    request = seen[0]
    assert request.include_usage and request.priority == 2
    assert request.to_sampling_params(100) == SamplingParams(max_tokens=8, temperature=0, top_k=5, seed=1, stop=["\n"])


def test_real_client_completions_stream_whole_and_models():
    import httpx

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json=models_list(["m", "n"]))
        body = json.loads(request.content)
        CompletionRequest.model_validate(body)
        if not body.get("stream"):
            return httpx.Response(200, json=completion_response("r", "m", "abc", "length", 3, 3))
        events = _sse(completion_chunk("r", "m", "a"), completion_chunk("r", "m", "b", "stop"), "[DONE]")
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events)

    client = _client(handler)
    whole = client.completions.create(model="m", prompt=[1, 2, 3], max_tokens=3)
    assert whole.choices[0].text == "abc" and whole.choices[0].finish_reason == "length"
    streamed = list(client.completions.create(model="m", prompt="x", stream=True))
    assert [c.choices[0].text for c in streamed] == ["a", "b"]
    assert streamed[-1].choices[0].finish_reason == "stop" and streamed[0].id == "cmpl-r"
    assert [m.id for m in client.models.list()] == ["m", "n"]


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
@pytest.mark.parametrize("text", ["", "Paris", 'quote " and \\ back', "line\nbreak\ttab", "é世界🙂", "\x00\x1f"])
def test_text_events_are_the_same_bytes_as_the_whole_chunk(chat, text):
    """The preformatted event (head + the text's JSON + tail) equals encoding the whole chunk, whatever the text."""
    events = TextEvents("r-1", "smol", 1700000000, chat)
    whole = chat_chunk("r-1", "smol", text, created=1700000000) if chat else completion_chunk("r-1", "smol", text, created=1700000000)
    assert events.event(text) == sse_event(whole)
    odd = TextEvents("r-1", "model\x00name", 1700000000, chat)  # the marker in the model name: the slow path
    whole = chat_chunk("r-1", "model\x00name", text, created=1700000000) if chat else completion_chunk("r-1", "model\x00name", text, created=1700000000)
    assert odd.event(text) == sse_event(whole)
