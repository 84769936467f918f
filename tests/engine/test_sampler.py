"""Sampler: greedy, top-k, top-p, temperature and per-request seeds independent of the batch."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from splitserve.engine.sampler import SampleFailed, _filter_top_k_top_p, sample, sample_rows
from splitserve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.unit

VOCAB = 50
N_DRAWS = 4000


def random_logits(n: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


def draws(logits_row: torch.Tensor, params: SamplingParams, n: int = N_DRAWS, seed: int = 0) -> list[int]:
    """``n`` independent draws from one row (the row repeated ``n`` times in one batch)."""
    logits = logits_row.unsqueeze(0).repeat(n, 1)
    return sample(logits, [params] * n, [None] * n, torch.Generator().manual_seed(seed))


def permuted_logits(probs: list[float], seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Logits with the given probabilities at shuffled vocabulary positions; returns (logits, ids by rank)."""
    perm = torch.randperm(len(probs), generator=torch.Generator().manual_seed(seed)).tolist()
    logits = torch.empty(len(probs))
    for rank, p in enumerate(probs):
        logits[perm[rank]] = math.log(p)
    return logits, perm


def test_greedy_is_argmax():
    logits = random_logits(8)
    out = sample(logits, [SamplingParams(temperature=0.0)] * 8, [None] * 8, torch.Generator())
    assert out == logits.argmax(-1).tolist()


@pytest.mark.parametrize("params", [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(top_k=1, temperature=5.0),
                                    SamplingParams(top_p=1e-6, temperature=5.0)], ids=["k1", "tiny_p", "k1_hot", "tiny_p_hot"])
def test_top_k_one_and_tiny_top_p_are_greedy(params):
    logits = random_logits(64, seed=1, scale=0.5)  # flat: a plain draw would rarely hit the argmax
    for seed in range(3):
        assert sample(logits, [params] * 64, [None] * 64, torch.Generator().manual_seed(seed)) == logits.argmax(-1).tolist()


def test_top_k_restricts_draws_to_the_k_most_likely():
    row = random_logits(1, seed=2, scale=0.3)[0]  # nearly flat, so all k tokens show up
    allowed = set(row.topk(5).indices.tolist())
    got = Counter(draws(row, SamplingParams(top_k=5)))
    assert set(got) == allowed


@pytest.mark.parametrize("top_p, kept_ranks", [(0.45, 1), (0.7, 2), (0.9, 3), (0.97, 4), (1.0, 5)])
def test_top_p_keeps_the_nucleus(top_p, kept_ranks):
    probs = [0.5, 0.3, 0.15, 0.04, 0.01]
    logits, ids_by_rank = permuted_logits(probs, seed=3)
    masked = _filter_top_k_top_p(logits.unsqueeze(0), torch.tensor([-1]), torch.tensor([top_p]))[0]
    assert {i for i in range(len(probs)) if masked[i] > float("-inf")} == set(ids_by_rank[:kept_ranks])
    # kept logits are untouched (scattered back to their own ids)
    assert torch.equal(masked[ids_by_rank[:kept_ranks]], logits[ids_by_rank[:kept_ranks]])
    got = Counter(draws(logits, SamplingParams(top_p=top_p)))
    assert set(got) <= set(ids_by_rank[:kept_ranks])
    total = sum(probs[:kept_ranks])
    for rank in range(kept_ranks):  # renormalised over the nucleus
        expected = probs[rank] / total
        assert abs(got[ids_by_rank[rank]] / N_DRAWS - expected) < 0.035, (rank, got)


def test_top_k_and_top_p_combine():
    probs = [0.3, 0.25, 0.2, 0.15, 0.1]
    logits, ids_by_rank = permuted_logits(probs, seed=4)
    assert set(draws(logits, SamplingParams(top_k=3, top_p=0.5))) == set(ids_by_rank[:2])  # top-p binds
    assert set(draws(logits, SamplingParams(top_k=2, top_p=0.9))) == set(ids_by_rank[:2])  # top-k binds


def test_disabled_filters_keep_every_token_even_when_another_row_filters():
    """top_p=1 and top_k=-1 must be a no-op, also for a row whose tail probabilities round away in float32."""
    peaked = torch.tensor([20.0, 0.0, -5.0] + [-1.0] * (VOCAB - 3))
    batch = torch.stack([peaked, random_logits(1, seed=5)[0]])
    masked = _filter_top_k_top_p(batch, torch.tensor([-1, 3]), torch.tensor([1.0, 1.0]))
    assert torch.equal(masked[0], peaked), "an unfiltered row must come back unchanged"
    assert (masked[1] > float("-inf")).sum() == 3


