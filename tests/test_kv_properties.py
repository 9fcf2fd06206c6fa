"""Property test: any sequence of pool operations keeps the KV invariants."""
from hypothesis import given, settings
from hypothesis import strategies as st

from servesim.policies.eviction import LFU, LRU
from servesim.sim.kv_cache import BlockPool
from servesim.sim.request import Request

ops = st.lists(st.tuples(st.sampled_from(["new", "grow", "free", "compute"]), st.integers(0, 7),
                         st.integers(1, 40), st.integers(0, 3)), min_size=1, max_size=80)


@settings(max_examples=200, deadline=None)
@given(ops=ops, caching=st.booleans(), lfu=st.booleans())
def test_random_operations_keep_invariants(ops, caching, lfu):
    pool = BlockPool(24, 4, enable_prefix_caching=caching, eviction=LFU() if lfu else LRU())
    live: dict[int, Request] = {}
    next_id = 0
    for t, (op, slot, n, prefix) in enumerate(ops):
        pool.now = float(t)
        if op == "new" and slot not in live:
            r = Request(next_id, 0.0, n, 8, prefix_ids=[prefix, prefix + 10, 99 + next_id] * 5, prefix_block_size=4)
            next_id += 1
            hits = pool.lookup(r, r.num_tokens - 1)
            if pool.allocate(r, n, hits):
                r.num_computed = len(hits) * 4
                live[slot] = r
            else:
                assert r.blocks == []
        elif op == "grow" and slot in live:
            r = live[slot]
            before = list(r.blocks)
            if not pool.allocate(r, len(r.blocks) * 4 + n):
                assert r.blocks == before                 # all or nothing
        elif op == "compute" and slot in live:
            r = live[slot]
            new = min(len(r.blocks) * 4, r.prompt_tokens)
            if new > r.num_computed:
                pool.register_full_blocks(r, r.num_computed, new)
                r.num_computed = new
        elif op == "free" and slot in live:
            pool.free(live.pop(slot))
        pool.check(list(live.values()))
    for r in live.values():
        pool.free(r)
    pool.check([])
    assert pool.num_used == 0 and pool.num_free == pool.num_blocks
