"""Hierarchical KV offload (as LMCache and Mooncake's store): prefix blocks evicted from GPU memory move
down a chain of tiers (CPU memory, local SSD, ...), each with a capacity and a load bandwidth, and a
later request whose prefix continues there loads them back instead of recomputing.

Each tier keeps block hashes in LRU order. A block evicted from the GPU enters the first tier; a tier
over capacity pushes its least recently used block to the next tier; the last tier drops it. Tiers are
inclusive: loading a block back to the GPU leaves the copy where it was (touched). Offloading is free
(copied out asynchronously, off the critical path); loading costs bytes / bandwidth of the tier it comes
from, added to the step that admits the request (the loads of one step share the link: summed).
"""
from __future__ import annotations

from collections import OrderedDict


class Tier:
    def __init__(self, name: str, capacity_blocks: int, bandwidth: float):
        self.name = name
        self.capacity = capacity_blocks
        self.bandwidth = bandwidth                # bytes/s, per GPU (each GPU loads its KV shard)
        self.blocks: OrderedDict = OrderedDict()  # hash -> None, least recently used first
        self.hit_blocks = 0                       # blocks loaded back from this tier
        self.load_s = 0.0


class OffloadStore:
    def __init__(self, tiers: list[Tier], block_bytes: float):
        self.tiers = tiers
        self.block_bytes = block_bytes
        self.dropped = 0

    def put(self, h) -> None:
        """A hashed block leaves GPU memory: into the first tier (or refreshed there)."""
        self._insert(0, h)

    def _insert(self, t: int, h) -> None:
        while t < len(self.tiers):
            tier = self.tiers[t]
            if h in tier.blocks:
                tier.blocks.move_to_end(h)
                return
            tier.blocks[h] = None
            if len(tier.blocks) <= tier.capacity:
                return
            h, _ = tier.blocks.popitem(last=False)      # the tier's LRU block moves down
            t += 1
        self.dropped += 1

    def clear(self) -> None:
        """The host memory (and local disk) of a crashed replica: nothing kept."""
        for t in self.tiers:
            t.blocks.clear()

    def find(self, h) -> int | None:
        """The first tier holding h, or None."""
        for t, tier in enumerate(self.tiers):
            if h in tier.blocks:
                return t
        return None

    def load(self, h, t: int) -> float:
        """Load block h from tier t to the GPU: the seconds it takes; the tier's copy is touched."""
        tier = self.tiers[t]
        tier.blocks.move_to_end(h)
        tier.hit_blocks += 1
        s = self.block_bytes / tier.bandwidth
        tier.load_s += s
        return s
