"""Confidence intervals (sim/intervals.py): sectioning on exact inputs, verdicts exactly where the interval
straddles the target, the report's intervals and `--ci off`, and coverage on an M/D/1 queue (slow)."""
import copy

import numpy as np
import pytest
from scipy import stats

from conftest import BASE, run_raw
from servesim.sim.config import parse_config
from servesim.sim.intervals import interval, rate_interval, sections, share_interval, t_quantile, verdict
from servesim.sim.report import build_report, summary_markdown
from servesim.sim.run import simulate


def test_rate_interval_sections_time_evenly():
    # 100 events of 1 unit over [0, 10): 10 per second in each of the 10 one-second sections -> no spread
    t = np.arange(100) / 10.0
    assert rate_interval(10.0, t, np.ones(100), 0.0, 10.0) == [10.0, 10.0]
    # all events in the first half: sections rate 20, 20, ..., 0, 0 -> sd of [20]*5 + [0]*5
    t = np.arange(100) / 20.0
    half = stats.t.ppf(0.975, 9) * np.std([20] * 5 + [0] * 5, ddof=1) / np.sqrt(10)
    assert rate_interval(10.0, t, np.ones(100), 0.0, 10.0) == pytest.approx([10 - half, 10 + half])
    assert rate_interval(1.0, t[:10], np.ones(10), 0.0, 10.0) is None


def test_sectioning_interval_is_t_times_the_sections_standard_error():
    vals = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    half = stats.t.ppf(0.975, 9) * np.std(vals, ddof=1) / np.sqrt(10)
    assert interval(5.0, vals) == pytest.approx([5.0 - half, 5.0 + half])
    assert [len(s) for s in sections(103)] == [11, 11, 11] + [10] * 7
    assert sections(49) is None                        # under 5 per section: no interval
    assert interval(None, vals) is None and interval(1.0, [1.0]) is None
    lo, hi = interval(1.0, [0.0, 10.0] * 5)              # a latency or rate is never negative: clipped at 0
    assert lo == 0.0 and hi == pytest.approx(1.0 + stats.t.ppf(0.975, 9) * np.std([0, 10] * 5, ddof=1) / np.sqrt(10))
    assert share_interval(1.0, np.ones(100, bool)) == [1.0, 1.0]


def test_the_t_table_holds_scipy_s_quantiles():
    """sim/data/t_quantiles.csv (read instead of importing scipy.special) against scipy, every row; other
    quantiles and degrees of freedom go to scipy itself."""
    from scipy import special
    from servesim.sim.intervals import _t975
    table = _t975()
    assert sorted(table) == list(range(1, 201))
    for df, t in table.items():
        assert t == pytest.approx(float(special.stdtrit(df, 0.975)), rel=1e-14)
        assert t_quantile(df, 0.975) == t
    assert t_quantile(9, 0.5 + 0.95 / 2) == table[9]              # the level the report uses lands on the table
    assert t_quantile(500, 0.975) == pytest.approx(stats.t.ppf(0.975, 500), rel=1e-12)
    assert t_quantile(9, 0.95) == pytest.approx(stats.t.ppf(0.95, 9), rel=1e-12)


@pytest.mark.parametrize("ci, point, target, want", [
    ([0.95, 0.99], 0.97, 0.9, "met"), ([0.90, 0.99], 0.95, 0.9, "met"),          # low end on the target: met
    ([0.80, 0.89], 0.85, 0.9, "missed"), ([0.85, 0.95], 0.9, 0.9, "uncertain"),
    ([0.89, 0.91], 0.90, 0.9, "uncertain"), (None, 0.95, 0.9, "met"), (None, 0.85, 0.9, "missed"),
    (None, None, 0.9, "uncertain")])
def test_verdict_is_uncertain_exactly_when_the_interval_straddles_the_target(ci, point, target, want):
    assert verdict(ci, point, target) == want


def test_report_intervals_and_ci_off():
    raw = copy.deepcopy(BASE)
    raw["slo"] = {"classes": {"default": {"ttft_ms": 60, "attainment_target": 0.9}}}
    res, df = run_raw(raw)
    rep = build_report(res, df)
    t = rep["latency_ms"]["ttft"]
    for k in ("mean", "p50", "p99"):
        lo, hi = t[f"{k}_ci"]
        assert lo <= t[k] <= hi
    c = rep["slo"]["classes"]["default"]
    lo, hi = c["attainment_ci"]
    assert 0 <= lo <= c["attainment"] <= hi <= 1
    assert c["verdict"] == verdict(c["attainment_ci"], c["attainment"], 0.9)
    assert "[" in summary_markdown(rep).split("| TTFT |")[1].splitlines()[0]
    lo, hi = rep["throughput"]["output_tokens_per_s_ci"]
    assert lo <= rep["throughput"]["output_tokens_per_s"] <= hi
    raw["output"]["ci"] = False
    rep_off = build_report(*run_raw(raw))
    assert "p99_ci" not in rep_off["latency_ms"]["ttft"] and "ci" not in rep_off
    assert rep_off["latency_ms"]["ttft"]["p99"] == t["p99"]       # intervals change no point value


@pytest.mark.slow
def test_md1_mean_wait_intervals_cover_pollaczek_khinchine():
    # M/D/1 (one request at a time, 1 s each, Poisson at 0.5/s): Wq = rho D / (2 (1 - rho)) = 0.5 s. Over 400
    # seeds of 4,000 requests, the 95% sectioning interval of the mean queue time contains it 93-97% of the time
    raw = copy.deepcopy(BASE)
    raw["sim"] = {"check_invariants": False}
    raw["fleet"]["replicas"][0]["perf_model"] = {"name": "linear", "base_s": 1.0}
    raw["fleet"]["replicas"][0]["engine"] = {"max_num_seqs": 1}
    raw["workload"] = {"kind": "synthetic", "num_requests": 4000, "arrival": {"process": "poisson", "rate": 0.5},
                       "lengths": {"kind": "independent", "input": {"dist": "fixed", "value": 16},
                                   "output": {"dist": "fixed", "value": 1}}}
    hits = 0
    for seed in range(400):
        raw["seed"] = seed
        lo, hi = build_report(simulate(parse_config(raw)))["latency_ms"]["queue"]["mean_ci"]
        hits += lo <= 500.0 <= hi
    assert 0.93 <= hits / 400 <= 0.97, hits / 400
