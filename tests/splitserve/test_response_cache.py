"""The response cache's pure logic: which requests it keys, what it keeps, what it drops and when."""

from __future__ import annotations

import dataclasses

import argparse

import pytest

from splitserve.config import ServeConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.response_cache import CachedGeneration, ResponseCache, cache_key, is_deterministic
from splitserve.serve_cli import add_serve_parser, config_from_args

PROMPT = [5, 17, 99, 1024]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def answer(text: str = "hello", n: int = 3, finish: str = "length") -> CachedGeneration:
    return CachedGeneration(text, tuple(range(n)), finish, len(PROMPT))


def test_greedy_and_seeded_requests_are_keyed_sampled_ones_are_not():
    assert is_deterministic(SamplingParams(temperature=0.0))
    assert is_deterministic(SamplingParams(temperature=1e-6))  # below the greedy threshold, as the sampler treats it
    assert is_deterministic(SamplingParams(temperature=0.8, seed=7))
    assert not is_deterministic(SamplingParams(temperature=0.8))
    assert cache_key(PROMPT, SamplingParams(temperature=0.8)) is None
    assert cache_key(PROMPT, SamplingParams(temperature=0.0)) is not None


def test_the_key_is_the_prompt_and_every_setting_that_shapes_the_output():
    base = SamplingParams(max_tokens=8, temperature=0.7, seed=3)
    key = cache_key(PROMPT, base)
    assert key == cache_key(list(PROMPT), SamplingParams(max_tokens=8, temperature=0.7, seed=3))  # equal requests, equal keys
    assert key == cache_key(PROMPT, dataclasses.replace(base, stream_interval=4))  # only groups tokens into events
    assert cache_key(PROMPT[:-1], base) != key
    assert cache_key([*PROMPT, 1], base) != key
    changed = {
        "max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "seed": 1, "stop": ["x"], "stop_token_ids": [2],
        "ignore_eos": True, "skip_special_tokens": False, "include_stop_str_in_output": True,
    }
    untested = {f.name for f in dataclasses.fields(SamplingParams)} - set(changed) - {"stream_interval"}
    assert not untested, f"a new sampling setting must be in the key (or named here as not shaping output): {untested}"
    keys = {cache_key(PROMPT, dataclasses.replace(base, **{name: value})) for name, value in changed.items()}
    assert None not in keys and key not in keys and len(keys) == len(changed)


def test_a_stored_answer_comes_back_and_counts_as_a_hit():
    cache = ResponseCache(max_entries=4, max_bytes=1 << 20, ttl_s=60)
    key = cache_key(PROMPT, SamplingParams(temperature=0.0))
    assert cache.get(key) is None
    assert cache.put(key, answer("the sea"))
    assert cache.get(key) == answer("the sea")
    assert (cache.counters.hits, cache.counters.misses, cache.counters.stores) == (1, 1, 1)
    assert cache.put(key, answer("the sky"))  # the same key again replaces, it does not double-count bytes
    assert len(cache) == 1 and cache.nbytes == answer("the sky").nbytes


@pytest.mark.parametrize("finish", ["error", "abort", "cancelled", "timeout"])
def test_only_whole_answers_are_kept(finish):
    cache = ResponseCache(max_entries=4, max_bytes=1 << 20, ttl_s=60)
    assert not cache.put(b"k", answer(finish=finish))
    assert len(cache) == 0 and cache.get(b"k") is None


def test_the_least_recently_used_answer_goes_first_when_entries_run_out():
    cache = ResponseCache(max_entries=2, max_bytes=1 << 20, ttl_s=60)
    cache.put(b"a", answer("a"))
    cache.put(b"b", answer("b"))
    assert cache.get(b"a") is not None  # a is now the more recently used
    cache.put(b"c", answer("c"))
    assert cache.get(b"b") is None and cache.get(b"a") is not None and cache.get(b"c") is not None
    assert cache.counters.evictions == 1


def test_the_byte_bound_evicts_old_answers_and_refuses_one_too_large_alone():
    one = answer("x" * 1000, n=10).nbytes
    cache = ResponseCache(max_entries=100, max_bytes=2 * one + 10, ttl_s=60)
    for k in (b"a", b"b", b"c"):
        assert cache.put(k, answer("x" * 1000, n=10))
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes and cache.get(b"a") is None
    assert not cache.put(b"huge", answer("y" * (3 * one)))
    assert cache.get(b"b") is not None and cache.get(b"c") is not None  # a refused answer evicts nothing
    assert cache.nbytes == 2 * one


def test_an_answer_older_than_the_ttl_is_not_returned_and_frees_its_bytes():
    clock = Clock()
    cache = ResponseCache(max_entries=4, max_bytes=1 << 20, ttl_s=10, clock=clock)
    cache.put(b"a", answer())
    clock.now += 9.9
    assert cache.get(b"a") is not None
    clock.now += 0.2
    assert cache.get(b"a") is None
    assert len(cache) == 0 and cache.nbytes == 0


def test_bounds_must_be_positive():
    for bad in ({"max_entries": 0}, {"max_bytes": 0}, {"ttl_s": 0}):
        with pytest.raises(ValueError):
            ResponseCache(**{"max_entries": 1, "max_bytes": 1, "ttl_s": 1.0, **bad})


def test_the_cache_is_off_by_default_and_set_by_flag_or_config():
    def cli(*argv: str) -> ServeConfig:
        parser = argparse.ArgumentParser()
        add_serve_parser(parser.add_subparsers())
        return config_from_args(parser.parse_args(["serve", *argv]))

    assert cli().response_cache.max_entries == 0
    assert cli("--response-cache", "4096").response_cache.max_entries == 4096
    assert ServeConfig(response_cache={"max_entries": 8, "ttl_s": 5}).response_cache.ttl_s == 5
    with pytest.raises(ValueError, match="max_entries"):
        ServeConfig(response_cache={"max_entries": -1})
