"""The fast decode path (sim/replica.py `_decode_run`) gives every request the plain path's timestamps.

Each scenario runs twice, with sim.fast_decode on and off (off: every step goes through the policy), and
every request's arrival, first scheduling, first token and finish must agree within 1e-9 relative; the
counts of iterations, preemptions and prefix-cache hits must be equal.
"""
import copy

import numpy as np

from conftest import BASE, run_fast_and_plain, run_raw

COLS = ["arrival_s", "first_scheduled_s", "first_token_s", "finish_s"]



def _same(raw):
    (res_f, df_f), (res_p, df_p) = run_fast_and_plain(raw)
    assert list(df_f["outcome"]) == list(df_p["outcome"])
    for c in COLS:
        a, b = df_f[c].to_numpy(float), df_p[c].to_numpy(float)
        assert np.array_equal(np.isnan(a), np.isnan(b)), c
        ok = ~np.isnan(a)
        np.testing.assert_allclose(a[ok], b[ok], rtol=1e-9, atol=0, err_msg=c)
    assert list(df_f["preemptions"]) == list(df_p["preemptions"])
    assert list(df_f["cached_prompt_tokens"]) == list(df_p["cached_prompt_tokens"])
    assert [s.iterations for s in res_f.metrics.replicas] == [s.iterations for s in res_p.metrics.replicas]
    assert res_f.metrics.itl.n == res_p.metrics.itl.n
    for h in (res_f.metrics.itl, res_p.metrics.itl):       # ITL's time sections (its confidence intervals)
        h.flush()
    assert res_f.metrics.itl.t0 == res_p.metrics.itl.t0 and res_f.metrics.itl.section_s == res_p.metrics.itl.section_s
    assert np.array_equal(res_f.metrics.itl.by_section, res_p.metrics.itl.by_section)
    # the time series and counters the report is built from
    assert np.array_equal(res_f.metrics.tokens_per_bucket, res_p.metrics.tokens_per_bucket)
    assert np.array_equal(res_f.metrics.replica_tokens, res_p.metrics.replica_tokens)
    for a, b in zip(res_f.metrics.replicas, res_p.metrics.replicas):
        assert len(a.samples) == len(b.samples)
        np.testing.assert_allclose(np.array(a.samples, float), np.array(b.samples, float), rtol=1e-9)
        assert (a.decode_tokens, a.prefill_tokens) == (b.decode_tokens, b.prefill_tokens)
        np.testing.assert_allclose([a.busy_s, a.kv_block_seconds, a.flops, a.bytes],
                                   [b.busy_s, b.kv_block_seconds, b.flops, b.bytes], rtol=1e-9)
    # the KV pools end alike: the same prefixes cached, as many evictions and refetches (thrashing)
    for a, b in zip(res_f.pools, res_p.pools):
        assert (a.evictions, a.refetched, a.num_used, a.num_cached_free) == \
            (b.evictions, b.refetched, b.num_used, b.num_cached_free)
        assert sorted(a.by_hash, key=str) == sorted(b.by_hash, key=str)
    return res_f, df_f


def _synthetic(n, rate, lo=20, hi=400, out_hi=200):
    return {"kind": "synthetic", "num_requests": n, "arrival": {"process": "poisson", "rate": rate},
            "lengths": {"kind": "independent", "input": {"dist": "uniform", "low": lo, "high": hi},
                        "output": {"dist": "uniform", "low": 1, "high": out_hi}}}


def test_preemption_and_chunked_prefill_on_a_small_pool():
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"][0]["engine"] = {"num_gpu_blocks_override": 120, "max_num_batched_tokens": 256}
    raw["workload"] = _synthetic(300, 15.0)
    res, df = _same(raw)
    assert df["preemptions"].sum() > 0


def _fast_base():
    """BASE without per-step invariant checks (they scan the whole, large pool; the small-pool scenario
    above keeps them on)."""
    raw = copy.deepcopy(BASE)
    raw["sim"] = {"check_invariants": False}
    return raw


def test_several_replicas_with_least_outstanding_routing():
    raw = _fast_base()
    raw["fleet"]["replicas"][0]["count"] = 3
    raw["policies"] = {"routing": {"name": "least_outstanding"}}
    raw["workload"] = _synthetic(400, 30.0)
    _same(raw)


def test_prefix_caching_on_the_mooncake_trace():
    raw = _fast_base()
    raw["fleet"]["replicas"][0].update(count=2, engine={"enable_prefix_caching": True, "num_gpu_blocks_override": 3000})
    raw["workload"] = {"kind": "trace", "path": "bundled:mooncake_conversation_head3000.jsonl.gz",
                       "max_requests": 300}
    res, df = _same(raw)
    assert df["cached_prompt_tokens"].sum() > 0


