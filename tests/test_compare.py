"""The regression gate: exact threshold logic, seed noise, exit codes."""
import json
import subprocess
import sys

import pytest

from servesim.experiments.compare import DEFAULT_THRESHOLDS, compare, load_thresholds


def rep(ttft_p99=100.0, tput=50.0, attain=0.99):
    return {"latency_ms": {"ttft": {"p99": ttft_p99, "p50": 10.0}},
            "throughput": {"requests_per_s": tput}, "slo": {"attainment": attain}, "sim": {"wall_s": 1.0}}


def status(rows):
    return {r.metric: r.status for r in rows}


def test_single_runs_use_the_thresholds_exactly():
    s = status(compare([rep()], [rep(ttft_p99=105.9, tput=49.1, attain=0.99)], DEFAULT_THRESHOLDS))
    assert s == {"latency_ms.ttft.p99": "REGRESSED", "latency_ms.ttft.p50": "info",
                 "throughput.requests_per_s": "ok", "slo.attainment": "ok"}        # 5.9% > 5%; 1.8% < 2%
    s = status(compare([rep()], [rep(ttft_p99=104.0, tput=48.9)], DEFAULT_THRESHOLDS))
    assert s["latency_ms.ttft.p99"] == "ok" and s["throughput.requests_per_s"] == "REGRESSED"
    s = status(compare([rep()], [rep(ttft_p99=80.0, attain=0.999)], DEFAULT_THRESHOLDS))
    assert s["latency_ms.ttft.p99"] == "improved" and s["slo.attainment"] == "ok"
    assert "sim.wall_s" not in s                                                    # not a compared metric


def test_seed_noise_does_not_trip_but_a_consistent_shift_does():
    base = [rep(ttft_p99=v) for v in (100, 101, 99)]
    noisy = [rep(ttft_p99=v) for v in (90, 120, 110)]        # mean +6.7% but the CI straddles zero
    shifted = [rep(ttft_p99=v) for v in (106, 107, 106.5)]    # +6.5%, tight
    rows = {r.metric: r for r in compare(base, noisy, DEFAULT_THRESHOLDS)}
    assert rows["latency_ms.ttft.p99"].status == "ok" and rows["latency_ms.ttft.p99"].ci_pct[0] < 0
    rows = {r.metric: r for r in compare(base, shifted, DEFAULT_THRESHOLDS)}
    assert rows["latency_ms.ttft.p99"].status == "REGRESSED" and rows["latency_ms.ttft.p99"].ci_pct[0] > 0


def test_thresholds_file_overrides_and_is_validated(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("latency_ms.ttft.p99: 10\n")
    t = load_thresholds(f)
    assert t["latency_ms.ttft.p99"] == 10 and t["throughput.*"] == 2.0
    assert status(compare([rep()], [rep(ttft_p99=108)], t))["latency_ms.ttft.p99"] == "ok"
    f.write_text("latency_ms.tfft.p99: 10\n")
    with pytest.raises(Exception, match="no comparable metric matches latency_ms.tfft.p99"):
        load_thresholds(f)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "servesim.sim.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_cli_exit_codes_on_real_runs(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("""
name: c
fleet: {replicas: [{gpu: H100-SXM, model: meta-llama/Llama-3.1-8B, count: 2}]}
workload: {kind: trace, path: bundled:azure_conv_2023.csv.gz, duration_s: 120, rate_scale: 8}
output: {plots: false}
""")
    for name, count in (("base", 2), ("same", 2), ("worse", 1)):
        r = _cli("run", cfg, "-o", tmp_path / name, "-q", "--set", f"fleet.replicas.0.count={count}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    same = _cli("compare", tmp_path / "base", tmp_path / "same", "--json", tmp_path / "cmp.json", cwd=tmp_path)
    assert same.returncode == 0 and "0 regression(s)" in same.stdout
    assert all(row["status"] in ("ok", "info") for row in json.loads((tmp_path / "cmp.json").read_text()))
    worse = _cli("compare", tmp_path / "base", tmp_path / "worse", cwd=tmp_path)
    assert worse.returncode == 1 and "latency_ms.ttft.p99" in worse.stdout.split("regression(s):")[1]
    missing = _cli("compare", tmp_path / "base", tmp_path / "nope", cwd=tmp_path)
    assert missing.returncode == 2 and "no such report file or folder" in missing.stderr
