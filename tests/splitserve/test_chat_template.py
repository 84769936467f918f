"""``ChatTemplateRenderer``: the model's template renders exactly as transformers renders it, and every bomb is bounded.

Issue 9, finding 2: a 192-byte template with two nested ``range(30000)`` loops
stalled the ingress for 30 s, and a 135-byte body became a 4.2 MB prompt. Here
each known way to spend time or memory in a template stops at its limit within
a bounded time, with ``TemplateLimitExceeded`` (the ingress's HTTP 400).
"""

from __future__ import annotations

import time

import jinja2
import pytest

from splitserve.chat_template import ChatTemplateRenderer, RenderLimits, TemplateLimitExceeded
from splitserve.engine.tokenizer import load_tokenizer

pytestmark = pytest.mark.unit

LIMITS = RenderLimits(timeout_s=0.3, max_chars=200_000)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the sea."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How"}],
    [{"role": "user", "content": "ünïcödé 😀 <b>&amp;</b> {{ not a template }}"}],
]


# the default model's (SmolLM2-135M-Instruct) template, as its converted checkpoint ships it
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tokenizer(request, tiny_model):
    tok = load_tokenizer(tiny_model)
    if request.param == "smollm2":
        tok.chat_template = SMOLLM2_TEMPLATE
    return tok


def renderer_for(tok, limits: RenderLimits = LIMITS) -> ChatTemplateRenderer:
    return ChatTemplateRenderer(tok.get_chat_template(), tok.special_tokens_map, limits)


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_the_models_template_renders_as_transformers_renders_it(tokenizer, conversation):
    r = renderer_for(tokenizer)
    for add_generation_prompt in (True, False):
        expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert r.render(conversation, add_generation_prompt=add_generation_prompt) == expected
    if conversation[-1]["role"] == "assistant":
        expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=False, continue_final_message=True, tokenize=False)
        assert r.render(conversation, add_generation_prompt=False, continue_final_message=True) == expected


def test_a_client_template_sees_messages_special_tokens_and_variables(tokenizer):
    r = renderer_for(tokenizer)
    template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}|{{ m.content }}]{% endfor %}{{ flavour }}{{ messages|tojson }}"
    out = r.render(CONVERSATIONS[1], add_generation_prompt=True, template=template, variables={"flavour": "salty"})
    assert out.startswith(tokenizer.special_tokens_map["bos_token"] + "[system|Be brief.][user|Tell me about the sea.]salty[")


BOMBS = {
    "nested_ranges": "{% for i in range(30000) %}{% for j in range(30000) %}{% endfor %}{% endfor %}",
    "range_too_long": "{% for i in range(10**7) %}{% endfor %}",
    "string_times": "{{ 'x' * 100000000 }}",
    "doubling_concat": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "doubling_plus": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "center_filter": "{{ 'x'|center(1000000000) }}",
    "ljust_method": "{{ 'x'.ljust(1000000000) }}",
    "percent_width": "{{ '%1000000000s' % 'x' }}",
    "format_width": "{{ '{:>1000000000}'.format('x') }}",
    "format_filter": "{{ '%1000000000s'|format('x') }}",
    "big_power": "{{ 7 ** 100000 }}",
    "exponential_macro": "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "replace_blowup": "{% set s = 'a' * 10000 %}{{ s|replace('a', s) }}",
    "replace_method": "{% set s = 'a' * 10000 %}{{ s.replace('a', s) }}",
    "indent_blowup": "{% set s = '\\n' * 60000 %}{{ s|indent(60000) }}",
    "expandtabs": "{% set s = '\\t' * 60000 %}{{ s.expandtabs(60000) }}",
    "output_flood": "{% for i in range(60000) %}{{ 'y' * 1000 }}{% endfor %}",
    "tojson_indent": "{{ messages|tojson(indent=100000000) }}",
    "loop_over_messages_cubed": "{% for a in messages %}{% for b in messages %}{% for c in messages %}{% endfor %}{% endfor %}{% endfor %}",
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_template_bombs_stop_at_their_limit(tokenizer, name):
    r = renderer_for(tokenizer)
    messages = [{"role": "user", "content": "x"}] * (2000 if name == "loop_over_messages_cubed" else 1)
    t0 = time.monotonic()
    with pytest.raises((TemplateLimitExceeded, jinja2.TemplateError)):
        r.render(messages, add_generation_prompt=True, template=BOMBS[name])
    assert time.monotonic() - t0 < LIMITS.timeout_s + 1.0  # at the deadline at worst (generous for a loaded machine)


def test_the_sandbox_still_blocks_attribute_escapes(tokenizer):
    r = renderer_for(tokenizer)
    with pytest.raises(jinja2.exceptions.SecurityError):
        r.render(CONVERSATIONS[0], add_generation_prompt=True, template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        r.render(CONVERSATIONS[0], add_generation_prompt=True, template="{% set ns = namespace() %}{% set ns._x = 1 %}")
