"""Decision tracing and routing regret."""
import copy
import gzip
import json

import pandas as pd
import pytest

from conftest import BASE
from servesim.sim.config import parse_config
from servesim.sim.decisions import routing_regret
from servesim.sim.report import build_report, request_table, write_outputs
from servesim.sim.run import simulate


def _raw(tmp_path, rows, routing, count=2):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n" + "".join(f"{a},{p},{o}\n" for a, p, o in rows))
    raw = copy.deepcopy(BASE)
    g = raw["fleet"]["replicas"][0]
    g["count"] = count
    g["perf_model"] = {"name": "linear", "base_s": 1.0}
    g["engine"] = {"enable_prefix_caching": False, "max_num_seqs": 1}
    raw["workload"] = {"kind": "trace", "path": str(trace)}
    raw["policies"] = {"routing": {"name": routing}}
    return raw


# 1 s steps, one sequence per replica. R0 (10 tokens) at 0, R1 (2 tokens) at 0.5, R2 (2 tokens) at 0.6.
ROWS = [(0.0, 16, 10), (0.5, 16, 2), (0.6, 16, 2)]


def test_regret_zero_for_optimal_decisions_and_exact_for_a_bad_one(tmp_path):
    # round robin: R0 -> 0, R1 -> 1 (idle: optimal), R2 -> 0, busy until 10: R2 finishes at 12 (E2E 11.4)
    # where replica 1 (free at 2.5) would have finished it at 4.5 (E2E 3.9): regret 7.5 s.
    # Moving R1 to 0 instead makes R1 wait for R0 and R2 then wait for R1: worse, regret 0.
    # Moving R0 to 1: R1 queues behind it (E2E 11.5), R2 gets replica 0 (E2E 2): mean 7.83 vs 7.8, regret 0.
    cfg = parse_config(_raw(tmp_path, ROWS, "round_robin"))
    res = simulate(cfg, trace_decisions=True)
    df = request_table(res)
    assert df["finish_s"].tolist() == [10.0, 2.5, 12.0]
    reg = routing_regret(cfg, None, res.metrics.decisions, samples=3, lookahead_s=30.0)
    by = {d["decision"]: d for d in reg["decisions"]}
    assert by[0]["regret_s"] == 0.0 and by[0]["chosen_cost_s"] == pytest.approx((10 + 2 + 11.4) / 3)
    assert by[0]["best_alternative_cost_s"] == pytest.approx((10 + 11.5 + 2) / 3)
    assert by[1]["regret_s"] == 0.0 and by[1]["best_alternative_cost_s"] == pytest.approx((11.5 + 13.4) / 2)
    assert by[2]["regret_s"] == pytest.approx(7.5) and by[2]["best_alternative"] == 1
    assert reg["samples"] == 3 and reg["share_suboptimal"] == pytest.approx(1 / 3)


def test_least_outstanding_counts_requests_not_work(tmp_path):
    # R2 at 0.6 sees one request on each replica and takes the first (replica 0, busy until 10): the same 7.5 s
    # regret as round robin's. Re-simulation follows the router's later choices: had R0 gone to replica 1, R1
    # would take replica 0 and R2's tie would go to replica 0 again, now free at 2.5 (E2Es 10, 2, 3.9: mean 5.3
    # against 7.8, regret 2.5). Without R2, both decisions (R0 -> 0, R1 -> idle 1) are optimal: regret 0.
    cfg = parse_config(_raw(tmp_path, ROWS, "least_outstanding"))
    reg = routing_regret(cfg, None, simulate(cfg, trace_decisions=True).metrics.decisions, samples=3)
    by = {d["decision"]: d["regret_s"] for d in reg["decisions"]}
    assert by == {0: pytest.approx(2.5), 1: 0.0, 2: pytest.approx(7.5)}
    cfg = parse_config(_raw(tmp_path, ROWS[:2], "least_outstanding"))
    reg = routing_regret(cfg, None, simulate(cfg, trace_decisions=True).metrics.decisions, samples=3)
    assert [d["regret_s"] for d in reg["decisions"]] == [0.0, 0.0] and reg["share_suboptimal"] == 0.0


def test_decision_log_records_candidates_and_changes_nothing(tmp_path):
    raw = _raw(tmp_path, ROWS, "least_outstanding")
    plain = request_table(simulate(parse_config(raw)))
    res = simulate(parse_config(raw), trace_decisions=True)
    traced = request_table(res)
    pd.testing.assert_frame_equal(plain, traced)
    log = res.metrics.decisions
    routes = [r for r in log.rows if r["kind"] == "route"]
    assert [r["chosen"] for r in routes] == [0, 1, 0]        # R2: one request on each, the first taken
    assert [c["outstanding"] for c in routes[1]["candidates"]] == [1, 0]
    assert [c["outstanding"] for c in routes[2]["candidates"]] == [1, 1]
    assert log.counts() == {"route": 3, "admission": 3, "preemption": 0, "eviction": 0}
    write_outputs(res, tmp_path / "out", plots=False)
    lines = [json.loads(x) for x in gzip.open(tmp_path / "out" / "decisions.jsonl.gz", "rt")]
    assert [x["kind"] for x in lines] == ["admission", "route"] * 3
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["decisions"]["counts"]["route"] == 3


def test_preemptions_and_evictions_are_recorded():
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"][0]["engine"] = {"num_gpu_blocks_override": 80, "enable_prefix_caching": True}
    raw["workload"]["lengths"]["input"] = {"dist": "uniform", "low": 200, "high": 600}
    res = simulate(parse_config(raw), trace_decisions=True)
    log = res.metrics.decisions
    rep = build_report(res, request_table(res))
    c = log.counts()
    assert c["preemption"] == rep["requests"]["preemptions"] > 0
    assert c["eviction"] == rep["prefix_cache"]["evicted_blocks"] > 0
    pre = next(r for r in log.rows if r["kind"] == "preemption")
    assert pre["request"] not in pre["others_running"] and pre["lost_tokens"] > 0
