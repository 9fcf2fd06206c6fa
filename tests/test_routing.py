"""Routers: exact assignment sequences on scripted arrivals."""
import copy
from collections import Counter

from conftest import BASE, run_raw


def _run(policy, arrivals, count=3, output=1):
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"][0].update(count=count, perf_model={"name": "linear", "base_s": 1.0})
    raw["policies"] = {"routing": {"name": policy}}
    raw["workload"] = {"kind": "synthetic", "num_requests": len(arrivals),
                       "arrival": {"process": "constant", "rate": 1.0},
                       "lengths": {"kind": "independent", "input": {"dist": "fixed", "value": 8},
                                   "output": {"dist": "fixed", "value": output}}}
    return run_raw(raw)[1]


def test_round_robin_cycles_in_index_order():
    df = _run("round_robin", range(7))
    assert df["replica"].tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_least_outstanding_prefers_idle_replicas_then_lowest_index():
    # constant rate 1/s, each request takes 3 one-second steps: r0 -> 0, r1 -> 1, r2 -> 2,
    # r3 at t=3 finds replica 0 just freed (its request finished at t=3) and ties break to index 0
    df = _run("least_outstanding", range(6), output=3)
    assert df["replica"].tolist() == [0, 1, 2, 0, 1, 2]
    assert (df["queue_s"] == 0).all()


def test_random_routing_is_roughly_uniform():
    df = _run("random", range(3000), count=3)
    counts = Counter(df["replica"])
    assert set(counts) == {0, 1, 2}
    assert all(abs(c - 1000) < 4 * (3000 * (1 / 3) * (2 / 3)) ** 0.5 for c in counts.values())


# --- the routers on scripted replica views: exact decisions ------------------------------------------
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from servesim.policies.routing import LeastKVUsage, PowerOfTwoChoices, PrefixAware, SessionAffinity  # noqa: E402
from servesim.sim.request import Request  # noqa: E402


class View:
    def __init__(self, outstanding=0, kv_free=1.0, cached=0):
        self.outstanding, self.kv_free_fraction, self._cached = outstanding, kv_free, cached

    def cached_prefix_tokens(self, req):
        return self._cached


def _req(i=0, prompt=1000, session=-1, prefix_ids=None):
    return Request(i, 0.0, prompt, 10, session=session, prefix_ids=prefix_ids, prefix_block_size=512)


def test_least_kv_takes_the_most_free_pool_first_index_on_ties():
    r = LeastKVUsage()
    assert r.route(_req(), [View(kv_free=0.2), View(kv_free=0.7), View(kv_free=0.7)], 0) == 1


def test_power_of_two_takes_the_less_loaded_of_its_two_draws():
    loads = [5, 0, 9, 3]
    rng = np.random.default_rng(3)
    router = PowerOfTwoChoices(np.random.default_rng(3))
    views = [View(outstanding=n) for n in loads]
    for _ in range(200):
        a, b = rng.choice(4, size=2, replace=False)            # the draws the router makes
        want = min((loads[a], a), (loads[b], b))[1]
        assert router.route(_req(), views, 0) == want
    # the most loaded replica is never chosen: it loses every draw it is in
    router = PowerOfTwoChoices(np.random.default_rng(0))
    assert 2 not in {router.route(_req(), views, 0) for _ in range(300)}


def test_prefix_aware_follows_the_cache_unless_the_fleet_is_imbalanced():
    r = PrefixAware(cache_threshold=0.5, balance_abs_threshold=4, balance_rel_threshold=1.5)
    # balanced: the longest match covering >= half the prompt wins, even on a busier replica
    assert r.route(_req(prompt=1000), [View(2), View(5, cached=512), View(3, cached=768)], 0) == 2
    # equal matches: the less loaded one
    assert r.route(_req(prompt=1000), [View(2), View(5, cached=768), View(3, cached=768)], 0) == 2
    # a match below the threshold: least loaded
    assert r.route(_req(prompt=1000), [View(2), View(1, cached=0), View(3, cached=256)], 0) == 1
    # imbalanced (9 - 1 > 4 and 9 > 1.5 x 1): least loaded, whatever the cache holds
    assert r.route(_req(prompt=1000), [View(9, cached=1000), View(1), View(4)], 0) == 1