def test_kv_thrashing_counts_on_a_full_prefix_cache():
    """The Mooncake benchmark's fleet on its first 700 requests: the cache is full, so a decode run's new blocks
    evict cached ones, and it takes all its steps' blocks before publishing the blocks they filled. Refetches
    (KV thrashing) must still count as the plain path counts them: an eviction by a later step neither hides
    an earlier refetch (the window of remembered evictions) nor lets an earlier step publish a hash still
    cached when it ended."""
    raw = _fast_base()
    raw["seed"] = 0
    raw["fleet"]["replicas"][0].update(count=8, engine={"enable_prefix_caching": True})
    raw["policies"] = {"routing": {"name": "least_outstanding"}}
    raw["workload"] = {"kind": "trace", "path": "bundled:mooncake_conversation_head3000.jsonl.gz",
                       "max_requests": 700}
    res, _ = _same(raw)
    assert sum(p.refetched for p in res.pools) > 1000 and sum(p.evictions for p in res.pools) > 100_000


def test_closed_loop_clients_and_static_batching():
    raw = _fast_base()
    raw["workload"] = {"kind": "synthetic", "num_requests": 200,
                       "arrival": {"process": "closed_loop", "concurrency": 6, "think_time_s": 0.05},
                       "lengths": {"kind": "independent", "input": {"dist": "uniform", "low": 10, "high": 300},
                                   "output": {"dist": "uniform", "low": 1, "high": 120}}}
    _same(raw)
    raw["policies"] = {"batching": {"name": "static"}}
    _same(raw)


def _count_fast_steps(raw):
    """Run raw with the fast path on; return (result, steps committed by decode runs, runs cut by arrivals)."""
    from servesim.sim import decode_run as dr
    counts = {"steps": 0, "cuts": 0}
    commit, cut = dr.DecodeRun.commit, dr.DecodeRun.cut

    def counting_commit(self, replica):
        counts["steps"] += self.n
        return commit(self, replica)

    def counting_cut(self, t):
        shorter = cut(self, t)
        counts["cuts"] += shorter
        return shorter
    dr.DecodeRun.commit, dr.DecodeRun.cut = counting_commit, counting_cut
    try:
        res, _ = run_raw(raw)
    finally:
        dr.DecodeRun.commit, dr.DecodeRun.cut = commit, cut
    return res, counts["steps"], counts["cuts"]


def test_the_fast_path_really_runs():
    """A decode-heavy scenario: most iterations go through decode runs, not one step at a time."""
    raw = _fast_base()
    raw["workload"] = _synthetic(50, 2.0, out_hi=400)
    res, steps, _ = _count_fast_steps(raw)
    iterations = sum(s.iterations for s in res.metrics.replicas)
    assert steps > 0.8 * iterations, (steps, iterations)


def test_runs_go_past_arrivals_to_other_replicas_and_are_cut_by_their_own():
    """With count-only routing a run is not bounded by arrivals elsewhere in the fleet: on 8 replicas the
    runs are cut by arrivals (the plain path's timestamps still hold), and far fewer events are needed than
    when every arrival bounds every run."""
    raw = _fast_base()
    raw["fleet"]["replicas"][0]["count"] = 8
    raw["policies"] = {"routing": {"name": "round_robin"}}
    raw["workload"] = _synthetic(400, 40.0, out_hi=300)
    _same(raw)
    res, steps, cuts = _count_fast_steps(raw)
    assert cuts > 0
    iterations = sum(s.iterations for s in res.metrics.replicas)
    assert steps > 0.8 * iterations, (steps, iterations)
    assert res.events < 0.2 * iterations, (res.events, iterations)


def test_arrivals_that_coincide_with_step_ends():
    """Steps of exactly 1/8 s and arrivals every 1/2 s: arrivals land on step ends and on run starts, where
    the same-instant order (steps end, then arrivals are routed, then batches form) decides who runs."""
    raw = _fast_base()
    raw["fleet"]["replicas"][0].update(count=2, perf_model={"name": "linear", "base_s": 0.125})
    raw["policies"] = {"routing": {"name": "least_outstanding"}}
    raw["workload"] = {"kind": "synthetic", "num_requests": 120, "arrival": {"process": "constant", "rate": 2.0},
                       "lengths": {"kind": "independent", "input": {"dist": "uniform", "low": 10, "high": 40},
                                   "output": {"dist": "uniform", "low": 2, "high": 60}}}
    res, df = _same(raw)
    ends = df["first_scheduled_s"].to_numpy()
    assert np.all(ends * 8 == np.round(ends * 8))        # the timeline is on the 1/8 s grid: ties happen


def test_a_run_cut_by_max_sim_time_stops_at_the_same_token():
    """With sim.max_sim_time_s no step ending at or after the stop is applied, in either path."""
    raw = _fast_base()
    raw["workload"] = _synthetic(100, 4.0, out_hi=600)
    raw["sim"]["max_sim_time_s"] = 7.3
    res, df = _same(raw)
    assert (df["outcome"] == "unfinished").any()
    (rf, _), (rp, _) = run_fast_and_plain(raw)
    assert rf.metrics.itl.n == rp.metrics.itl.n
    assert [r.num_output for r in rf.metrics.requests] == [r.num_output for r in rp.metrics.requests]


