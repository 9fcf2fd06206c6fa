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
