"""Paged KV block pool with prefix caching (the mechanism; eviction order is a policy's sort key).

Blocks are referenced by running requests (ref > 0) or free. A free block that holds a registered
prefix hash stays cached until it is evicted; eviction pops the smallest (policy key, free order) entry
of two lazy queues: a deque of entries that arrived in order (LRU's keys, the time freed, always do: O(1))
and a heap of the others. Invariants (check()): no block both free and referenced; used + free = total.
"""
from __future__ import annotations

import heapq
from collections import deque

from .request import Request, block_hashes


class FreeQueue:
    """Unhashed free block ids, first in first out (vLLM's free block queue order), taken many at a time by
    slicing: a request's prompt takes dozens at once."""
    __slots__ = ("ids", "head")

    def __init__(self, ids) -> None:
        self.ids, self.head = list(ids), 0      # ids[head:] are free

    def __len__(self) -> int:
        return len(self.ids) - self.head

    def __iter__(self):
        return iter(self.ids[self.head:])

    def take(self, k: int) -> list:
        h = self.head
        out = self.ids[h: h + k]
        h += k
        if h > 1024 and 2 * h > len(self.ids):  # drop the taken prefix now and then (amortized O(1) a block)
            del self.ids[:h]
            h = 0
        self.head = h
        return out

    def popleft(self) -> int:
        return self.take(1)[0]

    def extend(self, ids) -> None:
        self.ids.extend(ids)