def test_kv_offload_tiers_with_evictions_during_decode_runs():
    """A small GPU pool with a small CPU and SSD tier: decode runs evict cached blocks into the tiers and
    admissions load them back; both paths agree."""
    raw = _fast_base()
    raw["fleet"]["replicas"][0].update(count=2, engine={
        "enable_prefix_caching": True, "num_gpu_blocks_override": 2500,
        "kv_offload": [{"name": "cpu", "capacity_gib": 2, "bandwidth_gbps": 25},
                       {"name": "ssd", "capacity_gib": 8, "bandwidth_gbps": 4}]})
    raw["workload"] = {"kind": "trace", "path": "bundled:mooncake_conversation_head3000.jsonl.gz",
                       "max_requests": 200, "rate_scale": 0.5}
    res, df = _same(raw)
    assert df["loaded_prompt_tokens"].sum() > 0
    assert list(df["loaded_prompt_tokens"]) == list(run_fast_and_plain(raw)[1][1]["loaded_prompt_tokens"])


def _run_counting_schedules(raw):
    """Run raw with the fast path on; return (result, request table, the times schedule() was called)."""
    from servesim.policies.batching import ContinuousBatching
    calls = []
    schedule = ContinuousBatching.schedule

    def counting(self, q, now):
        calls.append(now)
        return schedule(self, q, now)
    ContinuousBatching.schedule = counting
    try:
        res, df = run_raw(raw)
    finally:
        ContinuousBatching.schedule = schedule
    return res, df, calls


def test_runs_end_with_a_finish_and_chain_without_the_policy(tmp_path):
    """Four requests admitted together, nothing arriving after: one schedule() (the admission step), then decode
    runs that each end with the step finishing a request and start the next at once. Steps of exactly
    0.125 s + 0.0078125 s per decoding sequence (linear model): request i finishes after its o_i steps."""
    trace = tmp_path / "t.csv"
    outs = [5, 9, 9, 20]
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n" + "".join(f"0.0,16,{o}\n" for o in outs))
    raw = _fast_base()
    raw["fleet"]["replicas"][0]["perf_model"] = {"name": "linear", "base_s": 0.125, "per_decode_seq_s": 0.0078125}
    raw["workload"] = {"kind": "trace", "path": str(trace)}
    res, df, calls = _run_counting_schedules(raw)
    assert calls == [0.0]
    # step 1: four prefills (0.125 s); then decode steps of 0.125 + 0.0078125 x (requests still running)
    t, finish, running = 0.125, [], 4
    for step in range(2, max(outs) + 1):
        t += 0.125 + 0.0078125 * running
        running -= sum(o == step for o in outs)
        finish += [t] * sum(o == step for o in outs)
    assert df["finish_s"].tolist() == finish                  # exact: every step time is a binary fraction
    assert df["first_token_s"].tolist() == [0.125] * 4
    assert res.metrics.replicas[0].iterations == max(outs)
    _same(raw)


def test_a_prompt_s_remaining_chunks_head_a_run(tmp_path):
    """A decodes alone; B arrives at 1 s with a 100-token prompt and the budget is 32 tokens. The plain path
    admits B at the end of the step running then, with a first chunk of 31 (A's decode takes one token); B's
    remaining chunks (31, 31, 7) head a run, one a step beside A's decodes, then A and B decode in its tail
    until B's last token; A's last run follows. Two schedule() calls; the exact timeline (linear model, steps
    of 0.125 s + 1/1024 s per prompt token + 1/128 s per decoding sequence: binary fractions)."""
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n0.0,16,40\n1.0,100,5\n")
    raw = _fast_base()
    raw["fleet"]["replicas"][0]["engine"] = {"max_num_batched_tokens": 32, "enable_chunked_prefill": True}
    raw["fleet"]["replicas"][0]["perf_model"] = {"name": "linear", "base_s": 0.125, "per_prefill_token_s": 1 / 1024,
                                                 "per_decode_seq_s": 1 / 128}
    raw["workload"] = {"kind": "trace", "path": str(trace)}
    res, df, calls = _run_counting_schedules(raw)
    _, steps, cuts = _count_fast_steps(raw)
    t = a_first = 0.125 + 16 / 1024                        # A's prompt
    for _ in range(7):                                     # A's decodes; B arrives during the 7th
        t += 0.125 + 1 / 128
    assert calls == [0.0, t]                               # the arrival cut A's run after that step
    for chunk in (31, 31, 31, 7):                          # B's chunks beside A's decodes: the first admitted
        t += 0.125 + chunk / 1024 + 1 / 128                # by the policy, the others a run's head
    b_first = t
    for _ in range(4):                                     # the tail: A and B decode, until B's fifth token
        t += 0.125 + 2 / 128
    b_finish = t
    for _ in range(40 - 1 - 7 - 4 - 4):                    # A alone again
        t += 0.125 + 1 / 128
    assert df["first_token_s"].tolist() == [a_first, b_first]
    assert df["finish_s"].tolist() == [t, b_finish]
    assert res.metrics.replicas[0].iterations == 40             # A is in every step: one token each
    assert cuts == 1 and steps == 40 - 2                        # all but the two policy steps ran in runs
    _same(raw)
