"""KV block pool: exact block states, prefix sharing, eviction order, conservation under preemption."""
import copy

import numpy as np
import pytest

from conftest import BASE, run_raw
from servesim.policies.eviction import FIFO, GDSF, LFU, LRU
from servesim.sim.kv_cache import BlockPool
from servesim.sim.request import Request


def req(i, prompt, out=4, ids=None, tb=0):
    return Request(i, 0.0, prompt, out, prefix_ids=ids, prefix_block_size=tb)


def test_allocation_grows_per_block_and_free_returns_everything():
    pool = BlockPool(8, 4, eviction=LRU())
    r = req(0, 6)
    assert pool.allocate(r, 6) and r.blocks == [0, 1]
    assert pool.allocate(r, 8) and r.blocks == [0, 1]          # still inside block 1
    assert pool.allocate(r, 9) and r.blocks == [0, 1, 2]       # crosses a boundary
    assert (pool.num_used, pool.num_free) == (3, 5)
    big = req(1, 30)
    assert not pool.allocate(big, 30) and big.blocks == []      # all or nothing
    pool.free(r)
    assert (pool.num_used, pool.num_free) == (0, 8) and r.blocks == []
    pool.check([])


def test_freed_blocks_are_reused_first_in_first_out_and_check_catches_a_double_hold():
    """Without caching the free queue hands out blocks in the order they were freed (tail first, as freed), after
    the never-used ones; a block held by two requests or both held and free fails check()."""
    pool = BlockPool(8, 4, eviction=LRU())
    a, b = req(0, 12), req(1, 8)
    assert pool.allocate(a, 12) and pool.allocate(b, 8) and (a.blocks, b.blocks) == ([0, 1, 2], [3, 4])
    pool.free(a)
    c = req(2, 20)
    assert pool.allocate(c, 20) and c.blocks == [5, 6, 7, 2, 1]
    assert list(pool.free_plain) == [0] and pool.num_free == 1
    pool.check([b, c])
    b.blocks.append(0)                      # also still free
    with pytest.raises(AssertionError, match="free block 0 is referenced"):
        pool.check([b, c])
    b.blocks[-1] = 5                        # held by c too
    with pytest.raises(AssertionError, match="block 5 is held twice"):
        pool.check([b, c])


def test_prefix_blocks_are_shared_and_cached_after_free():
    pool = BlockPool(10, 4, enable_prefix_caching=True, eviction=LRU())
    a = req(0, 10, ids=[7, 8, 9], tb=4)       # trace blocks of 4 tokens: 7 | 8 | 9 (partial)
    assert pool.allocate(a, 10)
    a.num_computed = 10
    pool.register_full_blocks(a, 0, 10)
    assert pool.hash[0] == (7, 4) and pool.hash[1] == (8, 8) and pool.hash[2] is None
    b = req(1, 12, ids=[7, 8, 5], tb=4)       # shares the first two trace blocks
    hits = pool.lookup(b, b.num_tokens - 1)
    assert hits == [0, 1]
    assert pool.allocate(b, 12, hits) and b.blocks[:2] == [0, 1]
    assert pool.ref[0] == pool.ref[1] == 2
    pool.check([a, b])
    pool.free(a)
    pool.free(b)
    # hashed blocks stay cached (free but reusable), unhashed go back to the plain free list
    assert pool.num_cached_free == 2 and pool.num_free == 10 and pool.num_used == 0
    c = req(2, 9, ids=[7, 8, 1], tb=4)
    assert pool.lookup(c, 8) == [0, 1]
    pool.check([])


def test_at_least_one_token_is_recomputed_on_a_full_hit():
    pool = BlockPool(10, 4, enable_prefix_caching=True, eviction=LRU())
    a = req(0, 8, ids=[1, 2], tb=4)
    pool.allocate(a, 8)
    pool.register_full_blocks(a, 0, 8)
    pool.free(a)
    b = req(1, 8, ids=[1, 2], tb=4)
    assert pool.lookup(b, b.num_tokens - 1) == [0]     # 7 tokens may be cached: only the first block


