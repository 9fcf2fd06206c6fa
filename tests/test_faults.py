"""Fault injection and client retries (sim/faults.py): exact timelines on linear step models (1 s steps),
conservation of requests across retries, the KV a crash loses, restart timing, and that a run with the
feature on but nothing injected is the run without it."""
import copy

import numpy as np
import pytest

from conftest import BASE, run_fast_and_plain, run_raw
from servesim.hwmodels.catalog import get_gpu, get_model
from servesim.hwmodels.memory import plan_memory
from servesim.sim.config import parse_config
from servesim.sim.errors import ConfigError
from servesim.sim.faults import node_map
from servesim.sim.kv_cache import BlockPool
from servesim.sim.kv_offload import OffloadStore, Tier
from servesim.sim.report import build_report, final_attempts
from servesim.sim.request import Request

LLAMA = "meta-llama/Llama-3.1-8B"


def _linear(count=2, **engine):
    return [{"count": count, "gpu": "H100-SXM", "model": LLAMA, "perf_model": {"name": "linear", "base_s": 1.0},
             "engine": {"enable_prefix_caching": False, **engine}}]


def _rows(tmp_path, rows, **extra):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n" + "".join(f"{a},{p},{o}\n" for a, p, o in rows))
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"] = _linear()
    raw["workload"] = {"kind": "trace", "path": str(trace)}
    raw["policies"] = {"routing": {"name": "round_robin"}}
    raw.update(extra)
    return raw


def _restart_s(load_gbps, startup):
    plan = plan_memory(get_model(LLAMA), get_gpu("H100-SXM"), tp=1, pp=1, dtype="bf16", kv_dtype="bf16",
                       block_size=16, gpu_memory_utilization=0.9, max_num_batched_tokens=8192, max_num_seqs=256)
    return plan.weight_bytes / (load_gbps * 1e9) + startup


def test_node_map_packs_replicas_in_order():
    assert node_map([4, 4, 4, 4], 8) == [[0], [0], [1], [1]]
    assert node_map([8, 2, 16, 2], 8) == [[0], [1], [2, 3], [4]]
    assert node_map([2, 4, 4], 8) == [[0], [0], [1]]


def test_pool_crash_forgets_everything_it_held():
    pool = BlockPool(10, 4, enable_prefix_caching=True, eviction=__import__(
        "servesim.policies.eviction", fromlist=["LRU"]).LRU(),
        offload=OffloadStore([Tier("cpu", 8, 1e9)], 1024.0))
    a, b = Request(0, 0.0, 8, 4), Request(1, 0.0, 8, 4)
    assert pool.allocate(a, 8) and pool.allocate(b, 8)
    pool.register_full_blocks(a, 0, 8)
    pool.free(a)                                           # 2 blocks cached and free, 2 in use by b
    pool.offload.put(("x", 1))
    assert (pool.num_used, pool.num_cached_free) == (2, 2)
    assert pool.crash() == 4
    assert (pool.num_used, pool.num_free, pool.num_cached_free) == (0, 10, 0)
    assert pool.lookup(Request(2, 0.0, 8, 4, prefix_ids=None), 8) == []
    assert pool.offload.find(("x", 1)) is None
    pool.check()


@pytest.mark.parametrize("fast", [True, False])
def test_crash_fails_in_flight_requests_and_loses_exactly_their_blocks(tmp_path, fast):
    # round robin: requests 0, 2 on replica 0; 1, 3 on replica 1 (32-token prompts, 8 outputs). Replica 1
    # crashes at 2.5 s, in its third step: each of its requests holds 3 blocks of 16 (32 prompt tokens +
    # the 33rd and 34th tokens): 6 blocks lost. No retries: both fail at 2.5 s.
    raw = _rows(tmp_path, [(0, 32, 8)] * 4, faults={"events": [{"kind": "crash", "at_s": 2.5, "replica": 1}]})
    raw["sim"]["fast_decode"] = fast
    res, df = run_raw(raw)
    assert [s.kv_blocks_lost for s in res.metrics.replicas] == [0, 6]
    assert df["outcome"].tolist() == ["finished", "failed", "finished", "failed"]
    lost = df[df["outcome"] == "failed"]
    assert (lost["reason"] == "replica_crash").all() and (lost["finish_s"] == 2.5).all()
    assert df.loc[df["replica"] == 0, "finish_s"].tolist() == [8.0, 8.0]     # the other replica is untouched
    rep = build_report(res, df)
    assert rep["requests"]["failed"] == 2
    ev = rep["faults"]["events"][0]
    assert (ev["kind"], ev["t"], ev["replicas"], ev["requests_lost"]) == ("crash", 2.5, [1], 2)


