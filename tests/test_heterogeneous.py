"""Heterogeneous fleets: capacity of each replica, capability- and cost-aware routing, cost per pool."""
import copy

import pytest

from conftest import BASE, run_raw
from servesim.hwmodels.catalog import get_gpu, get_model
from servesim.hwmodels.roofline import RooflineModel
from servesim.hwmodels.step_time import BatchShape
from servesim.sim.report import build_report
from servesim.sim.run import decode_capacity


def test_decode_capacity_is_the_reference_batch_throughput():
    llama = get_model("meta-llama/Llama-3.1-8B")
    caps = {}
    for gpu in ("H100-SXM", "A100-80GB-SXM", "L40S"):
        m = RooflineModel(llama, get_gpu(gpu))
        st = m.step_time(BatchShape(decode_cached=[1024] * 64, num_sampled=64))
        caps[gpu] = decode_capacity(m, 256)
        assert caps[gpu] == 64 / st.seconds
    assert caps["H100-SXM"] > caps["A100-80GB-SXM"] > caps["L40S"]
    m = RooflineModel(llama, get_gpu("H100-SXM"))
    assert decode_capacity(m, 8) == 8 / m.step_time(BatchShape(decode_cached=[1024] * 8, num_sampled=8)).seconds


def _fleet(tmp_path, groups, n, routing, **extra):
    """groups: [(gpu, linear base_s)]; n identical requests at t=0."""
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n" + "0.0,16,4\n" * n)
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"] = [{"name": f"g{i}", "gpu": gpu, "model": "meta-llama/Llama-3.1-8B",
                                 "perf_model": {"name": "linear", "base_s": base},
                                 "engine": {"enable_prefix_caching": False}} for i, (gpu, base) in enumerate(groups)]
    raw["workload"] = {"kind": "trace", "path": str(trace)}
    raw["policies"] = {"routing": routing}
    raw.update(extra)
    return run_raw(raw)


def test_capacity_weighted_splits_by_speed(tmp_path):
    # capacities 128 and 64 tokens/s (64 sequences per 0.5 s and 1 s step): (n + 1) / capacity sends two of
    # every three requests to the fast replica (ties to the lower index): 20 and 10 of 30
    res, df = _fleet(tmp_path, [("H100-SXM", 0.5), ("A100-80GB-SXM", 1.0)], 30, {"name": "capacity_weighted"})
    assert df["replica"].tolist() == [0, 0, 1] * 10
    _, lo = _fleet(tmp_path, [("H100-SXM", 0.5), ("A100-80GB-SXM", 1.0)], 30, {"name": "least_outstanding"})
    assert lo["replica"].tolist() == [0, 1] * 15


def test_cheapest_first_fills_the_cheap_replica_then_spills(tmp_path):
    # equal speed; the A100 at $2/h is cheaper per token than the H100 at $4/h: it takes requests until it
    # holds max_outstanding = 5, the H100 the other 3
    res, df = _fleet(tmp_path, [("H100-SXM", 1.0), ("A100-80GB-SXM", 1.0)], 8,
                     {"name": "cheapest_first", "max_outstanding": 5},
                     cost={"usd_per_gpu_hour": {"H100-SXM": 4.0, "A100-80GB-SXM": 2.0}})
    assert df["replica"].tolist() == [1] * 5 + [0] * 3
    # with both full, capacity-weighted: 12 requests -> 5 cheap, 5 dear, then alternating by (n + 1) / capacity
    res, df = _fleet(tmp_path, [("H100-SXM", 1.0), ("A100-80GB-SXM", 1.0)], 12,
                     {"name": "cheapest_first", "max_outstanding": 5},
                     cost={"usd_per_gpu_hour": {"H100-SXM": 4.0, "A100-80GB-SXM": 2.0}})
    assert df["replica"].tolist() == [1] * 5 + [0] * 5 + [0, 1]


