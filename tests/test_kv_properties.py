"""Property test: any sequence of pool operations keeps the KV invariants."""
from hypothesis import example, given, settings
from hypothesis import strategies as st

from servesim.policies.eviction import FIFO, GDSF, LFU, LRU
from servesim.sim.kv_cache import BlockPool
from servesim.sim.kv_offload import OffloadStore, Tier
from servesim.sim.request import Request

ops = st.lists(st.tuples(st.sampled_from(["new", "grow", "free", "compute"]), st.integers(0, 7),
                         st.integers(1, 40), st.integers(0, 3)), min_size=1, max_size=80)


@settings(max_examples=200, deadline=None)
@given(ops=ops, caching=st.booleans(), policy=st.sampled_from([LRU, FIFO, LFU, GDSF]), offload=st.booleans())
# random sequences rarely compute, free and then squeeze a prefix out before it returns: this one does, so
# the tiers take evicted blocks and a later request loads them back
@example(ops=[("new", 0, 8, 0), ("compute", 0, 1, 0), ("free", 0, 1, 0), ("new", 1, 40, 1), ("new", 2, 8, 2),
              ("free", 1, 1, 0), ("new", 3, 8, 0), ("compute", 3, 1, 0), ("free", 3, 1, 0)],
         caching=True, policy=GDSF, offload=True)
def test_random_operations_keep_invariants(ops, caching, policy, offload):
    """With every eviction policy, with and without offload tiers (small ones, so blocks cascade and drop)."""
    store = OffloadStore([Tier("cpu", 3, 1e9), Tier("ssd", 5, 1e8)], 1e6) if caching and offload else None
    pool = BlockPool(12, 4, enable_prefix_caching=caching, eviction=policy(), offload=store)
    live: dict[int, Request] = {}
    next_id = 0
    for t, (op, slot, n, prefix) in enumerate(ops):
        pool.now = float(t)
        if op == "new" and slot not in live:
            r = Request(next_id, 0.0, n, 8, prefix_ids=[prefix, prefix + 10, 99 + next_id] * 5, prefix_block_size=4)
            next_id += 1
            hits = pool.lookup(r, r.num_tokens - 1)
            loads = pool.lookup_offloaded(r, len(hits), r.num_tokens - 1)
            if loads:                                          # what comes from a tier is not on the GPU
                assert not (set(r.block_hashes[len(hits): len(hits) + len(loads)]) & set(pool.by_hash))
            if pool.allocate(r, max(n, (len(hits) + len(loads)) * 4), hits, loads):
                r.num_computed = (len(hits) + len(loads)) * 4
                live[slot] = r
            else:
                assert r.blocks == [] and r.load_s == 0.0
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
        if store is not None:
            for tier in store.tiers:
                assert len(tier.blocks) <= tier.capacity
    for r in live.values():
        pool.free(r)
    pool.check([])
    assert pool.num_used == 0 and pool.num_free == pool.num_blocks
