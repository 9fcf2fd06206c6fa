"""KV eviction order: a policy is a sort key over free-but-cached blocks; the smallest is evicted first.

The key is computed when a block becomes free (pool.last_used, hits, cached_since are current then). A policy
whose key is the time the block was freed says so (`key_is_time_freed = True`): the pool then queues the blocks a
release frees in that order without calling key() for each (millions of calls on a full cache).
"""
from __future__ import annotations

from typing import Protocol


class EvictionPolicy(Protocol):
    def key(self, pool, block: int): ...


class LRU:
    """Least recently used first (vLLM, SGLang default)."""

    key_is_time_freed = True     # the pool may queue a release's blocks by the time without calling key()

    def key(self, pool, block: int):
        return pool.last_used[block]


class FIFO:
    """Oldest cached first, regardless of reuse."""

    def key(self, pool, block: int):
        return pool.cached_since[block]


class LFU:
    """Fewest prefix hits first; ties by least recent use."""

    def key(self, pool, block: int):
        return (pool.hits[block], pool.last_used[block])


class GDSF:
    """Greedy-Dual-Size-Frequency (Cherkasova, HP Labs 1998; after Cao and Irani's GreedyDual-Size, USITS
    1997), cost-aware: a block's value is L + (hits + 1) x cost / size, evicted lowest first, where L is the
    value of the last block evicted (so blocks not reused age out) and cost is what losing it costs: the
    prefix depth in tokens at its end, since recomputing a block attends over everything before it.
    Blocks are one size. Deep blocks of long, reused prefixes stay; shallow and cold ones go first, which can
    strand the deeper blocks of the same prefix (they are reachable only through it) until they age out."""

    def key(self, pool, block: int):
        L = pool.last_evicted_key or 0.0
        h = pool.hash[block]
        depth = h[1] if h[0] >= 0 else (h[1] + 1) * pool.block_size   # trace key (id, end) or private (-id, j)
        return L + (pool.hits[block] + 1) * depth