@pytest.mark.parametrize("policy,expected", [(LRU(), [1, 0]), (FIFO(), [0, 1])])
def test_eviction_order_is_the_policy_sort_key(policy, expected):
    pool = BlockPool(3, 4, enable_prefix_caching=True, eviction=policy)
    a, b = req(0, 4, ids=[10], tb=4), req(1, 4, ids=[20], tb=4)
    pool.now = 1.0
    pool.allocate(a, 4)
    pool.register_full_blocks(a, 0, 4)          # block 0 cached at t=1
    pool.now = 2.0
    pool.allocate(b, 4)
    pool.register_full_blocks(b, 0, 4)          # block 1 cached at t=2
    pool.now = 3.0
    pool.free(b)                                # block 1 last used at 3
    pool.now = 4.0
    pool.free(a)                                # block 0 last used at 4
    evicted = []
    for i in range(3):                          # 1 plain block, then the two cached ones in key order
        r = req(10 + i, 4)
        pool.allocate(r, 4)
        evicted.append(r.blocks[0])
    assert evicted[0] == 2 and evicted[1:] == expected
    assert pool.evictions == 2 and pool.by_hash == {}


class _Scripted:
    """Eviction keys read from a table: some freed blocks get keys below earlier ones (they go to the heap),
    the others above (they go to the in-order deque)."""

    def __init__(self, keys):
        self.keys = keys

    def key(self, pool, block):
        return self.keys[block]


def test_eviction_follows_the_key_order_across_the_heap_and_the_in_order_queue():
    keys = [5.0, 7.0, 1.0, 7.0, 3.0, 9.0, 2.0, 8.0]           # block -> key; 7.0 twice: ties go by free order
    pool = BlockPool(9, 4, enable_prefix_caching=True, eviction=_Scripted(keys))
    rs = [req(i, 4, ids=[100 + i], tb=4) for i in range(8)]
    for r in rs:
        pool.allocate(r, 4)
        pool.register_full_blocks(r, 0, 4)
    assert [r.blocks[0] for r in rs] == list(range(8))
    for r in rs:                                               # free blocks 0..7 in order
        pool.free(r)
    hit = req(20, 8, ids=[104, 999], tb=4)        # a prefix hit takes block 4 back (its entry goes stale) and
    assert pool.lookup(hit, 7) == [4]             # the plain block 8
    pool.allocate(hit, 8, [4])
    assert hit.blocks == [4, 8]
    pool.check(live=[hit])
    evicted = []
    for i in range(7):                            # the cached blocks by (key, free order)
        r = req(30 + i, 4)
        pool.allocate(r, 4)
        evicted.append(r.blocks[0])
    assert evicted == [2, 6, 0, 1, 3, 7, 5]
    assert pool.evictions == 7 and pool.num_free == 0


def test_a_long_prompt_evicts_many_blocks_in_key_order_as_one_at_a_time_would():
    """A prompt needing more blocks than are plain-free evicts the rest in one pass: the same blocks in the same
    (key, free order) as single evictions, each seen by the eviction hook with the pool as it is after it."""
    keys = [5.0, 7.0, 1.0, 7.0, 3.0, 9.0, 2.0, 8.0]
    pool = BlockPool(9, 4, enable_prefix_caching=True, eviction=_Scripted(keys))
    rs = [req(i, 4, ids=[100 + i], tb=4) for i in range(8)]
    for r in rs:
        pool.allocate(r, 4)
        pool.register_full_blocks(r, 0, 4)
        pool.free(r)
    seen = []
    pool.on_evict = lambda p, h, key: seen.append((p.now, h, key, p.num_cached_free, p.last_evicted_key))
    pool.now = 3.0
    big = req(40, 36)
    assert pool.allocate(big, 36)
    assert big.blocks == [8, 2, 6, 4, 0, 1, 3, 7, 5]           # the plain-free block first, then by key
    order = [2, 6, 4, 0, 1, 3, 7, 5]
    assert seen == [(3.0, rs[b].block_hashes[0], keys[b], 7 - i, keys[b]) for i, b in enumerate(order)]
    assert pool.evictions == 8 and pool.num_free == 0 and pool.num_used == 9 and pool.by_hash == {}
    assert pool.evicted_at == {rs[b].block_hashes[0]: 3.0 for b in order}
    pool.check(live=[big])


