"""BlockPool: reference counts, LRU reuse of cached prefixes, chained hashes, error messages."""

from __future__ import annotations

import ast
from collections import OrderedDict
import os
import random
import subprocess
import sys

import pytest

from splitserve.engine.block_pool import NONE_HASH, BlockPool, NoFreeBlocks, compute_block_hashes, hash_block

pytestmark = pytest.mark.unit

BS = 4


def cached_pool(num_blocks: int, hashes: list[int]) -> tuple[BlockPool, list[int]]:
    """A pool whose first ``len(hashes)`` allocated blocks hold those hashes and are already freed."""
    pool = BlockPool(num_blocks, BS)
    blocks = pool.allocate(len(hashes))
    for b, h in zip(blocks, hashes):
        pool.register(b, h)
    pool.free(blocks)
    return pool, blocks


def test_allocate_and_free_count_blocks():
    pool = BlockPool(8, BS)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert len(set(a + b)) == 8 and set(a + b) == set(range(8))
    assert pool.num_free_blocks == 0 and pool.num_used_blocks == 8
    assert all(pool.ref_count(i) == 1 for i in a + b)
    assert not pool.can_allocate(1) and pool.can_allocate(0)
    pool.free(a)
    assert pool.num_free_blocks == 3 and pool.can_allocate(3) and not pool.can_allocate(4)
    assert all(pool.ref_count(i) == 0 for i in a)
    assert pool.allocate(0) == []


def test_double_free_asserts():
    pool = BlockPool(4, BS)
    blocks = pool.allocate(2)
    pool.free(blocks)
    with pytest.raises(AssertionError, match=f"double free of KV block {blocks[1]}"):
        pool.free(blocks)
    never_allocated = ({0, 1, 2, 3} - set(blocks)).pop()
    with pytest.raises(AssertionError, match="double free"):
        pool.free([never_allocated])


def test_shared_block_freed_only_when_last_reference_drops():
    h = hash_block(NONE_HASH, [1, 2, 3, 4])
    pool = BlockPool(4, BS)
    [b] = pool.allocate(1)
    pool.register(b, h)
    assert pool.lookup_prefix([h]) == [b]
    assert pool.ref_count(b) == 2
    pool.free([b])
    assert pool.ref_count(b) == 1 and pool.num_free_blocks == 3
    pool.free([b])
    assert pool.ref_count(b) == 0 and pool.num_free_blocks == 4


def test_freed_block_keeps_its_prefix_until_reallocated():
    h = hash_block(NONE_HASH, [7, 7, 7, 7])
    pool, [b] = cached_pool(3, [h])
    assert pool.num_free_blocks == 3  # a cached block counts as free
    assert pool.cached_prefix_len([h]) == 1 and pool.ref_count(b) == 0  # peeking takes no reference
    assert pool.lookup_prefix([h]) == [b]
    assert pool.ref_count(b) == 1 and pool.num_free_blocks == 2  # revived: out of the free list
    # while referenced it can't be handed out
    others = pool.allocate(2)
    assert b not in others
    with pytest.raises(NoFreeBlocks):
        pool.allocate(1)


def test_eviction_is_least_recently_freed_first():
    hashes = [hash_block(NONE_HASH, [i] * BS) for i in range(4)]
    pool = BlockPool(4, BS)
    blocks = pool.allocate(4)
    for b, h in zip(blocks, hashes):
        pool.register(b, h)
    for i in (2, 0, 3, 1):  # free one at a time: 2 is the oldest free block, 1 the newest
        pool.free([blocks[i]])
    assert pool.allocate(1) == [blocks[2]]
    assert pool.cached_prefix_len([hashes[2]]) == 0, "allocating a block evicts its cached prefix"
    assert hashes[2] not in pool.cached_hashes() and hashes[0] in pool.cached_hashes()
    assert pool.allocate(2) == [blocks[0], blocks[3]]
    assert pool.cached_hashes() == frozenset({hashes[1]})
    assert pool.lookup_prefix([hashes[1]]) == [blocks[1]]


def test_revived_block_goes_to_the_back_of_the_lru():
    hashes = [hash_block(NONE_HASH, [i] * BS) for i in range(3)]
    pool, blocks = cached_pool(3, hashes)  # freed tail first: blocks[2], blocks[1], blocks[0]
    pool.lookup_prefix([hashes[2]])
    pool.free([blocks[2]])  # now the most recently freed
    assert pool.allocate(2) == [blocks[1], blocks[0]]
    assert pool.cached_hashes() == frozenset({hashes[2]})


def test_free_releases_tail_blocks_first():
    """A sequence's tail is evicted before its head: the head is the part others share."""
    hashes = compute_block_hashes(list(range(3 * BS)), BS)
    pool, blocks = cached_pool(3, hashes)
    assert pool.allocate(1) == [blocks[2]]
    assert pool.cached_prefix_len(hashes) == 2


