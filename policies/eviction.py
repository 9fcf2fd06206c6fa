"""KV eviction order: a policy is a sort key over free-but-cached blocks; the smallest is evicted first.

The key is computed when a block becomes free (pool.last_used, hits, cached_since are current then).
"""
from __future__ import annotations

from typing import Protocol


class EvictionPolicy(Protocol):
    def key(self, pool, block: int): ...


class LRU:
    """Least recently used first (vLLM, SGLang default)."""

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