def test_cost_by_group_adds_up(tmp_path):
    res, df = _fleet(tmp_path, [("H100-SXM", 0.5), ("A100-80GB-SXM", 1.0)], 30, {"name": "capacity_weighted"},
                     cost={"usd_per_gpu_hour": {"H100-SXM": 4.0, "A100-80GB-SXM": 2.0}})
    rep = build_report(res, df)
    g = rep["cost"]["by_group"]
    assert list(g) == ["g0", "g1"]
    assert g["g0"]["usd"] + g["g1"]["usd"] == pytest.approx(rep["cost"]["usd"], rel=1e-12)
    assert g["g0"]["usd"] == pytest.approx(2 * g["g1"]["usd"], rel=1e-12)          # same duration, twice the price
    assert (g["g0"]["requests"], g["g1"]["requests"]) == (20, 10)
    assert (g["g0"]["output_tokens"], g["g1"]["output_tokens"]) == (80, 40)
    assert g["g1"]["usd_per_1m_output_tokens"] == pytest.approx(g["g1"]["usd"] / 40 * 1e6)
    dur = rep["sim"]["simulated_s"]
    assert g["g0"]["busy_fraction"] == pytest.approx(res.metrics.replicas[0].busy_s / dur)


def _canary_raw(group="canary"):
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"] = [
        {"name": "stable", "count": 2, "gpu": "H100-SXM", "model": "meta-llama/Llama-3.1-8B"},
        {"name": "canary", "count": 1, "gpu": "H100-SXM", "model": "meta-llama/Llama-3.1-8B", "dtype": "fp8"}]
    raw["policies"] = {"routing": {"name": "canary", "group": group, "fraction": 0.25}}
    return raw


def test_canary_sends_a_stable_hashed_fraction_to_its_group():
    import hashlib
    res, df = run_raw(_canary_raw())
    h = df["id"].map(lambda i: int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "big")
                     / 2.0 ** 64)
    assert ((df["replica"] == 2) == (h < 0.25)).all()              # the canary side is exactly the hashed share
    assert 0.15 < (df["replica"] == 2).mean() < 0.35
    rep = build_report(res, df)
    g = rep["groups"]
    assert list(g) == ["stable", "canary"]
    assert g["canary"]["requests"] == int((df["replica"] == 2).sum())
    assert g["stable"]["requests"] + g["canary"]["requests"] == len(df)
    # fp8 weights read half the bytes: the canary's decode is faster
    assert g["canary"]["tpot_ms"]["p50"] < g["stable"]["tpot_ms"]["p50"]


def test_canary_group_must_exist():
    from servesim.sim.config import parse_config
    from servesim.sim.errors import ConfigError
    from servesim.sim.run import simulate
    with pytest.raises(ConfigError, match="policies.routing.group: 'blue' must name some replicas"):
        simulate(parse_config(_canary_raw("blue")))


def test_the_regression_gate_compares_canary_groups(tmp_path):
    import json

    import yaml
    from typer.testing import CliRunner

    from servesim.sim.cli import app
    raw = _canary_raw()
    raw["workload"]["num_requests"] = 400
    raw["workload"]["arrival"]["rate"] = 40.0
    raw["fleet"]["replicas"][1]["gpu"] = "L40S"          # a canary on slower GPUs: its latency regresses
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert CliRunner().invoke(app, ["run", str(cfg), "-o", str(tmp_path / "run"), "-q"]).exit_code == 0
    out = CliRunner().invoke(app, ["compare", str(tmp_path / "run"), "--groups", "stable", "canary",
                                   "--json", str(tmp_path / "cmp.json")])
    assert out.exit_code == 1, out.output
    rows = {r["metric"]: r for r in json.loads((tmp_path / "cmp.json").read_text())}
    assert rows["latency_ms.tpot.p99"]["status"] == "REGRESSED"
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rows["latency_ms.tpot.p99"]["candidate"] == rep["groups"]["canary"]["tpot_ms"]["p99"]
    assert set(rows) == {"latency_ms.ttft.p50", "latency_ms.ttft.p99", "latency_ms.tpot.p50", "latency_ms.tpot.p99",
                         "slo.attainment"}
    bad = CliRunner().invoke(app, ["compare", str(tmp_path / "run"), "--groups", "stable", "blue"])
    assert bad.exit_code == 2 and "no replica group 'blue'" in bad.output
