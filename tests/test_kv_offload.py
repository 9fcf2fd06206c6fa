"""KV offload tiers: the exact LRU cascade, loads priced by bandwidth, and their effect on a Mooncake run."""
import copy

import pytest

from conftest import BASE, build_report, run_raw
from servesim.policies.eviction import LRU
from servesim.sim.config import parse_config
from servesim.sim.errors import ConfigError
from servesim.sim.kv_cache import BlockPool
from servesim.sim.kv_offload import OffloadStore, Tier
from servesim.sim.request import Request


def _store():
    return OffloadStore([Tier("cpu", 2, 1e9), Tier("ssd", 3, 1e8)], block_bytes=1e6)


def test_evicted_blocks_cascade_down_the_tiers_in_lru_order():
    s = _store()
    for h in "abcdef":
        s.put(h)
    cpu, ssd = s.tiers
    assert list(cpu.blocks) == ["e", "f"] and list(ssd.blocks) == ["b", "c", "d"] and s.dropped == 1
    assert (s.find("e"), s.find("b"), s.find("a")) == (0, 1, None)
    # loading touches the copy (tiers are inclusive): "b" is now the SSD's most recent, "c" goes first
    assert s.load("b", 1) == pytest.approx(1e6 / 1e8)
    s.put("g")                                   # cpu pushes "e" down; the SSD drops its LRU, "c"
    assert list(cpu.blocks) == ["f", "g"] and list(ssd.blocks) == ["d", "b", "e"] and s.dropped == 2
    assert (ssd.hit_blocks, ssd.load_s) == (1, pytest.approx(0.01))


def _req(i, ids, prompt):
    return Request(i, 0.0, prompt, 4, prefix_ids=ids, prefix_block_size=16)


def test_a_prefix_evicted_from_the_gpu_is_loaded_back_not_recomputed():
    store = OffloadStore([Tier("cpu", 100, 1e9)], block_bytes=1e6)
    pool = BlockPool(4, 16, enable_prefix_caching=True, eviction=LRU(), offload=store)
    a = _req(0, [1, 2, 3, 4], 64)
    assert pool.allocate(a, 64)
    pool.register_full_blocks(a, 0, 64)
    pool.free(a)
    b = _req(1, [5, 6, 7, 8], 64)                # takes the 4 blocks: A's prefix is evicted to the CPU tier
    assert pool.lookup(b, 63) == [] and pool.allocate(b, 64)
    assert list(store.tiers[0].blocks) == [(4, 64), (3, 48), (2, 32), (1, 16)]   # freed tail first
    pool.register_full_blocks(b, 0, 64)
    pool.free(b)
    c = _req(2, [1, 2, 3, 4, 9], 70)
    hits = pool.lookup(c, 69)
    loads = pool.lookup_offloaded(c, len(hits), 69)
    assert hits == [] and loads == [0, 0, 0, 0]
    assert not pool.allocate(c, 70, hits, loads)        # 5 blocks needed, 4 in the pool: all or nothing
    assert c.blocks == [] and c.load_s == 0.0
    assert pool.allocate(c, 64, hits, loads)
    assert c.num_loaded_tokens == 64 and c.load_s == pytest.approx(4 * 1e6 / 1e9)
    assert [pool.hash[blk] for blk in c.blocks] == [(1, 16), (2, 32), (3, 48), (4, 64)]
    pool.check(live=[c])
    assert store.tiers[0].hit_blocks == 4


def _returning_conversations(tmp_path, offload):
    """10 conversations send a 4,096-token prompt (8 trace blocks of 512), one every 2 s; from t=100 s each
    returns with that prompt + 100 tokens. The GPU pool (700 blocks of 16 = 11,200 tokens) keeps only the
    last two prefixes; a CPU tier keeps them all."""
    import json
    lines = [{"timestamp": 2000 * i, "input_length": 4096, "output_length": 10,
              "hash_ids": [100 * i + j for j in range(8)]} for i in range(10)]
    lines += [{"timestamp": 100_000 + 2000 * i, "input_length": 4196, "output_length": 10,
               "hash_ids": [100 * i + j for j in range(8)] + [100 * i + 50]} for i in range(10)]
    path = tmp_path / "conversations.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"][0]["engine"] = {"enable_prefix_caching": True, "num_gpu_blocks_override": 700,
                                             "kv_offload": offload}
    raw["workload"] = {"kind": "trace", "path": str(path)}
    res, df = run_raw(raw)
    return build_report(res, df), df.iloc[10:]


def test_a_cpu_tier_serves_every_returning_prefix_and_its_loads_are_reported(tmp_path):
    gpu_only, back0 = _returning_conversations(tmp_path, [])
    tiered, back1 = _returning_conversations(tmp_path, [{"name": "cpu", "capacity_gib": 100, "bandwidth_gbps": 25}])
    assert (back1["cached_prompt_tokens"] == 4096).all()                    # every prefix reused
    assert back0["cached_prompt_tokens"].sum() <= 2 * 4096                  # the GPU alone kept two at most
    loaded = back1["loaded_prompt_tokens"]
    assert loaded.sum() >= 8 * 4096 and set(loaded) <= {0, 4096}
    cpu = tiered["prefix_cache"]["offload"]["cpu"]
    assert cpu["hit_tokens"] == loaded.sum()
    # ~131 KB of KV per token (Llama-3.1-8B, bf16) at 25 GB/s: 21 ms per prefix instead of its prefill
    assert cpu["load_s"] == pytest.approx(loaded.sum() * 131072 / 25e9, rel=1e-9)
    assert back1["ttft_s"].mean() < back0["ttft_s"].mean()
    assert gpu_only["prefix_cache"]["offload"] == {} and (back0["loaded_prompt_tokens"] == 0).all()


def test_offload_needs_prefix_caching():
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"][0]["engine"] = {"enable_prefix_caching": False,
                                             "kv_offload": [{"name": "cpu", "capacity_gib": 10, "bandwidth_gbps": 20}]}
    with pytest.raises(ConfigError, match="kv_offload .* needs enable_prefix_caching"):
        parse_config(raw)
