"""Anomaly detection: scripted runs holding exactly one priority inversion, one head-of-line-blocked replica,
one preemption storm; a clean run reports none."""
import copy

import numpy as np
import pytest

from conftest import BASE, run_raw
from servesim.sim.anomalies import jain
from servesim.sim.report import build_report

LINEAR = {"name": "linear", "base_s": 1.0}


def _trace(tmp_path, name, rows):
    path = tmp_path / f"{name}.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n" + "".join(f"{a},{p},{o}\n" for a, p, o in rows))
    return str(path)


def _mix(tmp_path, parts, count=1, **engine):
    """parts: [(tenant, slo_class, rows)] as one mixed workload on `count` linear 1 s-per-step replicas."""
    raw = copy.deepcopy(BASE)
    g = raw["fleet"]["replicas"][0]
    g["count"] = count
    g["perf_model"] = LINEAR
    g["engine"] = {"enable_prefix_caching": False, **engine}
    raw["workload"] = {"kind": "mix", "parts": [
        {"kind": "trace", "path": _trace(tmp_path, f"{t}_{c}", rows), "tenant": t, "slo_class": c}
        for t, c, rows in parts]}
    raw["slo"] = {"classes": {"gold": {"priority": 0}, "bronze": {"priority": 1}}}
    return raw


def _anomalies(raw):
    res, df = run_raw(raw)
    return build_report(res, df)["anomalies"], df


def _inversion_raw(tmp_path, batching):
    # one sequence at a time (each part's trace starts at t=0). Gold A (10 tokens) and bronze X (3 tokens) arrive
    # at 0, bronze B (2 tokens) at 0.2. Shortest-job-first runs X, then B (before A, which arrived earlier: the
    # inversion), then A; FCFS runs A, X, B
    raw = _mix(tmp_path, [("t", "gold", [(0.0, 16, 10)]), ("t", "bronze", [(0.0, 16, 3), (0.2, 16, 2)])],
               max_num_seqs=1)
    raw["policies"] = {"batching": {"name": batching}}
    return raw


def test_exactly_one_priority_inversion(tmp_path):
    found, df = _anomalies(_inversion_raw(tmp_path, "sjf"))
    a = df[df["slo_class"] == "gold"]["id"].item()
    assert df.sort_values("first_scheduled_s")["slo_class"].tolist() == ["bronze", "bronze", "gold"]
    assert found["priority_inversions"] == {"checked": True, "count": 1, "requests": [a]}
    assert len(found["found"]) == 1 and "1 priority inversion" in found["found"][0]


def test_fcfs_has_no_inversion_and_a_clean_run_reports_nothing(tmp_path):
    found, _ = _anomalies(_inversion_raw(tmp_path, "continuous"))
    assert found["priority_inversions"]["count"] == 0
    assert found["hol_blocking"] == found["preemption_storms"] == found["kv_thrashing"] == found["starvation"] == []
    assert found["found"] == []


def test_without_priorities_inversions_are_not_checked(tmp_path):
    raw = _inversion_raw(tmp_path, "sjf")
    raw["slo"] = {"classes": {"gold": {}, "bronze": {}}}
    found, _ = _anomalies(raw)
    assert found["priority_inversions"] == {"checked": False, "count": 0, "requests": []}


def test_exactly_one_hol_blocked_replica(tmp_path):
    # tenant pools: the busy tenant's 12 requests all queue on replica 0 (one sequence at a time, 4 s each);
    # replicas 1 and 2 serve a request every 10 s and never queue
    busy = [(0.1 * i, 16, 4) for i in range(12)]
    light = [(10.0 * i, 16, 2) for i in range(5)]
    raw = _mix(tmp_path, [("busy", "gold", busy), ("light", "gold", light)], count=3, max_num_seqs=1)
    raw["policies"] = {"routing": {"name": "tenant_pools", "pools": {"busy": [0], "light": [1, 2]}}}
    found, df = _anomalies(raw)
    hol = found["hol_blocking"]
    assert [h["replica"] for h in hol] == [0] and hol[0]["others_mean_queue"] == 0.0
    # Little's law: queued seconds on replica 0 over the run's duration
    dur = df["finish_s"].max() - df["arrival_s"].min()
    assert hol[0]["mean_queue"] == pytest.approx(df[df["replica"] == 0]["queue_s"].sum() / dur, rel=1e-12)
    assert found["starvation"][0]["tenant"] == "busy"           # its queue is far longer than the light tenant's