def test_session_affinity_is_sticky_and_consistent_when_the_fleet_grows():
    r = SessionAffinity()
    reqs = [_req(i, session=i % 500) for i in range(2000)]
    four = [r.route(q, [View()] * 4, 0) for q in reqs]
    by_session = {}
    for q, i in zip(reqs, four):
        assert by_session.setdefault(q.session, i) == i            # every turn of a session on one replica
    counts = Counter(by_session.values())
    assert set(counts) == {0, 1, 2, 3} and max(counts.values()) < 1.5 * min(counts.values())
    five = [r.route(q, [View()] * 5, 0) for q in reqs[:500]]
    moved = [a != b for a, b in zip(four[:500], five)]
    assert all(b == 4 for a, b in zip(four[:500], five) if a != b)  # sessions move only to the new replica
    assert 0.1 < np.mean(moved) < 0.3                               # about 1/5 of them
    # without sessions, requests spread by their ids
    alone = Counter(r.route(_req(i), [View()] * 4, 0) for i in range(4000))
    assert all(abs(c - 1000) < 150 for c in alone.values())            # within 15% (160 points a replica)


def _mooncake(policy, **params):
    """600 requests of the Mooncake conversation trace on 4 replicas whose caches hold ~1.6 M tokens each, so
    a conversation's earlier turn is still cached where it ran."""
    raw = copy.deepcopy(BASE)
    raw["sim"] = {}
    raw["fleet"]["replicas"][0].update(count=4, engine={"enable_prefix_caching": True,
                                                        "num_gpu_blocks_override": 100_000})
    raw["policies"] = {"routing": {"name": policy, **params}}
    raw["workload"] = {"kind": "trace", "path": "bundled:mooncake_conversation_head3000.jsonl.gz",
                       "max_requests": 600}
    res, df = run_raw(raw)
    return df["cached_prompt_tokens"].sum() / df["prompt_tokens"].sum()


def test_prefix_aware_routing_doubles_the_prefix_hit_rate_on_the_mooncake_trace():
    base = _mooncake("round_robin")                   # ~8%: mostly the system-prompt block every request shares
    assert _mooncake("prefix_aware") > 2 * base       # ~17%: later turns meet their conversation's cache


@pytest.mark.parametrize("name", ["least_kv", "power_of_two", "prefix_aware", "session_affinity"])
def test_every_router_runs_from_config(name):
    df = _run(name, range(30), count=3, output=2)
    assert (df["outcome"] == "finished").all() and set(df["replica"]) <= {0, 1, 2}


def test_tenant_pools_keep_each_tenant_on_its_replicas():
    from test_multitenant import _part
    raw = copy.deepcopy(BASE)
    raw["sim"] = {}
    raw["fleet"]["replicas"][0]["count"] = 4
    raw["workload"] = {"kind": "mix", "parts": [_part("chat", "default", 100, 20.0, 50, 300, 50),
                                                _part("etl", "default", 100, 20.0, 50, 300, 50),
                                                _part("misc", "default", 50, 10.0, 50, 300, 50)]}
    raw["policies"] = {"routing": {"name": "tenant_pools", "pools": {"chat": [0], "etl": [1, 2]}}}
    _, df = run_raw(raw)
    assert set(df.loc[df["tenant"] == "chat", "replica"]) == {0}
    assert set(df.loc[df["tenant"] == "etl", "replica"]) == {1, 2}
    assert set(df.loc[df["tenant"] == "misc", "replica"]) == {3}         # the replica in no pool
    raw["policies"]["routing"]["pools"]["etl"] = [1, 4]
    with pytest.raises(Exception, match=r"policies.routing.pools.etl: replica indices must be in 0..3"):
        run_raw(raw)
