"""Autoscaling: cold starts in the arrivals they affect, no flapping under constant load, nothing lost on
scale-down, paid seconds."""
import copy

import numpy as np
import pytest

from conftest import BASE, run_raw
from servesim.hwmodels.catalog import get_gpu, get_model
from servesim.hwmodels.memory import plan_memory
from servesim.sim.config import parse_config
from servesim.sim.errors import ConfigError
from servesim.sim.report import build_report


def _raw(arrival, n=None, duration=None, count=4, **scaling):
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"][0].update(count=count, perf_model={"name": "linear", "base_s": 0.05,
                                                                 "per_prefill_token_s": 1e-4})
    raw["fleet"]["replicas"][0]["engine"] = {"enable_prefix_caching": False, "max_num_seqs": 8}
    wl = raw["workload"]
    wl["arrival"] = arrival
    wl.pop("num_requests")
    if n:
        wl["num_requests"] = n
    if duration:
        wl["duration_s"] = duration
    wl["lengths"] = {"kind": "independent", "input": {"dist": "fixed", "value": 100},
                     "output": {"dist": "fixed", "value": 20}}
    raw["autoscaling"] = {"min_replicas": 1, "metric": "concurrency", "target": 4, "interval_s": 5,
                          "scale_down_cooldown_s": 30, "cold_start": {"load_gbps": 2.0, "engine_startup_s": 10},
                          **scaling}
    raw["sim"]["check_invariants"] = False
    return raw


def test_cold_start_is_weights_over_bandwidth_plus_startup_and_delays_the_new_replicas():
    res, df = run_raw(_raw({"process": "constant", "rate": 20}, duration=120))
    a = res.autoscaling
    plan = plan_memory(get_model("meta-llama/Llama-3.1-8B"), get_gpu("H100-SXM"))
    assert a["cold_start_s"] == pytest.approx(plan.weight_bytes / 2e9 + 10, rel=1e-12)
    starts = [e for e in a["events"] if e["to"] == "starting"]
    assert starts and starts[0]["t"] == 5.0                # the first evaluation already sees the load
    for s in starts:
        ready = next(e for e in a["events"] if e["replica"] == s["replica"] and e["from"] == "starting"
                     and e["t"] > s["t"])
        assert ready["t"] == pytest.approx(s["t"] + a["cold_start_s"], rel=1e-12)
        mine = df[df["replica"] == s["replica"]]
        # nothing reaches the replica before its cold start is over: arrivals meanwhile went elsewhere
        assert mine["arrival_s"].min() >= ready["t"]
        during = df[(df["arrival_s"] > s["t"]) & (df["arrival_s"] < ready["t"])]
        assert len(during) and (during["replica"] != s["replica"]).all()


def test_no_flapping_under_constant_load():
    res, df = run_raw(_raw({"process": "constant", "rate": 20}, duration=600))
    ev = res.autoscaling["events"]
    assert ev and max(e["t"] for e in ev) < 120               # settles, then holds for the remaining 8 minutes
    tl = res.autoscaling["timeline"]
    later = {r["active"] for r in tl if r["t"] > 120}
    assert len(later) == 1


def test_scale_down_drains_and_loses_nothing():
    # a load that rises and falls (diurnal, 300 s): replicas scale up, then drain while requests still arrive;
    # a draining replica takes nothing new and turns off at the finish of its last request
    res, df = run_raw(_raw({"process": "diurnal", "rate": 10, "amplitude": 0.9, "period_s": 300}, duration=300))
    rep = build_report(res, df)
    assert (df["outcome"] == "finished").all() and df["id"].is_unique
    assert rep["requests"]["finished"] == len(df) == len(res.workload)
    ev = res.autoscaling["events"]
    drains = [e for e in ev if e["to"] == "draining"]
    assert drains
    for d in drains:
        off = next(e for e in ev if e["replica"] == d["replica"] and e["t"] >= d["t"] and e["from"] == "draining")
        mine = df[df["replica"] == d["replica"]]
        assert not ((mine["arrival_s"] > d["t"]) & (mine["arrival_s"] < off["t"])).any()
        if off["to"] == "off":                      # (else reactivated by a scale-up while draining)
            before = mine[mine["arrival_s"] <= d["t"]]
            assert before["finish_s"].max() == off["t"]
    tl = res.autoscaling["timeline"]
    assert tl[-1]["active"] < max(r["active"] for r in tl) == 4