class _KeyedLRU(LRU):
    key_is_time_freed = False       # the pool calls key() for every freed block


def test_lru_keyed_by_time_freed_evicts_as_when_its_key_is_called():
    """LRU says its key is the time freed, so the pool queues a release's blocks without calling key(): the same
    blocks are evicted in the same order, at every step of a random mix of prefixes, frees and time."""
    rng = np.random.default_rng(3)
    pools = [BlockPool(24, 4, enable_prefix_caching=True, eviction=p()) for p in (LRU, _KeyedLRU)]
    held = [[], []]
    for step in range(400):
        ids = [int(x) for x in rng.integers(0, 40, size=int(rng.integers(1, 5)))]
        ids = [ids[0] * 10 + j for j in range(len(ids))]          # prefix-chained: shared heads, varied tails
        free_one = rng.random() < 0.5
        for pool, mine in zip(pools, held):
            pool.now = step * 0.5
            if mine and (free_one or pool.num_free < 8):
                pool.free(mine.pop(0))
            r = req(step, 4 * len(ids), ids=ids, tb=4)
            hits = pool.lookup(r, r.prompt_tokens)
            if pool.allocate(r, r.prompt_tokens, hits):
                pool.register_full_blocks(r, 0, r.prompt_tokens)
                mine.append(r)
        a, b = pools
        assert [r.blocks for r in held[0]] == [r.blocks for r in held[1]]
        assert (a.evictions, a.num_cached_free, list(a._sorted), a._heap) == \
            (b.evictions, b.num_cached_free, list(b._sorted), b._heap)
    assert pools[0].evictions > 50 and not pools[0]._heap       # LRU's entries all came in order
    pools[0].check(live=held[0])


def test_lfu_evicts_the_least_hit_block_first_then_the_least_recent():
    pool = BlockPool(4, 4, enable_prefix_caching=True, eviction=LFU())
    blocks = {}
    for t, ident in enumerate((10, 20, 30), start=1):     # three cached one-block prefixes, freed at t = 1, 2, 3
        pool.now = float(t)
        r = req(ident, 4, ids=[ident], tb=4)
        pool.allocate(r, 4)
        pool.register_full_blocks(r, 0, 4)
        blocks[ident] = r.blocks[0]
        pool.free(r)
    # prefix 10 is hit twice and 30 once (each hit re-frees it later), 20 never
    for t, ident in ((4.0, 10), (5.0, 30), (6.0, 10)):
        pool.now = t
        r = req(100 + int(t), 8, ids=[ident, 99], tb=4)
        hits = pool.lookup(r, 7)
        assert hits == [blocks[ident]]
        pool.allocate(r, 4, hits)
        pool.free(r)
    evicted = []
    for i in range(4):                                    # the plain block first, then hits 0 < 1 < 2
        r = req(200 + i, 4)
        pool.allocate(r, 4)
        evicted.append(r.blocks[0])
    assert evicted[1:] == [blocks[20], blocks[30], blocks[10]]


def test_gdsf_evicts_cheap_cold_blocks_first_and_ages_with_the_last_eviction():
    pool = BlockPool(4, 4, enable_prefix_caching=True, eviction=GDSF())
    p = req(0, 8, ids=[10, 20], tb=4)                    # a two-block prefix: depths 4 and 8
    pool.allocate(p, 8)
    pool.register_full_blocks(p, 0, 8)
    shallow, deep = p.blocks
    pool.free(p)                                         # values 0 + 1 x 4 and 0 + 1 x 8
    q = req(1, 4, ids=[30], tb=4)
    pool.allocate(q, 4)
    pool.register_full_blocks(q, 0, 4)
    hot = q.blocks[0]
    pool.free(q)                                         # 4 ...
    again = req(2, 8, ids=[30, 99], tb=4)
    pool.allocate(again, 4, pool.lookup(again, 7))       # ... hit once: re-freed at 0 + 2 x 4 = 8
    pool.free(again)
    evicted = []
    for i in range(4):
        r = req(10 + i, 4)
        pool.allocate(r, 4)
        evicted.append(r.blocks[0])
        if i == 1:
            assert pool.last_evicted_key == 4            # the clock L a block freed now would start from
    assert evicted[1:] == [shallow, deep, hot]           # value 4, then the two 8s in the order they were freed
    assert pool.last_evicted_key == 8


