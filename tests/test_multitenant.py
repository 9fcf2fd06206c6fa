"""Multi-tenant workloads: a mix of parts merged by arrival time, reports per tenant and per class."""
import copy

import numpy as np
import pytest

from conftest import BASE, build_report, run_raw
from servesim.sim.config import parse_config
from servesim.sim.errors import ConfigError
from servesim.traces.workload import build_workload


def _part(tenant, slo_class, n, rate, lo, hi, out_hi):
    return {"kind": "synthetic", "tenant": tenant, "slo_class": slo_class, "num_requests": n,
            "arrival": {"process": "poisson", "rate": rate},
            "lengths": {"kind": "independent", "input": {"dist": "uniform", "low": lo, "high": hi},
                        "output": {"dist": "uniform", "low": 1, "high": out_hi}}}


def _mix_raw(batching="continuous", **params):
    raw = copy.deepcopy(BASE)
    raw["sim"] = {}
    raw["slo"] = {"classes": {"interactive": {"ttft_ms": 250, "tpot_ms": 50}, "batch": {"e2e_ms": 60000}}}
    raw["workload"] = {"kind": "mix", "parts": [_part("chat", "interactive", 200, 10.0, 100, 1500, 200),
                                                _part("etl", "batch", 150, 8.0, 2000, 6000, 300)]}
    raw["policies"] = {"batching": {"name": batching, **params}}
    return raw


def test_a_mix_merges_its_parts_by_arrival_with_their_tenants_and_classes():
    res, df = run_raw(_mix_raw())
    assert len(df) == 350
    assert np.all(np.diff(df["arrival_s"].to_numpy()) >= 0)
    assert (df["tenant"] == "chat").sum() == 200 and (df["tenant"] == "etl").sum() == 150
    assert set(zip(df["tenant"], df["slo_class"])) == {("chat", "interactive"), ("etl", "batch")}
    # the chat part's requests are exactly what the part alone would give on its own stream
    cfg = parse_config(_mix_raw())
    stream = np.random.SeedSequence(cfg.seed).spawn(3)[0].spawn(2)[0]     # the run's workload stream, part 0
    alone = build_workload(cfg.workload.parts[0], np.random.default_rng(stream))
    chat = df[df["tenant"] == "chat"]
    assert np.array_equal(chat["arrival_s"].to_numpy(), alone.arrival)
    assert np.array_equal(chat["prompt_tokens"].to_numpy(), alone.prompt)
    assert np.array_equal(chat["output_tokens"].to_numpy(), alone.output)
    # the same seed gives the same mix
    _, again = run_raw(_mix_raw())
    assert df[["arrival_s", "prompt_tokens", "output_tokens", "tenant"]].equals(
        again[["arrival_s", "prompt_tokens", "output_tokens", "tenant"]])


def test_the_report_has_each_tenant_judged_by_its_own_class():
    res, df = run_raw(_mix_raw())
    rep = build_report(res, df)
    tn = rep["tenants"]
    assert set(tn) == {"chat", "etl"}
    assert sum(t["requests"] for t in tn.values()) == rep["requests"]["total"]
    met = sum(t["slo_attainment"] * t["requests"] for t in tn.values())
    assert met == pytest.approx(rep["slo"]["attainment"] * rep["requests"]["total"], abs=1e-9)
    assert tn["chat"]["slo_attainment"] == pytest.approx(rep["slo"]["classes"]["interactive"]["attainment"])
    chat = df[df["tenant"] == "chat"]
    assert tn["chat"]["ttft_ms"]["p99"] == pytest.approx(np.percentile(chat["ttft_s"].dropna() * 1000, 99))
    assert "| chat |" in __import__("servesim.sim.report", fromlist=["x"]).summary_markdown(rep)


def test_priority_classes_favour_the_interactive_tenant_under_load():
    fcfs = build_report(*run_raw(_mix_raw()))["tenants"]
    prio = build_report(*run_raw(_mix_raw("priority", priorities={"interactive": 0, "batch": 1})))["tenants"]
    assert prio["chat"]["ttft_ms"]["p99"] < fcfs["chat"]["ttft_ms"]["p99"]
    assert prio["etl"]["ttft_ms"]["p99"] > fcfs["etl"]["ttft_ms"]["p99"]


def test_a_part_with_an_unknown_class_is_named():
    raw = _mix_raw()
    raw["workload"]["parts"][1]["slo_class"] = "bulk"
    with pytest.raises(ConfigError, match=r"workload.parts\[1\].slo_class 'bulk' is not one of slo.classes"):
        parse_config(raw)


def test_closed_loop_parts_cannot_be_mixed():
    raw = _mix_raw()
    raw["workload"]["parts"][0]["arrival"] = {"process": "closed_loop", "concurrency": 4}
    with pytest.raises(ConfigError, match="closed-loop clients cannot be mixed"):
        parse_config(raw)
