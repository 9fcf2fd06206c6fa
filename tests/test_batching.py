"""Batching policies: exact scheduling decisions on scripted queues (as vLLM's scheduler tests assert
states), then each policy end to end."""
import copy
from collections import deque

import numpy as np
import pytest

from conftest import BASE, run_raw
from servesim.policies.batching import (ContinuousBatching, EarliestDeadlineFirst, FairShare, Orca, PrefillFirst,
                                        PriorityClasses, Sarathi, ShortestJobFirst)
from servesim.sim.kv_cache import BlockPool
from servesim.sim.request import Request


class Queue:
    """The replica's queue view that policies work on (sim/replica.py), without the engine."""

    def __init__(self, blocks=100, block_size=16):
        self.waiting, self.running = deque(), []
        self.pool = BlockPool(blocks, block_size)
        self.preempted = []
        self.num_batch = 0

    @property
    def num_running(self):
        return len(self.running)

    def preempt(self, req):
        self.pool.free(req)
        req.num_computed = 0
        self.preempted.append(req.id)
        self.waiting.appendleft(req)


def _req(i, prompt, output=10, arrival=0.0, slo_class="default"):
    return Request(i, arrival, prompt, output, slo_class=slo_class)


def _decoding(q, req):
    """Make req a running request that has its prompt cached and one token out (decoding)."""
    q.pool.allocate(req, req.prompt_tokens + 1)
    req.num_computed, req.num_output = req.prompt_tokens, 1
    q.running.append(req)


def _ids(batch):
    return [(r.id, n) for r, n in batch]


def test_continuous_running_first_then_fcfs_admissions_within_the_budget():
    q = Queue()
    _decoding(q, _req(0, 40))
    q.waiting.extend([_req(1, 300), _req(2, 100)])
    s = ContinuousBatching(max_num_seqs=8, max_num_batched_tokens=256, enable_chunked_prefill=True)
    assert _ids(s.schedule(q, 0.0)) == [(0, 1), (1, 255)]          # decode, then request 1's first chunk
    assert [r.id for r in q.running] == [0, 1] and [r.id for r in q.waiting] == [2]


def test_priority_admits_the_most_urgent_class_and_preempts_the_least():
    q = Queue(blocks=8, block_size=16)
    _decoding(q, _req(0, 47, slo_class="batch"))                    # 3 blocks each
    _decoding(q, _req(1, 47, slo_class="interactive"))
    q.pool.allocate(_req(99, 32), 32)                               # 2 blocks held elsewhere: 0 free
    for r in q.running:
        r.num_computed, r.num_output = 48, 2                        # token 49 needs a 4th block
    s = PriorityClasses(8, 256, True, priorities={"interactive": 0, "batch": 1})
    q.waiting.extend([_req(2, 16, slo_class="batch", arrival=0.0), _req(3, 16, slo_class="interactive", arrival=1.0)])
    # request 0 needs a block: none free, the least urgent running request (0 itself) is preempted
    batch = s.schedule(q, 2.0)
    assert q.preempted == [0] and _ids(batch) == []                # vLLM: no more running requests this step
    # next step: request 1 decodes with the freed blocks; admissions by priority: 3 (interactive) before 0, 2
    batch = s.schedule(q, 2.0)
    assert _ids(batch)[0] == (1, 1) and _ids(batch)[1][0] == 3
    assert [r.id for r in q.running][:2] == [1, 3]


def test_fcfs_preempts_the_most_recently_admitted():
    q = Queue(blocks=6, block_size=16)
    a, b = _req(0, 31), _req(1, 31)
    _decoding(q, a)
    _decoding(q, b)                                                 # 2 + 2 blocks, 2 free
    q.pool.allocate(_req(99, 32), 32)                               # 0 free
    a.num_computed = b.num_computed = 32
    a.num_output = b.num_output = 2                                 # both need a 3rd block now
    batch = ContinuousBatching(8, 256).schedule(q, 0.0)
    assert q.preempted == [1] and _ids(batch) == [(0, 1)]


def test_edf_admits_by_first_token_deadline():
    s = EarliestDeadlineFirst(8, 64, True, ttft_s={"interactive": 0.5, "batch": 30.0})
    q = Queue()
    q.waiting.extend([_req(0, 16, arrival=0.0, slo_class="batch"),        # deadline 30
                      _req(1, 16, arrival=2.0, slo_class="interactive"),  # 2.5
                      _req(2, 16, arrival=1.0, slo_class="other"),        # no SLO: after every deadline
                      _req(3, 16, arrival=1.5, slo_class="interactive")]) # 2.0
    assert [r.id for r, _ in s.schedule(q, 3.0)] == [3, 1, 0, 2]


