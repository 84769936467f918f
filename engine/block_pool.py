"""KV block accounting: a fixed pool of block ids, reference counts, prefix hashes.

Pure bookkeeping with no tensors and no I/O, so it is tested in milliseconds.
The pool never grows. A block is *free* when its reference count is zero; a free
block may still hold a cached prefix (its hash stays registered) until it is
handed out again, oldest-freed first (LRU). Hashes chain through the previous
block's hash, so equal hashes mean equal whole prefixes, not just equal blocks.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from itertools import islice
from collections.abc import Sequence

NONE_HASH = 0


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Stable across processes (unlike ``hash()`` of str): 64-bit blake2b of parent + tokens."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent_hash.to_bytes(8, "little", signed=False))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


def compute_block_hashes(token_ids: Sequence[int], block_size: int, parent_hash: int = NONE_HASH, start_block: int = 0) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids`` from ``start_block`` on."""
    hashes: list[int] = []
    parent = parent_hash
    for b in range(start_block, len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[b * block_size : (b + 1) * block_size])
        hashes.append(parent)
    return hashes


class NoFreeBlocks(RuntimeError):
    """Raised by ``allocate`` when the pool cannot satisfy a request (callers check ``can_allocate`` first)."""


class WorkerBusy(RuntimeError):
    """A worker cannot take a request now: its KV pool has no room for it (back-pressure: try another, or later)."""


class BlockPool:
    """Block ids 0..num_blocks-1 with reference counts and an LRU of free blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._in_use: dict[int, None] = {}  # blocks with references, in the order they were taken
        self._cached_free: dict[int, None] = {}  # free blocks that hold a cached prefix, in the order they were freed
        self._hash_to_block: dict[int, int] = {}
        self._block_to_hash: dict[int, int] = {}
        self.num_prefix_hits = 0
        self.num_prefix_queries = 0
        self.prefix_version = 0  # bumped whenever the set of cached hashes changes (for load reports)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, num: int) -> bool:
        return num <= len(self._free)

    def allocate(self, num: int) -> list[int]:
        """Take ``num`` free blocks (evicting cached prefixes oldest-first)."""
        if num > len(self._free):
            raise NoFreeBlocks(f"asked for {num} KV blocks, {len(self._free)} free of {self.num_blocks}")
        out = []
        for _ in range(num):
            block_id, _ = self._free.popitem(last=False)
            old = self._block_to_hash.pop(block_id, None)
            if old is not None:
                self._cached_free.pop(block_id, None)
                if self._hash_to_block.get(old) == block_id:
                    del self._hash_to_block[old]
                    self.prefix_version += 1
            self._ref_counts[block_id] = 1
            self._in_use[block_id] = None
            out.append(block_id)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block; blocks reaching zero become free (hash kept)."""
        for block_id in reversed(block_ids):  # tail blocks first: they are evicted before the shared head
            count = self._ref_counts[block_id]
            assert count > 0, f"double free of KV block {block_id}"
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._free[block_id] = None
                del self._in_use[block_id]
                if block_id in self._block_to_hash:
                    self._cached_free[block_id] = None

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def lookup_prefix(self, block_hashes: Sequence[int]) -> list[int]:
        """Cached blocks for the longest leading run of ``block_hashes``; takes a reference on each."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for h in block_hashes:
            block_id = self._hash_to_block.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        for block_id in hits:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
                self._cached_free.pop(block_id, None)
                self._in_use[block_id] = None
            self._ref_counts[block_id] += 1
        self.num_prefix_queries += len(block_hashes)
        self.num_prefix_hits += len(hits)
        return hits

    def cached_prefix_len(self, block_hashes: Sequence[int]) -> int:
        """How many leading blocks are cached, without taking references (for routing)."""
        n = 0
        for h in block_hashes:
            if h not in self._hash_to_block:
                break
            n += 1
        return n

    def register(self, block_id: int, block_hash: int) -> None:
        """Record that ``block_id`` now holds the full block whose chained hash is ``block_hash``."""
        if not self.enable_prefix_caching or block_hash in self._hash_to_block or block_id in self._block_to_hash:
            return
        self._hash_to_block[block_hash] = block_id
        self._block_to_hash[block_id] = block_hash
        if self._ref_counts[block_id] == 0:
            self._cached_free[block_id] = None
        self.prefix_version += 1

    def cached_hashes(self) -> frozenset[int]:
        return frozenset(self._hash_to_block)

    def hottest_hashes(self, limit: int) -> list[int]:
        """Up to ``limit`` cached block hashes, most useful first, for a router's prefix summary.

        Hashes of blocks in use come first (running requests share them), then
        free cached blocks from the most recently freed, i.e. in the reverse of
        eviction order. A router that sees only this many still finds the
        prefixes most likely to be hit.
        """
        if limit <= 0:
            return []
        # A load report may run beside the engine thread that mutates the pool: the block lists are C-level
        # copies, each taken under the GIL in one go, and the map is only read by key (the summary may be a
        # step stale, never broken). The work is O(blocks in use + limit), never O(pool): a GPU's pool holds
        # hundreds of thousands of blocks, most of them free and holding no prefix.
        block_to_hash = self._block_to_hash
        out = [h for h in map(block_to_hash.get, list(self._in_use)) if h is not None][:limit]
        if len(out) < limit:
            recent = list(islice(reversed(self._cached_free), limit - len(out)))
            out.extend(h for h in map(block_to_hash.get, recent) if h is not None)
        return list(dict.fromkeys(out))[:limit]  # a block freed between the two copies could appear in both

    def reset_prefix_cache(self) -> None:
        self._hash_to_block.clear()
        self._block_to_hash.clear()
        self._cached_free.clear()
        self.prefix_version += 1