def test_restart_takes_the_cold_start_and_the_replica_serves_again(tmp_path):
    restart = _restart_s(4.0, 5.0)
    rows = [(0, 32, 4)] * 2 + [(t, 32, 4) for t in np.arange(3.0, 30.0, 1.0)]
    raw = _rows(tmp_path, rows, faults={"events": [{"kind": "crash", "at_s": 1.5, "replica": 1}],
                                        "restart": {"load_gbps": 4.0, "engine_startup_s": 5.0}})
    res, df = run_raw(raw)
    ev = res.faults.events[0]
    assert ev["until"] - ev["t"] == pytest.approx(restart, rel=1e-12)
    assert res.faults.up_changes == [(1.5, 1, False), (pytest.approx(1.5 + restart), 1, True)]
    back = df[(df["replica"] == 1) & (df["arrival_s"] > 1.5)]
    assert len(back) > 0 and back["first_scheduled_s"].min() >= 1.5 + restart
    # while it was down, every arrival went to replica 0
    during = df[(df["arrival_s"] > 1.5) & (df["arrival_s"] < 1.5 + restart)]
    assert (during["replica"] == 0).all()
    assert build_report(res, df)["faults"]["downtime_s"] == {"1": pytest.approx(restart)}


@pytest.mark.parametrize("policy", ["fail", "reroute", "timeout"])
def test_what_requests_on_a_crashed_replica_see(tmp_path, policy):
    # requests 1 and 3 are on replica 1 when it crashes at 2.5 s; clients retry once after 1 s (timeout 10 s)
    raw = _rows(tmp_path, [(0, 32, 8)] * 4, faults={"events": [{"kind": "crash", "at_s": 2.5, "replica": 1}],
                                                     "in_flight": policy},
                client={"timeout_s": 10.0, "max_retries": 1, "backoff_s": 1.0})
    res, attempts = run_raw(raw)
    retries = attempts[attempts["attempt"] == 1].sort_values("origin")
    first = attempts[attempts["origin"].isin([1, 3]) & (attempts["attempt"] == 0)]
    assert first["retried"].all() and (first["outcome"] == "failed").all()
    gave_up = {"fail": 2.5, "reroute": 2.5, "timeout": 10.0}[policy]       # sent at 0, timeout 10 s
    assert (first["finish_s"] == gave_up).all()
    assert (first["reason"] == ("timeout" if policy == "timeout" else "replica_crash")).all()
    resent = {"fail": 3.5, "reroute": 2.5, "timeout": 11.0}[policy]       # reroute: at once
    assert retries["origin"].tolist() == [1, 3] and (retries["sent_s"] == resent).all()
    assert (retries["arrival_s"] == 0.0).all()                               # latency counts from the first send
    assert (retries["outcome"] == "finished").all() and (retries["replica"] == 0).all()
    df = final_attempts(attempts)
    assert len(df) == 4 and (df["outcome"] == "finished").all()
    q = build_report(res, attempts)["faults"]["requests"]
    assert (q["total"], q["retried"], q["succeeded_after_retry"], q["attempts"], q["failed"]) == (4, 2, 2, 6, 0)


