"""Admission: exact accept/reject sequences, reasons counted, the TTFT predictor of SLO shedding."""
import copy

import pytest

from conftest import BASE, build_report, run_raw
from servesim.hwmodels.linear import LinearModel
from servesim.policies.admission import SLOShedding
from servesim.sim.request import Request


def _raw(admission, n, rate, prompt=50, output=50, base_s=1.0):
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"][0]["perf_model"] = {"name": "linear", "base_s": base_s}
    raw["policies"] = {"admission": admission}
    raw["workload"] = {"kind": "synthetic", "num_requests": n, "arrival": {"process": "constant", "rate": rate},
                       "lengths": {"kind": "independent", "input": {"dist": "fixed", "value": prompt},
                                   "output": {"dist": "fixed", "value": output}}}
    return raw


def test_token_bucket_admits_the_exact_burst_and_refill_sequence():
    """100-token requests every 0.25 s against a bucket of 300 tokens refilled at 100/s: 300, 225, 150 admit
    (leaving 50), 75 rejects, 100 admits (0), then one request in four."""
    raw = _raw({"name": "token_bucket", "default": {"tokens_per_s": 100, "burst_tokens": 300}}, 13, 4.0,
               base_s=0.01)
    res, df = run_raw(raw)
    assert "".join("A" if o == "finished" else "R" for o in df["outcome"]) == "AAARARRRARRRA"
    assert set(df.loc[df["outcome"] == "rejected", "reason"]) == {"rate_limited"}
    assert build_report(res, df)["requests"]["rejected_by_reason"] == {"rate_limited": 7}


def test_token_bucket_limits_only_the_tenants_it_names():
    raw = _raw({"name": "token_bucket", "tenants": {"other": {"tokens_per_s": 1, "burst_tokens": 1}}}, 13, 4.0,
               base_s=0.01)
    _, df = run_raw(raw)
    assert (df["outcome"] == "finished").all()              # the workload's tenant ("default") has no bucket


def test_max_queue_rejects_when_the_fleet_queue_is_full():
    """10 requests at t=0 all arrive before the first batch forms (arrivals precede scheduling within an
    instant), so max_waiting=3 of them wait and the other seven are rejected as they arrive."""
    raw = _raw({"name": "max_queue", "max_waiting": 3}, 10, 1.0, output=2)
    raw["fleet"]["replicas"][0]["engine"] = {"max_num_seqs": 1}
    raw["workload"]["arrival"] = {"process": "all_at_once"}
    _, df = run_raw(raw)
    assert list(df["outcome"]) == ["finished"] * 3 + ["rejected"] * 7
    assert set(df.loc[df["outcome"] == "rejected", "reason"]) == {"queue_full"}


class _Sched:
    budget = 512


class _Replica:
    def __init__(self, waiting, running):
        self.waiting, self.running = waiting, running
        self.scheduler = _Sched()
        self.model = LinearModel(base_s=0.01, per_prefill_token_s=0.001, per_decode_seq_s=0.002)


def _r(prompt, computed, outputs=0):
    r = Request(0, 0.0, prompt, 10)
    r.num_computed, r.num_output = computed, outputs
    return r


def test_slo_shedding_predicts_ttft_from_the_prefill_backlog():
    """Waiting prompts 1000 + 500, a running prompt 300/800 done, a decoding request; a 200-token prompt: 2200
    tokens ahead and its own at 512 per step = 5 steps of (0.01 + 0.512 + 0.002 x 1 decode) s."""
    rep = _Replica([_r(1000, 0), _r(500, 0)], [_r(800, 300), _r(100, 105, outputs=5)])
    assert SLOShedding.predicted_ttft(rep, _r(200, 0)) == pytest.approx(5 * (0.01 + 0.512 + 0.002), rel=1e-12)
    assert SLOShedding.predicted_ttft(_Replica([], []), _r(200, 0)) == pytest.approx(0.01 + 0.2, rel=1e-12)


def test_slo_shedding_rejects_what_would_miss_and_keeps_the_admitted_within_slo():
    def run(admission):
        raw = copy.deepcopy(BASE)
        raw["slo"] = {"classes": {"default": {"ttft_ms": 500}}}
        raw["policies"] = {"admission": admission}
        raw["workload"] = {"kind": "synthetic", "num_requests": 400, "arrival": {"process": "poisson", "rate": 60.0},
                           "lengths": {"kind": "independent", "input": {"dist": "uniform", "low": 2000, "high": 6000},
                                       "output": {"dist": "uniform", "low": 10, "high": 50}}}
        return run_raw(raw)[1]
    plain = run({"name": "accept_all"})
    shed = run({"name": "slo_shedding"})
    assert (plain["outcome"] == "finished").all()
    assert (plain["ttft_s"] > 0.5).mean() > 0.5                   # overloaded: most would miss
    rejected = shed["outcome"] == "rejected"
    assert rejected.sum() > 100 and set(shed.loc[rejected, "reason"]) == {"slo_shed"}
    admitted = shed[~rejected]
    assert (admitted["ttft_s"] <= 0.5).mean() > 0.9                # what is admitted mostly meets the SLO


def test_slo_shedding_gives_the_plain_paths_decisions_on_the_fast_path():
    """Fast and plain paths agree with shedding on. (It reads running requests' context lengths, which a decode
    run changes, so it declares reads_kv_state and runs stop at arrivals; under the overload where shedding
    acts, queues are rarely empty and decode runs rare, so this scenario would not catch a wrong flag.)"""
    from test_fast_decode import _same
    raw = copy.deepcopy(BASE)
    raw["sim"] = {}
    raw["fleet"]["replicas"][0]["count"] = 2
    raw["slo"] = {"classes": {"default": {"ttft_ms": 300}}}
    raw["policies"] = {"admission": {"name": "slo_shedding"}}
    raw["workload"] = {"kind": "synthetic", "num_requests": 400, "arrival": {"process": "poisson", "rate": 80.0},
                       "lengths": {"kind": "independent", "input": {"dist": "uniform", "low": 500, "high": 5000},
                                   "output": {"dist": "uniform", "low": 20, "high": 300}}}
    res, df = _same(raw)
    assert (df["reason"] == "slo_shed").sum() > 10