def test_lookup_prefix_takes_references_and_stops_at_first_miss():
    hashes = compute_block_hashes(list(range(4 * BS)), BS)
    pool = BlockPool(4, BS)
    blocks = pool.allocate(4)
    for b, h in zip(blocks, hashes):
        pool.register(b, h)
    pool.free([blocks[2]])
    pool.free([blocks[0], blocks[1], blocks[3]])
    [evicted] = pool.allocate(1)  # the third block is the oldest free one
    assert evicted == blocks[2]
    hits = pool.lookup_prefix(hashes)
    assert hits == blocks[:2], "the fourth block is cached but follows a miss"
    assert [pool.ref_count(b) for b in blocks] == [1, 1, 1, 0]
    missing = hash_block(NONE_HASH, [999] * BS)
    assert pool.lookup_prefix([missing] + hashes) == []
    assert pool.num_prefix_queries == 4 + 5 and pool.num_prefix_hits == 2
    pool.free(hits + [evicted])
    assert pool.num_free_blocks == 4


def test_register_first_writer_wins():
    h, g = hash_block(NONE_HASH, [1] * BS), hash_block(NONE_HASH, [2] * BS)
    pool = BlockPool(2, BS)
    a, b = pool.allocate(2)
    pool.register(a, h)
    pool.register(b, h)  # a second block with the same content is not indexed
    pool.register(a, g)  # a block holds one prefix
    assert pool.cached_hashes() == frozenset({h})
    pool.free([b])
    assert pool.allocate(1) == [b]
    assert pool.cached_prefix_len([h]) == 1, "reusing the unindexed duplicate must not evict the indexed block"
    assert pool.lookup_prefix([h]) == [a] and pool.ref_count(a) == 2
    pool.free([a, a, b])
    assert pool.num_free_blocks == 2


def test_chained_hashes_depend_on_the_whole_prefix():
    block = [5, 6, 7, 8]
    after_a = compute_block_hashes([1, 2, 3, 4] + block, BS)
    after_b = compute_block_hashes([1, 2, 3, 9] + block, BS)
    alone = compute_block_hashes(block, BS)
    assert len(after_a) == len(after_b) == 2 and len(alone) == 1
    assert after_a[0] != after_b[0]
    assert after_a[1] != after_b[1], "same block after different prefixes must hash differently"
    assert after_a[1] != alone[0]
    assert compute_block_hashes([1, 2, 3, 4] + block, BS) == after_a  # deterministic
    assert after_a[1] == hash_block(after_a[0], block)


def test_only_full_blocks_are_hashed_and_resuming_continues_the_chain():
    tokens = list(range(100, 100 + 3 * BS + 2))
    hashes = compute_block_hashes(tokens, BS)
    assert len(hashes) == 3
    assert compute_block_hashes(tokens, BS, parent_hash=hashes[0], start_block=1) == hashes[1:]
    assert compute_block_hashes(tokens[: BS - 1], BS) == []
    # token ids beyond 2**31 (large vocabularies) hash without overflow and distinctly
    assert hash_block(NONE_HASH, [2**40, 1, 2, 3]) != hash_block(NONE_HASH, [2**40 + 1, 1, 2, 3])


_HASH_SCRIPT = (
    "from splitserve.engine.block_pool import compute_block_hashes;"
    "print(compute_block_hashes(list(range(1000, 1040)), 16) + compute_block_hashes([3] * 8, 4, parent_hash=123))"
)


def test_hashes_are_stable_across_processes():
    here = compute_block_hashes(list(range(1000, 1040)), 16) + compute_block_hashes([3] * 8, 4, parent_hash=123)
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", _HASH_SCRIPT], env=env, capture_output=True, text=True, check=True, timeout=60)
        assert ast.literal_eval(out.stdout.strip()) == here, f"hashes differ in a process with PYTHONHASHSEED={seed}"
    assert all(0 <= h < 2**64 for h in here)


def test_no_free_blocks_message_and_no_partial_allocation():
    pool = BlockPool(4, BS)
    pool.allocate(1)
    with pytest.raises(NoFreeBlocks, match=r"asked for 5 KV blocks, 3 free of 4"):
        pool.allocate(5)
    assert pool.num_free_blocks == 3
    assert isinstance(NoFreeBlocks("x"), RuntimeError)


def test_num_blocks_must_be_positive():
    with pytest.raises(ValueError, match="num_blocks must be >= 1, got 0"):
        BlockPool(0, BS)


def test_prefix_caching_disabled_never_hits():
    hashes = compute_block_hashes(list(range(2 * BS)), BS)
    pool = BlockPool(4, BS, enable_prefix_caching=False)
    blocks = pool.allocate(2)
    for b, h in zip(blocks, hashes):
        pool.register(b, h)
    assert pool.lookup_prefix(hashes) == []
    assert pool.cached_prefix_len(hashes) == 0
    assert pool.cached_hashes() == frozenset()
    assert [pool.ref_count(b) for b in blocks] == [1, 1]
    pool.free(blocks)
    assert pool.lookup_prefix(hashes) == [] and pool.num_free_blocks == 4