def test_sjf_oracle_and_noisy_predictors():
    q = Queue()
    q.waiting.extend([_req(0, 16, output=500), _req(1, 16, output=20), _req(2, 16, output=100)])
    assert [r.id for r, _ in ShortestJobFirst(8, 32, True).schedule(q, 0.0)] == [1, 2]   # the budget fits two
    # noisy: the order of the predictions, which are the true lengths times lognormal(0, sigma) draws
    rng, twin = np.random.default_rng(5), np.random.default_rng(5)
    s = ShortestJobFirst(8, 1000, True, predictor="noisy", noise_sigma=1.0, rng=rng)
    reqs = [_req(i, 16, output=o) for i, o in enumerate([100, 110, 120, 130, 140])]
    q = Queue()
    q.waiting.extend(reqs)
    order = [r.id for r, _ in s.schedule(q, 0.0)]
    predicted = [r.output_tokens * twin.lognormal(0.0, 1.0) for r in reqs]   # drawn once each, in queue order
    assert order == list(np.argsort(predicted, kind="stable"))
    assert s.predicted == {r.id: p for r, p in zip(reqs, predicted)}


def test_sarathi_chunks_prompts_even_when_the_engine_says_not_to():
    q = Queue()
    _decoding(q, _req(0, 40))
    q.waiting.extend([_req(1, 300)])
    assert _ids(Sarathi(8, 256, enable_chunked_prefill=False).schedule(q, 0.0)) == [(0, 1), (1, 255)]


def test_orca_runs_a_prompt_whole_alongside_the_decodes():
    q = Queue()
    _decoding(q, _req(0, 40))
    q.waiting.extend([_req(1, 300), _req(2, 100)])
    s = Orca(8, 256)
    assert _ids(s.schedule(q, 0.0)) == [(0, 1)]                    # 300 > 255 left: not split, waits
    q2 = Queue()
    q2.waiting.extend([_req(1, 300), _req(2, 100)])
    assert _ids(s.schedule(q2, 0.0)) == [(1, 300)]                 # alone it runs whole, over the budget


def test_prefill_first_pauses_decodes_while_prompts_can_be_admitted():
    q = Queue()
    _decoding(q, _req(0, 40))
    q.waiting.extend([_req(1, 100), _req(2, 200)])
    s = PrefillFirst(8, 256)
    assert _ids(s.schedule(q, 0.0)) == [(1, 100)]                  # 2 does not fit the rest of the budget
    assert _ids(s.schedule(q, 0.0)) == [(2, 200)]                  # still a prompt to admit: decodes wait
    for r in q.running[1:]:
        r.num_computed, r.num_output = r.prompt_tokens, 1
    assert _ids(s.schedule(q, 0.0)) == [(0, 1), (1, 1), (2, 1)]     # nothing to admit: everyone decodes


def _dynamic(max_num_seqs, n=6):
    """Steps of 1/64 s (binary fractions: exact sums), prompts of 10 and 2 output tokens, a request every 1/16 s,
    dynamic batching with a 1/8 s timeout."""
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"][0].update(perf_model={"name": "linear", "base_s": 1 / 64},
                                       engine={"max_num_seqs": max_num_seqs})
    raw["policies"] = {"batching": {"name": "dynamic", "timeout_ms": 125.0}}
    raw["workload"] = {"kind": "synthetic", "num_requests": n, "arrival": {"process": "constant", "rate": 16.0},
                       "lengths": {"kind": "independent", "input": {"dist": "fixed", "value": 10},
                                   "output": {"dist": "fixed", "value": 2}}}
    return run_raw(raw)[1]


def test_dynamic_batching_launches_on_timeout_or_when_full():
    # timeout: request 0 waits until 1/8 s, when request 2 arrives (arrivals precede batch formation): {0, 1, 2}
    # run 1/8 -> 5/32 (prefill + 1 decode); request 3 at 3/16 waits until 5/16, when 5 arrives: {3, 4, 5}
    df = _dynamic(max_num_seqs=8)
    assert df["first_scheduled_s"].tolist() == [0.125] * 3 + [0.3125] * 3
    assert df["finish_s"].tolist() == [0.15625] * 3 + [0.34375] * 3
    # full: with batches of 2 the second request launches them at once
    df = _dynamic(max_num_seqs=2)
    assert df["first_scheduled_s"].tolist() == [0.0625, 0.0625, 0.1875, 0.1875, 0.3125, 0.3125]


def _mixed(policy, **params):
    raw = copy.deepcopy(BASE)
    raw["sim"] = {}
    raw["slo"] = {"classes": {"interactive": {"ttft_ms": 300}, "batch": {"ttft_ms": 20000}}}
    raw["workload"] = {"kind": "synthetic", "num_requests": 300, "slo_class": "interactive",
                       "arrival": {"process": "poisson", "rate": 40.0},
                       "lengths": {"kind": "independent", "input": {"dist": "uniform", "low": 500, "high": 3000},
                                   "output": {"dist": "uniform", "low": 10, "high": 400}}}
    raw["policies"] = {"batching": {"name": policy, **params}}
    return run_raw(raw)[1]


