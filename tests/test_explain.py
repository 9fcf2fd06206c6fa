"""`servesim explain` and `servesim run --trace-level decisions` from the command line."""
import copy
import json

import yaml
from typer.testing import CliRunner

from conftest import BASE
from servesim.sim.cli import app
from servesim.sim.explain import explain


def _run(tmp_path, raw, *extra):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = CliRunner().invoke(app, ["run", str(cfg), "-o", str(tmp_path / "run"), "--quiet", *extra])
    assert out.exit_code == 0, out.output
    return tmp_path / "run"


def _queued_raw():
    """One replica, 8 sequences at most, a burst of 60 requests: the TTFT tail is queueing behind max_num_seqs
    with KV to spare."""
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"][0]["engine"] = {"max_num_seqs": 8}
    raw["workload"]["arrival"] = {"process": "all_at_once"}
    raw["workload"]["num_requests"] = 60
    return raw


def test_explain_names_the_queue_and_what_caps_the_batch(tmp_path):
    run = _run(tmp_path, _queued_raw())
    out = CliRunner().invoke(app, ["explain", str(run)])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0] == "- Bottleneck: queueing for capacity, capped by max_num_seqs."
    assert any(line.startswith("- TTFT p99 is ") and "% queueing" in line for line in lines)
    assert any("raising max_num_seqs (8) would admit more" in line for line in lines)
    assert (run / "explain.png").stat().st_size > 0
    rep = json.loads((run / "report.json").read_text())
    blocked = rep["attribution"]["steps"]["blocked_s"]
    assert blocked["max_num_seqs"] > 0 and blocked["token_budget"] == blocked["kv_blocks"] == blocked["policy"] == 0
    tail = rep["attribution"]["requests"]["ttft"]["p99_tail"]["share"]
    assert tail["queueing"] > 0.5 and abs(sum(tail.values()) - 1) < 1e-9


def test_explain_reports_the_numbers_it_reads():
    rep = {"attribution": {"steps": {"busy_s": 10.0, "by_kind": {
        "decode": {"steps": 100, "mean_batch": 96.0, "busy_s": 9.1, "compute_s": 0.0, "memory_s": 9.1,
                   "collective_s": 0.0, "overhead_s": 0.0, "kv_load_s": 0.0, "other_s": 0.0},
        "prefill": {"steps": 0}}, "blocked_s": {"max_num_seqs": 4.0, "token_budget": 0.0, "kv_blocks": 0.0,
                                                 "policy": 0.0}},
        "replicas": [{"index": 0, "max_num_seqs": 96}, {"index": 1, "max_num_seqs": 96}],
        "requests": {"ttft": {"p99_ms": 2000.0, "p99_tail": {"share": {"queueing": 0.78, "prefill": 0.22},
                                                              "top_replica": 1, "top_replica_share": 0.9},
                              "mean_ms": {}}}},
        "replicas": [{}, {}], "utilization": {"busy_fraction": 0.9, "kv_usage_mean": 0.95},
        "anomalies": {"found": [], "hol_blocking": []}}
    lines = explain(rep)
    assert lines[1] == "TTFT p99 is 2,000 ms, 78% queueing on replica 1 (90% of the tail requests); then 22% prefill."
    assert "Decode steps (100, mean batch 96.0 sequences, 9.1 s) are 100% memory-bound." in lines
    assert "Raising max_num_seqs (96) is capped by KV blocks: they are already 95% used on average." in lines


def test_explain_of_a_folder_without_a_report_is_a_clear_error(tmp_path):
    out = CliRunner().invoke(app, ["explain", str(tmp_path)])
    assert out.exit_code == 2 and "no report.json here" in out.output


def test_trace_level_decisions_writes_the_log_and_the_regret(tmp_path):
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"][0]["count"] = 2
    raw["workload"]["num_requests"] = 60
    run = _run(tmp_path, raw, "--trace-level", "decisions", "--regret-samples", "3", "--lookahead", "5")
    rep = json.loads((run / "report.json").read_text())
    assert rep["decisions"]["counts"]["route"] == 60
    reg = rep["decisions"]["routing_regret"]
    assert reg["samples"] == 3 and reg["lookahead_s"] == 5 and len(reg["decisions"]) == 3
    assert (run / "decisions.jsonl.gz").stat().st_size > 0
    assert "Routing regret over 3 sampled decisions" in (run / "summary.md").read_text()


def test_bad_trace_level_is_rejected(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(BASE))
    out = CliRunner().invoke(app, ["run", str(cfg), "--trace-level", "everything"])
    assert out.exit_code == 2 and "--trace-level: 'everything' is not one of off, decisions" in out.output
