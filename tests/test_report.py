"""Report: required keys, SLO attainment, cost arithmetic, ITL histogram accuracy."""
import copy
import json

import numpy as np
import pytest

from conftest import BASE, run_raw
from servesim.sim.metrics import StreamingHistogram
from servesim.sim.report import build_report, write_outputs

REQUIRED = {
    "requests": ["total", "finished", "rejected"],
    "throughput": ["requests_per_s", "output_tokens_per_s", "total_tokens_per_s"],
    "slo": ["attainment", "goodput_requests_per_s"],
    "cost": ["gpu_hours", "usd", "usd_per_1m_output_tokens"],
    "utilization": ["mfu", "mbu", "kv_usage_mean"],
    "sim": ["wall_s", "peak_rss_mb", "iterations", "events"],
}


@pytest.fixture(scope="module")
def run():
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"][0]["count"] = 2
    raw["slo"] = {"classes": {"default": {"ttft_ms": 10, "tpot_ms": 6.5}}}
    return run_raw(raw)


def test_report_has_every_documented_key(run, tmp_path):
    res, _ = run
    rep = write_outputs(res, tmp_path, plots=True)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(rep))
    for section, keys in REQUIRED.items():
        for k in keys:
            assert k in rep[section], f"{section}.{k}"
    stats = {"mean", "p50", "p90", "p95", "p99"}
    for m in ("ttft", "tpot", "itl", "e2e"):           # each with its interval (sim/intervals.py)
        assert set(rep["latency_ms"][m]) == stats | {f"{k}_ci" for k in stats}
    for f in ("requests.csv", "timeseries.csv", "summary.md", "latency_cdf.png", "throughput_queue.png", "kv_usage.png"):
        assert (tmp_path / f).stat().st_size > 0
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "src='http" not in page      # self-contained
    from servesim.sim.report import _ci, _fmt
    t = rep["latency_ms"]["ttft"]
    assert (f"<tr><td>TTFT</td><td>{_fmt(t['mean'])}{_ci(t['mean_ci'])}</td><td>{_fmt(t['p50'])}{_ci(t['p50_ci'])}</td>"
            in page)


def test_slo_attainment_and_cost_arithmetic(run):
    res, df = run
    rep = build_report(res, df)
    ok = (df["ttft_s"] <= 0.010) & ((df["tpot_s"] <= 0.0065) | df["tpot_s"].isna())
    assert rep["slo"]["attainment"] == ok.sum() / len(df)
    assert 0 < rep["slo"]["attainment"] < 1          # the thresholds were chosen to split this run
    duration = df["finish_s"].max() - df["arrival_s"].min()
    assert rep["cost"]["gpu_hours"] == pytest.approx(2 * duration / 3600, rel=1e-12)
    price = res.replicas[0].usd_per_gpu_hour
    assert rep["cost"]["usd"] == pytest.approx(2 * price * duration / 3600, rel=1e-12)
    assert rep["cost"]["usd_per_1m_output_tokens"] == pytest.approx(
        rep["cost"]["usd"] / df["output_tokens"].sum() * 1e6, rel=1e-12)
    assert rep["latency_ms"]["ttft"]["p50"] == pytest.approx(1000 * np.percentile(df["ttft_s"], 50))
    assert 0 < rep["utilization"]["mfu"] < rep["utilization"]["mbu"] < 1   # small batches: memory bound


def test_itl_histogram_quantiles_are_within_half_a_bin():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.lognormal(np.log(0.01), 0.5, 50_000), rng.uniform(0.001, 2.0, 5_000)])
    h = StreamingHistogram()
    for v in x:
        h.add(float(v))
    for q in (0.5, 0.9, 0.95, 0.99):
        exact = np.quantile(x, q)
        assert h.quantile(q) == pytest.approx(exact, rel=1.2e-3)
    assert h.mean() == pytest.approx(x.mean(), rel=1e-12) and h.n == x.size


def test_itl_counts_every_gap_after_the_first_token(run):
    res, df = run
    assert res.metrics.itl.n == int((df["output_tokens"] - 1).sum())


def test_max_sim_time_cuts_the_run_and_counts_unfinished(base_raw):
    raw = base_raw
    raw["fleet"]["replicas"][0]["perf_model"] = {"name": "linear", "base_s": 0.5}
    raw["workload"]["arrival"] = {"process": "constant", "rate": 8.0}     # gaps of exactly 1/8 s
    raw["workload"]["num_requests"] = 100
    raw["sim"] = {"max_sim_time_s": 5.0}
    res, df = run_raw(raw)
    rep = build_report(res, df)
    assert rep["requests"]["total"] == 40                      # arrivals at 0, 0.125, ..., 4.875; not at 5.0
    assert rep["requests"]["unfinished"] > 0
    assert rep["requests"]["finished"] + rep["requests"]["unfinished"] == 40
    assert rep["sim"]["simulated_s"] == pytest.approx(5.0)
    assert rep["cost"]["gpu_hours"] == pytest.approx(5.0 / 3600)
    assert (df.loc[df["outcome"] == "finished", "finish_s"] <= 5.0).all()