def test_reset_prefix_cache_forgets_every_hash():
    hashes = compute_block_hashes(list(range(2 * BS)), BS)
    pool, _ = cached_pool(4, hashes)
    pool.reset_prefix_cache()
    assert pool.lookup_prefix(hashes) == [] and pool.num_free_blocks == 4


def test_hottest_hashes_lists_in_use_then_recently_freed_and_versions_track_changes():
    hashes = compute_block_hashes(list(range(4 * BS)), BS)
    pool = BlockPool(6, BS)
    v0 = pool.prefix_version
    a = pool.allocate(2)  # blocks 0, 1: freed below
    b = pool.allocate(2)  # blocks 2, 3: stay in use
    for block, h in zip(a + b, hashes):
        pool.register(block, h)
    assert pool.prefix_version == v0 + 4
    pool.free(a)  # free order: tail first, so block 1 then block 0 (0 is the most recently freed)
    v1 = pool.prefix_version
    assert pool.prefix_version == v1  # freeing keeps the hashes cached: no change
    assert pool.hottest_hashes(10) == [hashes[2], hashes[3], hashes[0], hashes[1]]
    assert pool.hottest_hashes(3) == [hashes[2], hashes[3], hashes[0]]
    assert pool.hottest_hashes(0) == []
    pool.allocate(3)  # two never-used blocks, then the LRU cached block (1): its hash is evicted
    assert pool.prefix_version == v1 + 1
    assert hashes[1] not in pool.hottest_hashes(10) and hashes[0] in pool.hottest_hashes(10)
    pool.reset_prefix_cache()
    assert pool.prefix_version == v1 + 2 and pool.hottest_hashes(10) == []


def _hottest_by_scanning(pool: BlockPool, limit: int) -> list[int]:
    """The summary's definition, by scanning every block: cached hashes of blocks in use (in the order they
    were taken), then of free blocks from the most recently freed."""
    in_use = [b for b in pool._in_use if pool.ref_count(b) > 0]
    assert sorted(in_use) == [b for b in range(pool.num_blocks) if pool.ref_count(b) > 0]
    hashed = lambda blocks: [pool._block_to_hash[b] for b in blocks if b in pool._block_to_hash]  # noqa: E731
    return (hashed(in_use) + hashed(reversed(pool._free)))[:limit]


@pytest.mark.parametrize("seed", range(5))
def test_hottest_hashes_agree_with_a_full_scan_through_random_use(seed):
    rng = random.Random(seed)
    pool = BlockPool(rng.choice([8, 64, 300]), BS)
    held: list[list[int]] = []
    next_hash = 1
    for _ in range(400):
        op = rng.random()
        if op < 0.4 and pool.num_free_blocks:
            blocks = pool.allocate(rng.randint(1, min(4, pool.num_free_blocks)))
            for block in blocks:
                if rng.random() < 0.3:  # most blocks stay unhashed (partial), so hashed free blocks lie deep in the tail
                    pool.register(block, next_hash)
                    next_hash += 1
            held.append(blocks)
        elif op < 0.7 and held:
            pool.free(held.pop(rng.randrange(len(held))))
        elif op < 0.85:
            hashes = [pool._block_to_hash[b] for b in rng.sample(sorted(pool._block_to_hash), min(2, len(pool._block_to_hash)))]
            hits = pool.lookup_prefix(hashes)
            if hits:
                held.append(hits)
        limit = rng.choice([1, 3, 16, 1000])
        assert pool.hottest_hashes(limit) == _hottest_by_scanning(pool, limit)


class _NoWalk(OrderedDict):
    """A free list that refuses to be walked from its end (what an O(pool) summary would do)."""

    def __reversed__(self):
        raise AssertionError("the prefix summary walked the free list")


def test_hottest_hashes_never_walk_a_large_free_list_of_uncached_blocks():
    # A GPU-sized pool that served many short requests: one hashed block in five freed ones, hundreds of
    # thousands of never-used blocks. The old summary grew its scan of the free list until it covered the pool.
    pool = BlockPool(300_000, BS)
    next_hash = 1
    for _ in range(2_000):
        blocks = pool.allocate(5)
        pool.register(blocks[0], next_hash)
        next_hash += 1
        pool.free(blocks)
    running = pool.allocate(3)
    pool.register(running[0], next_hash)
    by_scanning = _hottest_by_scanning(pool, 100)  # before the guard: the scan walks the free list
    pool._free = _NoWalk(pool._free)
    expected = [next_hash, *range(next_hash - 1, next_hash - 100, -1)]
    assert pool.hottest_hashes(100) == expected == by_scanning
    assert len(pool.hottest_hashes(16_384)) == 2_001
