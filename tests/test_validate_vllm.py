"""`servesim validate --backend vllm` without vLLM: the comparison against a replay recorded on vLLM's real engine
(tests/goldens/vllm_e2e), the calibration fit, the real-side request table, and bad input."""
import json
from pathlib import Path

import numpy as np
import pytest

from servesim.experiments.validate_vllm import fit_linear, real_table, run_vllm, validate_vllm
from servesim.sim.config import load_config
from servesim.sim.errors import ConfigError

ROOT = Path(__file__).parent.parent
CONFIG = ROOT / "experiments" / "configs" / "validate_vllm_cpu.yaml"
RECORDED = ROOT / "tests" / "goldens" / "vllm_e2e" / "validate_vllm_cpu.real.json.gz"


def test_servesim_matches_the_recorded_vllm_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVESIM_PROFILES", str(tmp_path / "profiles"))      # the fitted device goes there
    cfg, base = load_config(CONFIG)
    doc = validate_vllm(cfg, base, tmp_path, recorded=RECORDED)
    m = doc["metrics"]
    assert doc["vllm_version"] == "0.32.0" and doc["requests"] == 300
    assert (tmp_path / "profiles" / "local-cpu-vllm.yaml").exists()
    # the goals, for both step models: |rel_err| <= 15% at p50 and for throughput, <= 25% at p99
    for err in ("rel_err", "rel_err_roofline"):
        for name in ("ttft_p50", "tpot_p50", "e2e_p50", "itl_p50", "output_tokens_per_s"):
            assert abs(m[name][err]) <= 0.15, (err, name, m[name])
        for name in ("ttft_p99", "tpot_p99", "e2e_p99", "itl_p99"):
            assert abs(m[name][err]) <= 0.25, (err, name, m[name])
    saved = json.loads((tmp_path / "validate.json").read_text())
    assert saved["metrics"] == m and (tmp_path / "validate_cdf.png").exists()


def test_fit_recovers_a_linear_step_model():
    base, tok, seq, ctx = 5e-3, 2e-4, 3e-4, 5e-7
    cal = {"decode": [{"batch": b, "context": c, "step_s": base + b * seq + b * c * ctx}
                      for b in (1, 4, 16, 32) for c in (60, 540)],
           "prefill": [{"prompt": p, "decodes": 4, "decode_context": 62, "step_s": base + p * tok + 4 * seq + 4 * 62 * ctx}
                       for p in (32, 128, 256, 512)]}
    f = fit_linear(cal)
    np.testing.assert_allclose([f["base_s"], f["per_prefill_token_s"], f["per_decode_seq_s"], f["per_context_token_s"]],
                               [base, tok, seq, ctx], rtol=1e-6)
    assert f["fit_median_abs_rel_err"] < 1e-9


def test_real_table_times_each_request():
    doc = {"requests": [{"arrival_s": 1.0, "sent_s": 1.001, "token_times_s": [1.1, 1.2, 1.4]},
                        {"arrival_s": 2.0, "sent_s": 2.0, "token_times_s": [2.5]}]}
    df, gaps = real_table(doc, np.array([3, 1]))
    assert df["ttft_s"].round(9).tolist() == [0.1, 0.5]
    assert df["e2e_s"].round(9).tolist() == [0.4, 0.5]
    assert df["tpot_s"].round(9).tolist()[0] == 0.15 and np.isnan(df["tpot_s"][1])
    np.testing.assert_allclose(gaps, [0.1, 0.2])
    with pytest.raises(Exception, match="returned 3 tokens for a request of 4"):
        real_table(doc, np.array([4, 1]))


def test_bad_input(tmp_path):
    cfg, base = load_config(CONFIG, ["workload.num_requests=50"])
    with pytest.raises(ConfigError, match="not this config's workload"):
        validate_vllm(cfg, base, tmp_path, recorded=RECORDED)
    with pytest.raises(ConfigError, match="no such Python"):
        run_vllm({}, tmp_path, tmp_path / "nope" / "python")
    cfg, base = load_config(CONFIG, ["fleet.replicas.0.count=2"])
    with pytest.raises(ConfigError, match="one group of count 1"):
        validate_vllm(cfg, base, tmp_path, recorded=RECORDED)