def test_paid_seconds_and_cost():
    res, df = run_raw(_raw({"process": "constant", "rate": 20}, duration=120, warm_pool=1))
    rep = build_report(res, df)
    dur = rep["sim"]["simulated_s"]
    paid = res.paid_s
    assert paid[0] == pytest.approx(dur)                      # the initial replica runs throughout
    assert paid[1] == pytest.approx(dur)                      # so does the warm one (it is activated, not started)
    # per replica, paid = the time outside 'off' from its events
    for i in range(4):
        up, since = 0.0, 0.0 if i in (0, 1) else None
        for e in [e for e in res.autoscaling["events"] if e["replica"] == i]:
            if e["to"] == "off" and since is not None:
                up, since = up + e["t"] - since, None
            elif e["to"] != "off" and since is None:
                since = e["t"]
        if since is not None:
            up += res.sim_end - since
        assert paid[i] == pytest.approx(up, abs=1e-9)
    price = res.replicas[0].usd_per_gpu_hour
    assert rep["cost"]["usd"] == pytest.approx(sum(paid.values()) * price / 3600, rel=1e-12)
    assert rep["cost"]["usd"] < 4 * dur * price / 3600


def test_same_seed_same_scaling():
    a = run_raw(_raw({"process": "poisson", "rate": 30}, duration=90))[0].autoscaling
    b = run_raw(_raw({"process": "poisson", "rate": 30}, duration=90))[0].autoscaling
    assert a == b


def test_diurnal_arrivals_follow_the_rate():
    raw = _raw({"process": "diurnal", "rate": 20, "amplitude": 0.8, "period_s": 1000}, duration=1000)
    del raw["autoscaling"]
    res, df = run_raw(raw)
    t = df["arrival_s"].to_numpy()
    assert len(t) == pytest.approx(20 * 1000, rel=0.05)
    trough = ((t < 100) | (t > 900)).sum() / 200                # 20 x (1 - 0.8 cos(2 pi t / 1000)): ~5/s here
    peak = ((t > 400) & (t < 600)).sum() / 200                  # ~35/s
    assert trough == pytest.approx(20 * (1 - 0.8 * np.sin(np.pi / 5) / (np.pi / 5)), rel=0.1)   # mean of the rate over the window
    assert peak == pytest.approx(20 * (1 + 0.8 * np.sin(np.pi / 5) / (np.pi / 5)), rel=0.1)


@pytest.mark.parametrize("change,msg", [
    ({"group": 3}, "autoscaling.group: 3 is not an index into fleet.replicas"),
    ({"min_replicas": 5}, "need min_replicas <= initial_replicas"),
    ({"warm_pool": 4}, "initial_replicas \\+ warm_pool"),
    ({"metric": "slo_attainment", "target": 95}, "a fraction in \\(0, 1\\]"),
])
def test_bad_autoscaling_config(change, msg):
    raw = _raw({"process": "constant", "rate": 20}, duration=10)
    raw["autoscaling"].update(change)
    with pytest.raises(ConfigError, match=msg):
        parse_config(raw)


def test_fixed_replica_routers_are_refused():
    raw = _raw({"process": "constant", "rate": 20}, duration=10)
    raw["policies"] = {"routing": {"name": "tenant_pools", "pools": {"a": [0]}}}
    with pytest.raises(ConfigError, match="names fixed replicas"):
        parse_config(raw)


def test_fast_decode_runs_agree_with_the_plain_path_under_autoscaling():
    raw = _raw({"process": "diurnal", "rate": 10, "amplitude": 0.9, "period_s": 300}, duration=300)
    raw["fleet"]["replicas"][0]["perf_model"] = {"name": "roofline"}
    fast, a = run_raw(raw)
    raw["sim"]["fast_decode"] = False
    plain, b = run_raw(raw)
    assert fast.autoscaling["events"] == plain.autoscaling["events"]
    assert (a["replica"] == b["replica"]).all()
    for c in ("first_token_s", "finish_s"):
        np.testing.assert_allclose(a[c], b[c], rtol=1e-9)
