"""`estimate` (API and CLI) and the per-op accuracy check against the reference kernels."""
import json
import subprocess
import sys

import pytest

from servesim.hwmodels import estimate
from servesim.hwmodels.accuracy import evaluate, summarize


def test_estimate_api_breakdown_sums_to_total():
    r = estimate(gpu="H100-SXM", model="meta-llama/Llama-2-7b-hf", prefill=[(512, 0)], decode=[1024] * 32)
    assert r["tokens"] == 544
    assert sum(o["seconds"] for o in r["ops"].values()) == pytest.approx(r["seconds"], rel=1e-12)
    assert r["ops"]["attn_decode"]["bound"] == "memory"
    assert r["ops"]["mlp_up"]["per_layer_s"] == pytest.approx(r["ops"]["mlp_up"]["seconds"] / 32)


def test_estimate_cli_json_matches_the_api():
    out = subprocess.run([sys.executable, "-m", "servesim.sim.cli", "estimate", "--gpu", "H100-SXM", "--model",
                          "meta-llama/Llama-2-7b-hf", "--prefill", "512:0", "--decode", "32x1024", "--json"],
                         capture_output=True, text=True, check=True).stdout
    api = estimate(gpu="H100-SXM", model="meta-llama/Llama-2-7b-hf", prefill=[(512, 0)], decode=[1024] * 32)
    assert json.loads(out) == json.loads(json.dumps(api))


def test_estimate_cli_rejects_malformed_shapes():
    r = subprocess.run([sys.executable, "-m", "servesim.sim.cli", "estimate", "--gpu", "H100", "--model",
                        "llama2-7b", "--decode", "12x"], capture_output=True, text=True)
    assert r.returncode == 2 and "--decode '12x': expected [NUMx]CONTEXT" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def rows():
    return evaluate()


def test_every_reference_row_is_priced_or_says_why(rows):
    unpriced = rows[rows["predicted_us"].isna()]
    assert (unpriced["unsupported"] != "").all()
    assert set(unpriced["unsupported"]) <= {"no fp4 peak in the GPU catalog",
                                            "crosses nodes: no inter-node link in the GPU catalog"}
    assert rows["predicted_us"].notna().sum() == 708      # of 764 rows: 21 nvfp4 and 35 cross-node excluded


def test_predictions_never_beat_peak_hardware(rows):
    from servesim.hwmodels.accuracy import GPU_NAMES
    from servesim.hwmodels.catalog import get_gpu
    g = rows[(rows["op"] == "gemm") & (rows["dtype"] == "bfloat16")]
    for r in g.itertuples():
        gpu = get_gpu(GPU_NAMES.get(r.gpu, r.gpu))
        assert r.predicted_us * 1e-6 >= 2 * r.m * r.n * r.k / gpu.bf16_flops


def test_bf16_gemm_error_stays_within_ten_percent(rows):
    # the GEMM efficiencies in gpus.yaml were read off these rows: a regression guard, not a claim of accuracy
    s = summarize(rows)
    gemm = s[(s["op"] == "gemm") & (s["dtype"] == "bfloat16")]
    assert (gemm["median_ape_%"] < 10).all(), gemm
