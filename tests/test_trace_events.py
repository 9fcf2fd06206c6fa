"""--trace-events: every iteration, exact on a scripted timeline, the same from the fast and plain paths."""
import copy
import json

import numpy as np
from typer.testing import CliRunner

from conftest import BASE
from servesim.sim.cli import app
from servesim.sim.config import parse_config
from servesim.sim.run import simulate


def _linear_one_request():
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"][0]["perf_model"] = {"name": "linear", "base_s": 1 / 64,
                                                   "per_prefill_token_s": 1 / 1024}
    raw["workload"] = {"kind": "synthetic", "num_requests": 2, "arrival": {"process": "constant", "rate": 32.0},
                       "lengths": {"kind": "independent", "input": {"dist": "fixed", "value": 10},
                                   "output": {"dist": "fixed", "value": 3}}}
    return raw


D, P = 1 / 64, 1 / 64 + 10 / 1024
START = [0.0, P, P + D, 2 * P + D, 2 * P + 2 * D]


def test_a_scripted_timeline_is_recorded_step_by_step():
    """Steps cost 1/64 s + 1/1024 s per prefill token (binary fractions: the sums are exact). Request 0 arrives
    at 0 (prompt 10, 3 tokens): prefill, decode; request 1 arrives at 1/32 s, during that decode, and is
    prefilled with request 0's last decode; then its two decodes."""
    res = simulate(parse_config(_linear_one_request()), trace_steps=True)
    t = res.metrics.trace.table()
    assert t["start"].tolist() == START
    assert t["dur"].tolist() == [P, D, P, D, D]
    assert t["prefill"].tolist() == [10, 0, 10, 0, 0]
    assert t["decode"].tolist() == [0, 1, 1, 1, 1]
    assert t["waiting"].tolist() == [0, 0, 0, 0, 0]
    assert t["running"].tolist() == [1, 1, 2, 1, 1]
    assert len(t["start"]) == res.metrics.replicas[0].iterations


def test_fast_and_plain_paths_record_the_same_iterations():
    raw = copy.deepcopy(BASE)
    raw["sim"] = {"check_invariants": False}
    raw["fleet"]["replicas"][0]["count"] = 2
    raw["workload"]["lengths"]["output"]["high"] = 300
    tables = []
    for fast in (True, False):
        r = copy.deepcopy(raw)
        r["sim"]["fast_decode"] = fast
        tables.append(simulate(parse_config(r), trace_steps=True).metrics.trace.table())
    fast, plain = tables
    assert len(fast["start"]) == len(plain["start"]) > 1000
    for f in ("replica", "prefill", "decode", "kv_used", "waiting", "running"):
        assert np.array_equal(fast[f], plain[f]), f
    np.testing.assert_allclose(fast["start"], plain["start"], rtol=1e-9)
    np.testing.assert_allclose(fast["dur"], plain["dur"], rtol=1e-9)


def test_the_cli_writes_a_chrome_trace(tmp_path):
    cfg = tmp_path / "c.yaml"
    import yaml
    cfg.write_text(yaml.safe_dump(_linear_one_request()))
    out = CliRunner().invoke(app, ["run", str(cfg), "-o", str(tmp_path / "run"), "--quiet",
                                   "--trace-events", str(tmp_path / "trace.json")])
    assert out.exit_code == 0, out.output
    doc = json.loads((tmp_path / "trace.json").read_text())
    slices = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert [e["ts"] for e in slices] == [s * 1e6 for s in START]
    assert [e["dur"] for e in slices] == [d * 1e6 for d in (P, D, P, D, D)]
    assert [e["name"] for e in slices] == ["prefill", "decode", "prefill+decode", "decode", "decode"]
    assert all(e["tid"] == 0 and e["pid"] == 0 for e in slices)
    names = [e for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"]
    assert names[0]["args"]["name"].startswith("replica 0: H100-SXM/")
    counters = [e for e in doc["traceEvents"] if e["ph"] == "C" and e["name"] == "replica 0 KV blocks"]
    assert len(counters) == 5