REFETCH_WINDOW_S = 10.0    # an evicted block needed again this soon counts as thrashing (report anomalies)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = False, eviction=None,
                 offload=None):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = enable_prefix_caching
        self.eviction = eviction
        self._keyed_by_time = getattr(eviction, "key_is_time_freed", False)   # its key() is pool.last_used[block]
        self.ref = [0] * num_blocks           # references per block; kept with caching only: without it no block
                                              # is shared, cached or pinned, so it is 1 exactly for the blocks
                                              # requests hold (check() counts those)
        self.hash: list = [None] * num_blocks
        self.last_used = [0.0] * num_blocks   # when last freed: read by eviction keys, computed then (not kept
                                              # without caching, where no block is ever evicted)
        self.hits = [0] * num_blocks
        self.cached_since = [0.0] * num_blocks
        self.by_hash: dict = {}
        self.free_plain = FreeQueue(range(num_blocks))
        self._heap: list = []
        self._sorted: deque = deque()     # entries pushed in key order (LRU's, nearly all): popped without the heap
        self._stamp = [0] * num_blocks     # heap entry is valid only while its stamp matches
        self._seq = 0
        self.num_cached_free = 0
        self.num_used = 0
        self.evictions = 0
        self.pins: dict = {}                 # key -> blocks held for a session between its turns (insertion order)
        self.evicted_at: dict = {}           # hash -> when its block was evicted (older than REFETCH_WINDOW_S: pruned
        self._prune_at = 4096                # once the dict has this many entries, amortized O(1) an eviction)
        self.on_evict = None                 # callback(pool, hash, key) when decisions are traced
        self.refetched = 0                   # blocks computed or loaded again within REFETCH_WINDOW_S of eviction
        self.last_evicted_key = None         # the eviction key of the last block evicted (aging policies read it)
        self.now = 0.0
        self.offload = offload               # an OffloadStore (sim/kv_offload.py): where evicted prefix blocks go

    @property
    def num_free(self) -> int:
        fq = self.free_plain                  # (len(fq), without a Python-level call: read every step)
        return len(fq.ids) - fq.head + self.num_cached_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix cache -------------------------------------------------------------------
    def lookup(self, req: Request, max_tokens: int) -> list[int]:
        """Longest run of cached blocks that prefix the request, within its first max_tokens tokens."""
        if not self.caching:
            return []
        if req.block_hashes is None:
            req.block_hashes = block_hashes(req, self.block_size)
        hits = []
        by_hash = self.by_hash
        for h in req.block_hashes[: max_tokens // self.block_size]:
            b = by_hash.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def lookup_offloaded(self, req: Request, first: int, max_tokens: int) -> list[int]:
        """After `first` blocks found on the GPU: the tier of each following prompt block that an offload tier
        holds (consecutive, within the first max_tokens tokens)."""
        if self.offload is None:
            return []
        tiers = []
        for h in req.block_hashes[first: max_tokens // self.block_size]:
            t = None if h in self.by_hash else self.offload.find(h)
            if t is None:
                break
            tiers.append(t)
        return tiers

    def register_full_blocks(self, req: Request, old_computed: int, new_computed: int) -> None:
        """Publish the hashes of blocks that became full, so later requests (or this one, recomputed) can share them."""
        if not self.caching:
            return
        if req.block_hashes is None:
            req.block_hashes = block_hashes(req, self.block_size)
        hashes, blocks = req.block_hashes, req.blocks
        lo = old_computed // self.block_size
        hi = min(new_computed // self.block_size, len(hashes))
        held, by_hash, since, evicted_at, now = self.hash, self.by_hash, self.cached_since, self.evicted_at, self.now
        for j in range(lo, hi):
            b = blocks[j]
            h = hashes[j]
            if held[b] is None and h not in by_hash:
                if h in evicted_at:
                    if evicted_at[h] >= now:  # evicted as a later step started (a decode run takes all its steps'
                        continue              # blocks first): still cached when this one ended, as on the plain path
                    self._refetch(h)
                held[b] = h
                by_hash[h] = b
                since[b] = now

    # --- allocation ---------------------------------------------------------------------
    def can_allocate(self, req: Request, num_tokens: int, hits: list[int] = ()) -> bool:
        need = self.blocks_needed(num_tokens) - len(req.blocks) - len(hits)
        reviving = sum(1 for b in hits if self.ref[b] == 0)  # cached-free hits leave the free pool
        return need <= self.num_free - reviving

    def allocate(self, req: Request, num_tokens: int, hits: list[int] = (), loads: list[int] = ()) -> bool:
        """Make req's blocks cover num_tokens tokens (taking `hits` first, then new blocks loaded from the
        offload tiers in `loads`, then new blocks); all or nothing."""
        if not hits and -(-num_tokens // self.block_size) <= len(req.blocks):
            return True                      # the common case: a decode token inside its last block
        if not self.can_allocate(req, num_tokens, hits):
            return False
        for b in hits:
            self._take(b)
            self.hits[b] += 1
            req.blocks.append(b)
        if loads:                            # KV copied back from the tiers, read before any GPU eviction below
            loaded = req.block_hashes[len(req.blocks): len(req.blocks) + len(loads)]   # pushes blocks into them
            for h, t in zip(loaded, loads):
                req.load_s += self.offload.load(h, t)
            for h in loaded:                 # each new block holds that prefix again
                b = self._take(self._pop_free())
                self.hash[b] = h
                self.by_hash[h] = b
                self.cached_since[b] = self.now
                self._refetch(h)
                req.blocks.append(b)
            req.num_loaded_tokens += len(loads) * self.block_size
        self.append_blocks(req, self.blocks_needed(num_tokens) - len(req.blocks))
        return True

    def append_blocks(self, req: Request, need: int) -> None:
        """`need` new blocks for req, now; the caller has checked num_free."""
        if need > len(self.free_plain):      # some come from evicting cached blocks
            return self.append_blocks_at([req] * need, [need], [self.now])
        req.blocks += self._take_plain(need)
        self.num_used += need

    def _take_plain(self, k: int) -> list:
        """k plain-free blocks, now referenced (counts are kept with caching only)."""
        new = self.free_plain.take(k)
        if self.caching:
            ref = self.ref
            for b in new:
                ref[b] = 1
        return new

    def append_blocks_at(self, owners: list, per_step: list, times: list) -> None:
        """One new block for each request of owners, in order (a decode run's block boundaries, step by step:
        per_step[j] of them taken as step j starts, at times[j]); the caller has checked num_free. Plain-free
        blocks first, then evicted ones (at their step's time: the refetch window and eviction hooks read it):
        both come unreferenced and unhashed, so no _take."""
        plain = self._take_plain(min(len(owners), len(self.free_plain)))
        for req, b in zip(owners, plain):
            req.blocks.append(b)
        k = len(plain)
        if len(owners) > k:                   # the rest evict cached blocks (caching is on)
            ref = self.ref
            at = None if len(per_step) == 1 else [t for t, m in zip(times, per_step) for _ in range(m)][k:]
            if at is None:
                self.now = times[0]
            for req, b in zip(owners[k:], self._evict_many(len(owners) - k, at)):
                ref[b] = 1
                req.blocks.append(b)
        self.num_used += len(owners)

    def pin(self, key, req: Request) -> None:
        """Hold req's blocks (one more reference each) after it finishes, under key, until unpin(key): an agentic
        session keeps its KV between turns (retention: keep)."""
        for b in req.blocks:
            self.ref[b] += 1
        self.pins[key] = list(req.blocks)

    def unpin(self, key) -> None:
        blocks = self.pins.pop(key, None)
        if blocks is not None:
            self._release(blocks)

    def unpin_oldest(self) -> None:
        """Memory is short and nothing can run: the longest-held pin gives way."""
        self.unpin(next(iter(self.pins)))

    def crash(self) -> int:
        """The replica died: every block is free and holds nothing (no prefix survives), pins are gone, and the
        offload tiers in host memory are empty. Cumulative counters stay. Returns the blocks that held KV (in use
        or cached)."""
        lost = self.num_used + self.num_cached_free
        n = self.num_blocks
        self.ref, self.hash, self.hits = [0] * n, [None] * n, [0] * n
        self.by_hash, self.pins = {}, {}
        self.free_plain = FreeQueue(range(n))
        self._heap, self._sorted, self._stamp = [], deque(), [0] * n
        self.num_cached_free = self.num_used = 0
        if self.offload is not None:
            self.offload.clear()
        return lost

    def free(self, req: Request) -> None:
        """Release req's blocks; the tail first, so an LRU evicts a prefix's tail before its head."""
        self._release(req.blocks)
        req.blocks = []

    def _release(self, blocks: list) -> None:
        ref, now = self.ref, self.now
        if not self.caching:                  # no sharing: each block is referenced once, none is hashed
            self.free_plain.extend(reversed(blocks))
            self.num_used -= len(blocks)
            return
        plain = self.free_plain.ids           # (appended to directly: one block at a time here)
        last_used, hashes, stamp, ordered, key = self.last_used, self.hash, self._stamp, self._sorted, self.eviction.key
        seq, freed, cached = self._seq, 0, 0
        # a policy keyed by the time freed (LRU): this release's entries come after every queued one, in order
        by_time = self._keyed_by_time and (not ordered or now >= ordered[-1][0])
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] == 0:
                freed += 1
                last_used[b] = now
                if hashes[b] is None:
                    plain.append(b)
                else:
                    seq += 1
                    stamp[b] = seq
                    entry = (now if by_time else key(self, b), seq, b)
                    if by_time or not ordered or entry > ordered[-1]:
                        ordered.append(entry)           # still sorted: a deque, O(1)
                    else:
                        heapq.heappush(self._heap, entry)
                    cached += 1
        self._seq = seq
        self.num_used -= freed                # (keys read the block's own state only: counts are set once)
        self.num_cached_free += cached

    def _take(self, b: int) -> int:
        if self.ref[b] == 0:
            self.num_used += 1
            if self.hash[b] is not None:       # leaving the cached-free set: invalidate its heap entry
                self._stamp[b] = -1
                self.num_cached_free -= 1
        self.ref[b] += 1
        return b

    def _pop_free(self) -> int:
        fq = self.free_plain
        return fq.popleft() if fq.head < len(fq.ids) else self._evict()

    def _evict(self) -> int:
        """The cached-free block the eviction policy gives up first (its hash forgotten)."""
        return self._evict_many(1)[0]

    def _evict_many(self, n: int, at: list | None = None) -> list:
        """The next n blocks _evict would give, one after another, at the times in `at` (a decode run's steps) or
        now. One loop over locals: a long prompt on a full cache evicts hundreds of blocks at once."""
        heap, ordered, stamp, hashes, by_hash = self._heap, self._sorted, self._stamp, self.hash, self.by_hash
        evicted_at, offload, hook = self.evicted_at, self.offload, self.on_evict
        now, out, key, free = self.now, [], None, self.num_cached_free
        for i in range(n):
            if at is not None:
                now = at[i]
            while True:                       # the smaller head of the two, skipping invalidated entries
                if ordered and (not heap or ordered[0] < heap[0]):
                    key, seq, b = ordered.popleft()
                else:
                    key, seq, b = heapq.heappop(heap)
                if stamp[b] == seq:
                    break
            stamp[b] = -1
            h = hashes[b]
            hashes[b] = None
            del by_hash[h]
            if offload is not None:
                offload.put(h)
            evicted_at[h] = now               # (a refetch within REFETCH_WINDOW_S counts as thrashing)
            if hook is not None:              # (it reads the pool as it is after this eviction)
                self.now, self.last_evicted_key, self.num_cached_free = now, key, free - i - 1
                hook(self, h, key)
            out.append(b)
        if n:
            self.now, self.last_evicted_key = now, key
        self.num_cached_free = free - n
        self.evictions += n
        if len(evicted_at) > self._prune_at:  # evictions too old to count any more are forgotten (older than
            cutoff = (at[0] if at else now) - REFETCH_WINDOW_S   # the window before the first: a run's steps come later)
            for h in [h for h, t in evicted_at.items() if t < cutoff]:
                del evicted_at[h]
            self._prune_at = max(4096, 2 * len(evicted_at))
        return out

    def _refetch(self, h) -> None:
        """A block holds hash h again: count it when h was evicted shortly before (KV thrashing)."""
        t = self.evicted_at.pop(h, None)
        if t is not None and self.now - t <= REFETCH_WINDOW_S:
            self.refetched += 1

    # --- invariants ---------------------------------------------------------------------
    def check(self, live: list[Request] = ()) -> None:
        """live: every request holding blocks (pins are the pool's own)."""
        counted = [0] * self.num_blocks
        for r in live:
            for b in r.blocks:
                counted[b] += 1
        for blocks in self.pins.values():
            for b in blocks:
                counted[b] += 1
        ref = self.ref if self.caching else counted
        if not self.caching:
            assert max(counted, default=0) <= 1, f"block {counted.index(max(counted))} is held twice without caching"
        plain = set(self.free_plain)
        assert len(plain) == len(self.free_plain), "a block is twice in the free list"
        cached_free = {b for _, s, b in [*self._heap, *self._sorted] if self._stamp[b] == s}
        assert not (plain & cached_free), "a block is both plain-free and cached-free"
        for b in plain | cached_free:
            assert ref[b] == 0, f"free block {b} is referenced (ref={ref[b]})"
        for b in plain:
            assert self.hash[b] is None, f"plain-free block {b} still has a hash"
        used = sum(1 for r in ref if r > 0)
        assert min(ref) >= 0, "negative reference count"
        assert used == self.num_used, f"used count {self.num_used} != {used}"
        assert len(cached_free) == self.num_cached_free
        assert used + len(plain) + len(cached_free) == self.num_blocks, "used + free != total"
        for h, b in self.by_hash.items():
            assert self.hash[b] == h
        assert counted == ref, "reference counts differ from the blocks requests hold"