def test_round_robin_spread_is_not_hol_blocking(tmp_path):
    rows = [(0.1 * i, 16, 4) for i in range(12)]
    raw = _mix(tmp_path, [("t", "gold", rows)], count=3, max_num_seqs=1)
    raw["policies"] = {"routing": {"name": "round_robin"}}
    found, _ = _anomalies(raw)
    assert found["hol_blocking"] == []


def test_exactly_one_preemption_storm(tmp_path):
    # a KV pool of 40 blocks of 16 and 10 ms steps: 20 requests arrive at once and grow until they preempt each
    # other; three more at t=500 fit and are never preempted
    burst = [(0.0, 16, 60) for _ in range(20)] + [(500.0, 16, 10) for _ in range(3)]
    raw = _mix(tmp_path, [("t", "gold", burst)], num_gpu_blocks_override=40, block_size=16)
    raw["fleet"]["replicas"][0]["perf_model"] = {"name": "linear", "base_s": 0.01}
    res, df = run_raw(raw)
    storms = build_report(res, df)["anomalies"]["preemption_storms"]
    times = np.array(res.metrics.replicas[0].preempt_times)
    assert len(storms) == 1 and storms[0]["replica"] == 0
    s = storms[0]
    inside = times[(times >= s["start_s"]) & (times <= s["end_s"])]
    assert s["preemptions"] == len(inside) >= 10 and s["end_s"] < 500


def test_jain_index():
    assert jain([1, 1, 1, 1]) == 1.0
    assert jain([1, 0, 0, 0]) == 0.25
    assert jain([1, 3]) == pytest.approx(16 / 20)
    assert jain([0.5]) is None


def test_kv_thrashing_counts_blocks_needed_again_soon_after_eviction(monkeypatch):
    from servesim.policies.eviction import LRU
    from servesim.sim import anomalies
    from servesim.sim.kv_cache import REFETCH_WINDOW_S, BlockPool
    from servesim.sim.request import Request

    pool = BlockPool(1, 16, enable_prefix_caching=True, eviction=LRU())

    def serve(i, block_id, now):
        """A 16-token prompt of trace block `block_id`: computed, published, freed (cached)."""
        pool.now = now
        r = Request(i, now, 16, 1, prefix_ids=[block_id], prefix_block_size=16)
        hits = pool.lookup(r, 16)
        assert pool.allocate(r, 16, hits)
        if not hits:
            r.num_computed = 16
            pool.register_full_blocks(r, 0, 16)
        pool.free(r)
        return bool(hits)

    serve(0, 7, 0.0)
    serve(1, 8, 1.0)            # evicts 7 at t=1
    serve(2, 7, 2.0)            # 7 again 1 s after its eviction: refetched (evicts 8 at t=2)
    assert (pool.evictions, pool.refetched) == (2, 1)
    serve(3, 8, 2.0 + REFETCH_WINDOW_S + 1)   # 8 again, but long after: not thrashing
    assert (pool.evictions, pool.refetched) == (3, 1)
    assert anomalies.kv_thrashing([pool]) == []             # below the count threshold
    monkeypatch.setattr(anomalies, "THRASH_MIN", 1)
    assert anomalies.kv_thrashing([pool]) == [{"replica": 0, "refetched_blocks": 1, "evicted_blocks": 3}]
