"""`servesim validate`: a real (measured) run of a small scenario against the roofline on this machine.

Noise (measured on the 2-core development machine, 2026-11-24, four runs of this exact scenario, each
with a fresh calibration): the roofline's errors against the measured run were ttft_p50 +4..+27%,
ttft_p99 +6..+13%, tpot_p50 -6..+18%, tpot_p99 -2..+17%, e2e_p50 -3..+19%, e2e_p99 -6..+15%, output
tokens/s within 0.1%; per-step median |error| 4..7%. Three of the four runs had every metric within 13%;
the fourth (a slower calibration) is the worst of each range. The bounds below (50% on latencies, 5% on
throughput, 25% per step) sit about 20 points above the worst of those, for a shared, noisier CI
machine; they still fail on gross breakage (a float64 promotion in the forward pass once made every
measured step 5x slower: -89% on TPOT; timing the first touch of calibration operands once put decode
steps 28% off). The test measures wall time, so it cannot hold while other CPU-heavy work shares the two
cores: run beside a 60-second benchmark loop it saw ttft_p50 -69% (the measured run slowed, not the
calibration). Keep it out of parallel test runs.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    out = tmp_path_factory.mktemp("validate")
    env = {"SERVESIM_PROFILES": str(out / "profiles"), "PATH": "/usr/bin:/bin",
           "OPENBLAS_NUM_THREADS": "2", "HOME": str(out)}
    r = subprocess.run([sys.executable, "-m", "servesim.sim.cli", "validate",
                        str(ROOT / "experiments/configs/validate_cpu.yaml"), "--set", "workload.num_requests=60",
                        "-o", str(out / "v")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return out, json.loads((out / "v" / "validate.json").read_text()), r.stdout


def test_validate_writes_the_comparison_and_calibrates_once(validated):
    out, doc, stdout = validated
    assert set(doc["metrics"]) == {"ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "e2e_p50", "e2e_p99",
                                   "output_tokens_per_s"}
    for v in doc["metrics"].values():
        assert v["rel_err"] == pytest.approx(v["sim"] / v["real"] - 1)
    assert doc["devices"] == {"local-cpu-numpy": "measured now"}
    assert (out / "profiles" / "local-cpu-numpy.yaml").exists()
    assert doc["real"]["requests"] == doc["sim"]["requests"] == 60
    assert doc["steps"]["count"] > 100 and (out / "v" / "validate_cdf.png").stat().st_size > 10_000
    assert "ttft_p50" in stdout and "steps by shape" in stdout


def test_roofline_on_this_machine_tracks_the_measured_run(validated):
    _, doc, _ = validated
    m = doc["metrics"]
    for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "e2e_p50", "e2e_p99"):
        assert abs(m[k]["rel_err"]) <= 0.50, (k, m[k])
    assert abs(m["output_tokens_per_s"]["rel_err"]) <= 0.05
    assert doc["steps"]["median_abs_rel_err"] <= 0.25


def test_validate_needs_the_measured_backend(tmp_path):
    r = subprocess.run([sys.executable, "-m", "servesim.sim.cli", "validate",
                        str(ROOT / "experiments/configs/validate_cpu.yaml"),
                        "--set", "fleet.replicas.0.perf_model={name: roofline}", "-o", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "fleet.replicas[0].perf_model: validate needs the measured backend" in r.stderr