def test_client_timeouts_cancel_and_retry_without_faults(tmp_path):
    # one replica, max_num_seqs 1, three requests of 5 steps at t=0; timeout 7 s, one retry after 0.5 s.
    #   request 0 runs 0 .. 5; request 1 runs from 5 and request 2 waits: both time out at 7. Request 1 is
    #   dropped before the replica schedules at 7 (vLLM aborts between steps), its blocks freed.
    #   retries are sent at 7.5: retry 1 runs 7.5 .. 12.5; retry 2 runs from 12.5 and times out at 14.5 (7 s
    #   after it was sent) with no retries left.
    raw = _rows(tmp_path, [(0, 16, 5)] * 3, client={"timeout_s": 7.0, "max_retries": 1, "backoff_s": 0.5})
    raw["fleet"]["replicas"] = _linear(1, max_num_seqs=1)
    for fast in (True, False):
        raw["sim"]["fast_decode"] = fast
        res, attempts = run_raw(raw)
        a = attempts.set_index("id")
        assert (a.loc[0, "finish_s"], a.loc[0, "outcome"]) == (5.0, "finished")
        timed_out = attempts[(attempts["attempt"] == 0) & (attempts["outcome"] == "failed")]
        assert timed_out["origin"].tolist() == [1, 2] and (timed_out["finish_s"] == 7.0).all()
        assert (timed_out["reason"] == "timeout").all()
        r = attempts[attempts["attempt"] == 1].set_index("origin")
        assert r.loc[1, ["sent_s", "first_scheduled_s", "finish_s", "outcome"]].tolist() == [7.5, 7.5, 12.5, "finished"]
        assert r.loc[2, ["first_scheduled_s", "finish_s", "outcome"]].tolist() == [12.5, 14.5, "failed"]
        assert final_attempts(attempts)["outcome"].tolist() == ["finished", "finished", "failed"]
        assert res.pools[0].num_used == 0


def test_straggler_slows_the_steps_it_covers(tmp_path):
    # one request (16 + 5 tokens) on one replica; steps starting in [2, 6) take 3 s: tokens at 1, 2, 5, 8, 9
    raw = _rows(tmp_path, [(0, 16, 5)], faults={"events": [
        {"kind": "straggler", "at_s": 2.0, "replica": 0, "duration_s": 4.0, "slowdown": 3.0}]})
    raw["fleet"]["replicas"] = _linear(1)
    for fast in (True, False):
        raw["sim"]["fast_decode"] = fast
        res, df = run_raw(raw)
        assert (df.loc[0, "first_token_s"], df.loc[0, "finish_s"]) == (1.0, 9.0)
    # 50 tokens: the decode steps from 2 s on may run as one closed-form run, slowed as the plain steps are
    # (steps starting at 2 and 5 take 3 s each): the last token at 1 + 49 + 2 x 2 = 54
    raw = _rows(tmp_path, [(0, 16, 50)], faults={"events": [
        {"kind": "straggler", "at_s": 2.0, "replica": 0, "duration_s": 4.0, "slowdown": 3.0}]})
    raw["fleet"]["replicas"] = _linear(1)
    for fast in (True, False):
        raw["sim"]["fast_decode"] = fast
        assert run_raw(raw)[1].loc[0, "finish_s"] == 54.0


def test_network_fault_slows_the_transfers_it_covers(tmp_path):
    from test_disaggregation import KV_PER_TOKEN, _raw as disagg
    rows = [(0, 1000, 3), (10, 1000, 3), (30, 1000, 3)]
    raw = disagg(tmp_path, rows, {"bandwidth_gbps": 50.0, "latency_us": 10.0})
    raw["faults"] = {"events": [{"kind": "network", "at_s": 5.0, "duration_s": 20.0, "bandwidth_factor": 0.01}]}
    res, df = run_raw(raw)
    full = 10e-6 + 1000 * KV_PER_TOKEN / 50e9
    slow = 10e-6 + 1000 * KV_PER_TOKEN / (50e9 * 0.01)
    np.testing.assert_allclose(df["kv_transfer_s"], [full, slow, full], rtol=1e-12)


def test_node_loss_crashes_every_replica_on_the_node(tmp_path):
    raw = _rows(tmp_path, [(t, 32, 4) for t in np.arange(0.0, 20.0, 0.5)],
                faults={"events": [{"kind": "node_loss", "at_s": 5.0, "node": 1}], "gpus_per_node": 2})
    raw["fleet"]["replicas"] = _linear(4)            # one GPU each: nodes [0], [0], [1], [1]
    res, df = run_raw(raw)
    assert res.faults.events[0]["replicas"] == [2, 3]
    assert [s.kv_blocks_lost > 0 for s in res.metrics.replicas] == [False, False, True, True]
    mid = df[(df["arrival_s"] > 5.0) & (df["arrival_s"] < res.faults.events[0]["until"])]
    assert set(mid["replica"]) <= {0, 1}