def test_small_pool_forces_preemptions_and_every_request_still_finishes(base_raw):
    raw = base_raw
    raw["fleet"]["replicas"][0]["engine"] = {"num_gpu_blocks_override": 60, "block_size": 16, "max_num_seqs": 64}
    raw["workload"]["num_requests"] = 300
    raw["workload"]["arrival"] = {"process": "all_at_once"}
    raw["sim"] = {"check_invariants": True}    # pool.check() after every step
    res, df = run_raw(raw)
    assert (df["outcome"] == "finished").all()
    assert (df["generated_tokens"] == df["output_tokens"]).all()
    assert df["preemptions"].sum() > 0
    pool = res.pools[0]
    assert pool.num_used == 0 and pool.num_free == pool.num_blocks
    pool.check([])


def test_request_larger_than_the_pool_is_rejected_and_counted(base_raw):
    raw = base_raw
    raw["fleet"]["replicas"][0]["engine"] = {"num_gpu_blocks_override": 10, "block_size": 16}
    res, df = run_raw(raw)
    too_big = df["prompt_tokens"] + df["output_tokens"] > 160
    assert too_big.any()
    assert (df.loc[too_big, "reason"] == "exceeds_kv_capacity").all()
    assert (df.loc[~too_big, "outcome"] == "finished").all()
    assert res.rejections == {"exceeds_kv_capacity": int(too_big.sum())}


def test_unbounded_cache_hit_rate_equals_the_offline_reuse_of_the_mooncake_block_ids():
    """One replica, a pool that never evicts, one sequence at a time (every earlier request's blocks are
    cached before the next is admitted): the prompt tokens served from the cache equal, request by request,
    what its trace block ids say was seen before: the leading run of already-seen ids, in whole trace blocks
    inside the prompt, within the prompt's first (prompt - 1) tokens rounded down to engine blocks."""
    import copy

    from conftest import BASE, run_raw
    from servesim.traces.loaders import load_trace, resolve_path

    n = 150
    raw = copy.deepcopy(BASE)
    raw["sim"] = {}
    raw["fleet"]["replicas"][0]["engine"] = {"enable_prefix_caching": True, "max_num_seqs": 1,
                                             "num_gpu_blocks_override": 200_000}
    raw["workload"] = {"kind": "trace", "path": "bundled:mooncake_conversation_head3000.jsonl.gz", "max_requests": n}
    res, df = run_raw(raw)
    assert res.pools[0].evictions == 0 and df["preemptions"].sum() == 0
    tr = load_trace(resolve_path("bundled:mooncake_conversation_head3000.jsonl.gz"))
    tb, bs = tr.prefix_block_size, 16
    seen, expected = set(), []
    for i in range(n):
        ids, prompt = tr.prefix_ids[i], int(tr.prompt[i])
        lead = 0
        while lead < len(ids) and ids[lead] in seen and (lead + 1) * tb <= prompt:
            lead += 1
        expected.append(min(lead * tb, (prompt - 1) // bs * bs))
        seen.update(ids)
    assert df["cached_prompt_tokens"].tolist() == expected
    offline = sum(expected) / df["prompt_tokens"].sum()
    assert offline == df["cached_prompt_tokens"].sum() / df["prompt_tokens"].sum() > 0.04
    assert max(expected) > 4 * tb            # not just the shared system-prompt block: conversation turns too