def test_seeded_request_is_independent_of_its_batch():
    row = random_logits(1, seed=6, scale=0.5)[0]
    seeded = SamplingParams(temperature=1.0, seed=7)

    def run(companions: list[tuple[torch.Tensor, SamplingParams]], position: int, steps: int = 20) -> list[int]:
        gen = torch.Generator().manual_seed(7)
        default = torch.Generator().manual_seed(99)
        logits_rows = [c[0] for c in companions]
        params = [c[1] for c in companions]
        gens: list[torch.Generator | None] = [torch.Generator().manual_seed(1000 + i) if p.seed is not None else None for i, p in enumerate(params)]
        logits_rows.insert(position, row)
        params.insert(position, seeded)
        gens.insert(position, gen)
        return [sample(torch.stack(logits_rows), params, gens, default)[position] for _ in range(steps)]

    alone = run([], 0)
    others = random_logits(4, seed=8)
    mixed = [
        (others[0], SamplingParams(temperature=0.0)),
        (others[1], SamplingParams(temperature=0.7, top_k=3)),
        (others[2], SamplingParams(temperature=1.3, top_p=0.5, seed=3)),
        (others[3], SamplingParams(temperature=1.0)),
    ]
    assert run(mixed, 0) == alone
    assert run(mixed, 2) == alone
    assert run(mixed, 4) == alone
    assert run(mixed[1:3], 1) == alone
    assert len(set(alone)) > 3, "the draws should vary (a flat row), or this test proves nothing"
    # and a different seed gives a different stream
    gen = torch.Generator().manual_seed(8)
    other_seed = [sample(row.unsqueeze(0), [seeded], [gen], torch.Generator())[0] for _ in range(20)]
    assert other_seed != alone


def _entropy(tokens: list[int]) -> float:
    counts = Counter(tokens)
    n = len(tokens)
    return -sum(c / n * math.log(c / n) for c in counts.values())


def test_temperature_controls_the_spread_of_draws():
    row = torch.tensor([3.0, 2.5, 2.0, 1.0] + [0.0] * (VOCAB - 4))
    cold = draws(row, SamplingParams(temperature=0.02))
    neutral = draws(row, SamplingParams(temperature=1.0))
    hot = draws(row, SamplingParams(temperature=10.0))
    assert set(cold) == {0}  # a logit gap of 0.5 at T=0.02 is a factor e^25
    assert _entropy(cold) < 0.01 < _entropy(neutral) < _entropy(hot)
    assert _entropy(hot) > 0.9 * math.log(VOCAB)  # nearly uniform
    assert Counter(neutral)[0] / N_DRAWS == pytest.approx(math.exp(3) / (math.exp(3) + math.exp(2.5) + math.exp(2) + math.exp(1) + VOCAB - 4), abs=0.03)


# ---- one row cannot fail the batch (issue 9, finding 1) ------------------------------------


def _mixed_batch() -> tuple[torch.Tensor, list[SamplingParams]]:
    logits = random_logits(4, seed=11, scale=0.5)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=5),
              SamplingParams(temperature=0.9, top_k=7, seed=6), SamplingParams(temperature=1.1, top_p=0.8, seed=7)]
    return logits, params


def _seeded_draws(logits: torch.Tensor, params: list[SamplingParams]) -> list:
    gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
    return sample_rows(logits, params, gens, torch.Generator().manual_seed(0))


def test_a_non_finite_row_fails_alone_and_the_others_draw_the_same_tokens():
    logits, params = _mixed_batch()
    clean = _seeded_draws(logits, params)
    poisoned = logits.clone()
    poisoned[2] = float("nan")
    got = _seeded_draws(poisoned, params)
    assert isinstance(got[2], SampleFailed) and "not finite" in str(got[2])
    assert [got[i] for i in (0, 1, 3)] == [clean[i] for i in (0, 1, 3)]
    with pytest.raises(SampleFailed):  # the all-or-nothing wrapper still raises
        sample(poisoned, params, [None] * 4, torch.Generator())


def test_a_batch_the_vectorised_path_cannot_hold_is_sampled_row_by_row():
    """A value that breaks the batched tensors (it bypassed validation) fails its row only; seeds are unaffected."""
    logits, params = _mixed_batch()
    clean = _seeded_draws(logits, params)
    broken = SamplingParams(temperature=1.0)
    broken.top_p = "wide"  # bypasses __post_init__: torch.tensor([...]) raises for the whole batch
    params = params[:3] + [broken]
    got = _seeded_draws(logits, params)
    assert isinstance(got[3], SampleFailed)
    assert got[:3] == clean[:3]


def test_top_k_beyond_the_vocabulary_keeps_every_token():
    row = random_logits(1, seed=12, scale=0.3)[0]
    huge = Counter(draws(row, SamplingParams(top_k=2**63 - 1), n=2000, seed=3))
    off = Counter(draws(row, SamplingParams(top_k=-1), n=2000, seed=3))
    assert huge == off


def test_argmax_rows_is_torch_argmax_exactly():
    """The greedy path's numpy argmax (CPU float32) gives torch's answer: first of tied maxima, NaN as the maximum."""
    from splitserve.engine.sampler import argmax_rows

    g = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(64, 4099, generator=g),
        torch.randint(0, 3, (16, 1000), generator=g).float(),  # many ties
        torch.full((2, 50), float("-inf")),
        torch.randn(1, 49152, generator=g),
        torch.randn(8, 300, generator=g)[::2, 7:],  # a strided view
    ]
    nan = torch.randn(3, 100, generator=g)
    nan[1, 40] = nan[1, 70] = float("nan")
    cases.append(nan)
    with torch.inference_mode():
        cases.append(torch.randn(5, 77, generator=g))  # what the engine's forward hands the sampler
    cases.append(torch.randn(4, 33, generator=g).double())  # not float32: torch's own argmax
    for logits in cases:
        assert argmax_rows(logits) == logits.argmax(dim=-1).tolist()