@pytest.mark.parametrize("policy, params", [("continuous", {}), ("static", {}), ("dynamic", {}), ("sarathi", {}),
                                            ("orca", {}),
                                            ("prefill_first", {}),
                                            ("edf", {}),
                                            ("priority", {"priorities": {"interactive": 0}}),
                                            ("sjf", {}), ("sjf", {"predictor": "noisy", "noise_sigma": 0.8}),
                                            ("fair", {"weights": {"interactive": 2}})])
def test_every_batching_policy_serves_every_request(policy, params):
    df = _mixed(policy, **params)
    assert (df["outcome"] == "finished").all()
    assert (df["generated_tokens"] == df["output_tokens"]).all()


def test_sjf_lowers_mean_queueing_under_load_and_prefill_first_raises_tpot():
    fcfs, sjf = _mixed("continuous"), _mixed("sjf")
    assert sjf["queue_s"].mean() < fcfs["queue_s"].mean()
    assert _mixed("prefill_first")["tpot_s"].quantile(0.99) > fcfs["tpot_s"].quantile(0.99)


def test_fair_share_admits_from_the_least_served_tenant_and_lifts_idle_ones():
    s = FairShare(8, 64, True, weights={"a": 1.0, "b": 3.0})
    s.served = {"a": 300, "b": 600}                    # counters: a 300, b 200
    s._backlogged = {"a", "b"}
    q = Queue()
    ra, rb = _req(0, 16), _req(1, 16)
    ra.tenant, rb.tenant = "a", "b"
    q.waiting.extend([ra, rb])
    assert [r.id for r, _ in s.schedule(q, 0.0)] == [1, 0]     # b first: 600 / 3 < 300
    assert s.served == {"a": 316, "b": 616}
    # tenant c arrives after idling with nothing served: lifted to the least backlogged counter, not 0
    rc = _req(2, 16)
    rc.tenant = "c"
    q.waiting.append(rc)
    s.schedule(q, 1.0)                                 # (a and b, never run here, are scheduled again)
    assert s.lift == {"c": pytest.approx(616 / 3)}     # b's counter when c became backlogged
    assert s.counter("c") == pytest.approx(616 / 3 + 16)


def _two_tenants(batching):
    raw = copy.deepcopy(BASE)
    raw["sim"] = {}
    raw["fleet"]["replicas"][0]["engine"] = {"max_num_seqs": 16}
    part = {"kind": "synthetic", "num_requests": 300, "arrival": {"process": "poisson", "rate": 30.0},
            "lengths": {"kind": "independent", "input": {"dist": "uniform", "low": 200, "high": 800},
                        "output": {"dist": "uniform", "low": 100, "high": 300}}}
    raw["workload"] = {"kind": "mix", "parts": [dict(part, tenant="a"), dict(part, tenant="b")]}
    raw["policies"] = {"batching": batching}
    return raw


def _served_in_first_half(df):
    """Tokens each tenant got while both were backlogged: outputs of requests finished in the first half."""
    half = df["finish_s"].max() / 2
    done = df[df["finish_s"] <= half]
    return done.groupby("tenant")["output_tokens"].sum()


def test_fair_share_splits_an_overloaded_replica_by_weight():
    fcfs = _served_in_first_half(run_raw(_two_tenants({"name": "continuous"}))[1])
    fair = _served_in_first_half(run_raw(_two_tenants({"name": "fair", "weights": {"a": 1, "b": 3}}))[1])
    assert 0.7 < fcfs["b"] / fcfs["a"] < 1.4
    assert 2.2 < fair["b"] / fair["a"] < 4.0


def test_fair_share_keeps_the_fast_and_plain_paths_identical():
    from test_fast_decode import _same
    _same(_two_tenants({"name": "fair", "weights": {"a": 1, "b": 3}}))


def test_fair_share_counts_tokens_of_requests_that_finish_inside_a_decode_run():
    """Under light load decode runs end with a finish: the finished request's tokens served in the run still
    reach its tenant's counter, as in the plain path, where every step went through schedule(). Every schedule()
    of the fast path leaves the counters as the plain path's schedule() at that instant does."""
    from test_fast_decode import _same
    snaps: list = []
    schedule = FairShare.schedule

    def recording_schedule(self, q, now):
        out = schedule(self, q, now)
        snaps[-1][round(now, 9)] = (dict(self.served), dict(self.lift))
        return out

    init = FairShare.__init__

    def recording_init(self, *a, **k):
        init(self, *a, **k)
        snaps.append({})
    raw = _two_tenants({"name": "fair", "weights": {"a": 1, "b": 3}})
    for part in raw["workload"]["parts"]:
        part.update(num_requests=60)
        part["arrival"]["rate"] = 2.0
    FairShare.schedule, FairShare.__init__ = recording_schedule, recording_init
    try:
        _same(raw)
    finally:
        FairShare.schedule, FairShare.__init__ = schedule, init
    fast, plain = snaps
    assert len(fast) < 0.5 * len(plain)                  # runs skipped most schedule() calls
    for t, counters in fast.items():
        assert plain[t] == counters, t
