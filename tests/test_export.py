"""Per-replica rates over time and the Prometheus exposition of a run."""
import copy

import numpy as np
import pandas as pd
from prometheus_client.parser import text_string_to_metric_families

from conftest import BASE, run_raw
from servesim.sim.export import prometheus_text, replica_rates
from servesim.sim.report import slo_met, timeseries


def _run():
    raw = copy.deepcopy(BASE)
    raw["sim"] = {}
    raw["fleet"]["replicas"][0]["count"] = 3
    raw["slo"] = {"classes": {"default": {"ttft_ms": 200, "tpot_ms": 30}}}
    raw["workload"]["num_requests"] = 400
    return run_raw(raw)


def test_rates_conserve_every_token_and_every_finished_request():
    res, df = _run()
    rates = replica_rates(res, df, slo_met(df, res.config))
    assert len(rates) == 3 * (int(res.sim_end) + 1)
    # every sampled output token is in exactly one replica's bucket: the fleet's and per-request totals agree
    per_replica = rates.groupby("replica")["output_tokens_per_s"].sum()
    assert per_replica.sum() == df["generated_tokens"].sum() == res.metrics.tokens_per_bucket.sum()
    assert list(per_replica) == [df.loc[df["replica"] == i, "generated_tokens"].sum() for i in range(3)]
    assert rates["finished"].sum() == (df["outcome"] == "finished").sum()
    assert rates["slo_met"].sum() == slo_met(df, res.config).sum()
    # a bucket's attainment is its met / finished
    some = rates[rates["finished"] > 0]
    np.testing.assert_allclose(some["slo_attainment"], some["slo_met"] / some["finished"])
    assert rates.loc[rates["finished"] == 0, "slo_attainment"].isna().all()


def test_the_prometheus_exposition_parses_and_holds_every_sample(tmp_path):
    res, df = _run()
    ts = timeseries(res)
    rates = replica_rates(res, df, slo_met(df, res.config))
    text = prometheus_text(ts, rates)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == {"servesim_waiting_requests", "servesim_running_requests", "servesim_kv_usage_ratio",
                             "servesim_output_tokens_per_second", "servesim_slo_attainment_ratio"}
    waiting = families["servesim_waiting_requests"].samples
    assert len(waiting) == len(ts)
    s = waiting[5]
    row = ts.iloc[5]
    assert (s.labels, s.value, float(s.timestamp)) == ({"replica": str(int(row["replica"]))}, row["waiting"],
                                                      round(row["t_s"] * 1000) / 1000)
    assert len(families["servesim_slo_attainment_ratio"].samples) == rates["slo_attainment"].notna().sum()


def test_a_run_folder_has_both(tmp_path):
    from servesim.sim.report import write_outputs
    res, _ = _run()
    write_outputs(res, tmp_path, plots=False)
    assert len(pd.read_csv(tmp_path / "replica_rates.csv")) == 3 * (int(res.sim_end) + 1)
    assert (tmp_path / "metrics.prom").read_text().startswith("# HELP servesim_waiting_requests")