def _roofline_faults(**faults):
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"] = [{"count": 3, "gpu": "H100-SXM", "model": LLAMA,
                                 "engine": {"max_num_seqs": 32, "num_gpu_blocks_override": 1200}}]   # small: cheap checks
    raw["workload"] = {"kind": "synthetic", "num_requests": 1500, "arrival": {"process": "poisson", "rate": 40.0},
                       "lengths": {"kind": "independent", "input": {"dist": "uniform", "low": 50, "high": 1500},
                                   "output": {"dist": "uniform", "low": 10, "high": 300}}}
    raw["faults"] = faults
    raw["client"] = {"timeout_s": 20.0, "max_retries": 2, "backoff_s": 0.5}
    return raw


def test_conservation_under_random_crashes_and_retries():
    raw = _roofline_faults(random=[{"kind": "crash", "rate_per_hour": 120.0},
                                   {"kind": "straggler", "rate_per_hour": 120.0, "duration_s": 5.0}],
                           restart={"load_gbps": 8.0, "engine_startup_s": 2.0})
    res, attempts = run_raw(raw)
    assert sum(e["kind"] == "crash" for e in res.faults.events) >= 2
    # every request the workload sent ends exactly once, by its last attempt; attempts are linked
    df = final_attempts(attempts)
    assert sorted(df["origin"]) == list(range(1500))
    assert df["outcome"].isin(["finished", "failed"]).all()
    for origin, g in attempts.groupby("origin"):
        g = g.sort_values("attempt")
        assert g["attempt"].tolist() == list(range(len(g)))
        assert g["retried"].tolist() == [True] * (len(g) - 1) + [False]
        assert (g["outcome"].iloc[:-1] == "failed").all()
        assert (g["arrival_s"] == g["arrival_s"].iloc[0]).all()
    assert res.metrics.in_system == 0 and res.metrics.done == len(attempts)
    q = build_report(res, attempts)["faults"]["requests"]
    assert q["attempts"] == len(attempts) and q["total"] == 1500 and q["retried"] > 0
    # the same seed gives the same faults and the same outcome
    res2, attempts2 = run_raw(raw)
    assert res2.faults.events == res.faults.events
    assert attempts2["finish_s"].equals(attempts["finish_s"])


def test_nothing_injected_is_the_run_without_faults():
    base = _roofline_faults()
    del base["faults"], base["client"]
    _, plain = run_raw(base)
    for extra in ({"faults": {}}, {"faults": {"events": []}, "client": {"timeout_s": 1e6, "max_retries": 3}}):
        _, with_feature = run_raw({**base, **extra})
        for col in ("replica", "first_scheduled_s", "first_token_s", "finish_s", "outcome", "preemptions"):
            assert with_feature[col].equals(plain[col]), (extra, col)


def test_bad_fault_configs(tmp_path):
    raw = _rows(tmp_path, [(0, 32, 4)], faults={"events": [{"kind": "crash", "at_s": 1.0, "replica": 5}]})
    with pytest.raises(ConfigError, match=r"faults.events\[0\].replica: 5 is not a replica index \(0..1\)"):
        parse_config(raw)
    raw["faults"] = {"events": [{"kind": "straggler", "at_s": 1.0, "replica": 0}]}
    with pytest.raises(ConfigError, match="a straggler fault needs duration_s"):
        parse_config(raw)
    raw["faults"] = {"events": [{"kind": "network", "at_s": 1.0, "duration_s": 5}]}
    with pytest.raises(ConfigError, match="this fleet has no disaggregation"):
        parse_config(raw)
    raw["faults"] = {"in_flight": "timeout"}
    with pytest.raises(ConfigError, match="set client.timeout_s"):
        parse_config(raw)
    raw["faults"] = {"events": [{"kind": "node_loss", "at_s": 1.0, "node": 3}]}
    with pytest.raises(ConfigError, match=r"faults.events\[0\].node: 3 is not a node of this fleet \(0..0"):
        run_raw(raw)


@pytest.mark.parametrize("policy", ["timeout", "reroute"])
def test_disaggregated_crashes_under_a_kv_reading_router_match_the_plain_path(policy):
    # prefill and decode replicas crash while KV transfers are on their way; the router reads KV usage, which
    # decode runs change: retries (arriving between trace arrivals) must bound the runs like arrivals do
    raw = _roofline_faults(events=[{"kind": "crash", "at_s": 10.0, "replica": 0},
                                   {"kind": "crash", "at_s": 20.0, "replica": 3}],
                           restart={"load_gbps": 8.0, "engine_startup_s": 1.0}, in_flight=policy)
    g = raw["fleet"]["replicas"][0]
    raw["fleet"]["replicas"] = [{**g, "count": 2, "name": "p", "role": "prefill"},
                                {**g, "count": 2, "name": "d", "role": "decode"}]
    raw["disaggregation"] = {"bandwidth_gbps": 5.0}
    raw["policies"] = {"routing": {"name": "least_kv"}}
    raw["client"] = {"timeout_s": 5.0, "max_retries": 3, "backoff_s": 0.2}
    (res, a), (_, b) = run_fast_and_plain(raw)
    for col in ("replica", "first_scheduled_s", "first_token_s", "finish_s", "outcome", "attempt"):
        assert a[col].equals(b[col]), col
    assert [e["requests_lost"] > 0 for e in res.faults.events] == [True, True]
    df = final_attempts(a)
    assert sorted(df["origin"]) == list(range(1500)) and df["outcome"].isin(["finished", "failed"]).all()
    assert (a["attempt"] > 0).any()
    assert res.metrics.in_system == 0


def test_retries_bound_decode_runs_when_the_router_reads_kv_state():
    raw = _roofline_faults(events=[{"kind": "crash", "at_s": 8.0, "replica": 0},
                                   {"kind": "crash", "at_s": 15.0, "replica": 1}],
                           restart={"load_gbps": 8.0, "engine_startup_s": 1.0})
    raw["policies"] = {"routing": {"name": "least_kv"}}
    raw["client"] = {"timeout_s": 3.0, "max_retries": 3, "backoff_s": 0.1}
    (_, a), (_, b) = run_fast_and_plain(raw)
    assert (a["attempt"] > 0).sum() > 20
    for col in ("replica", "first_scheduled_s", "finish_s", "outcome"):
        assert a[col].equals(b[col]), col


def test_crashes_with_pipeline_parallel_swap_and_batch_jobs_lose_nothing():
    # pipeline parallel replicas (micro-batches in flight when they crash), swap preemption, and a batch job
    # whose lost requests go back to its queue: every request still ends exactly once
    raw = _roofline_faults(events=[{"kind": "crash", "at_s": 6.0, "replica": 0},
                                   {"kind": "crash", "at_s": 12.0, "replica": 1}],
                           restart={"load_gbps": 8.0, "engine_startup_s": 1.0})
    g = raw["fleet"]["replicas"][0]
    g["pipeline_parallel_size"] = 2
    g["engine"]["preemption_mode"] = "swap"
    online = raw["workload"]
    online["num_requests"] = 600
    raw["workload"] = {"kind": "mix", "parts": [online, {"kind": "batch", "jobs": [
        {"name": "j", "submit_s": 2.0, "deadline_s": 100.0, "num_requests": 200,
         "lengths": {"kind": "independent", "input": {"dist": "fixed", "value": 300},
                     "output": {"dist": "fixed", "value": 100}}}]}]}
    res, attempts = run_raw(raw)
    df = final_attempts(attempts)
    assert len(df) == 800 and sorted(df["origin"]) == list(range(800))
    assert df["outcome"].isin(["finished", "failed"]).all()
    batch = df[df["job"] == "j"]
    assert (batch["outcome"] == "finished").all()                      # lost batch work was re-queued
    assert (attempts.loc[attempts["job"] == "j", "attempt"] > 0).any()
    assert res.metrics.in_system == 0
