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
    assert unpriced["why"].value_counts().to_dict() == {
        "pairwise NVLink bridges: not the catalog GPU's NVSwitch topology": 30,
        "no fp4 peak in the GPU catalog": 21}
    assert rows["predicted_us"].notna().sum() == 764 - 51
    # the 25 rows between servers (A100, InfiniBand) are priced by the network classes
    assert rows["cls"].isin(["all_reduce_inter", "send_recv_inter"]).sum() == 25


def test_predictions_never_beat_peak_hardware(rows):
    from servesim.hwmodels.catalog import get_gpu
    for r in rows[rows["cls"].isin(["gemm", "attn_prefill", "attn_decode", "norm", "add"])].itertuples():
        gpu = get_gpu(r.gpu_name)
        assert r.predicted_us * 1e-6 >= max(r.flops / gpu.bf16_flops, r.nbytes / gpu.mem_bw)


def test_fitted_compute_classes_stay_within_their_recorded_error(rows):
    # regression guard on the committed profile: in-sample medians of the GEMM and attention classes
    s = summarize(rows)
    core = s[s["op_class"].isin(["gemm", "attn_prefill", "attn_decode"])]
    assert core["fitted"].all()
    assert (core["median_ape_%"] < 10).all(), core
    assert (core["loo_median_ape_%"] < 10).all(), core


def test_fit_recovers_known_parameters_from_synthetic_rows():
    """Rows generated from known parameters are fitted back to them (the fitter is not just curve-hugging)."""
    import numpy as np
    import pandas as pd
    from servesim.hwmodels.fit import _fit_ops
    from servesim.hwmodels.ops import gemm
    from servesim.hwmodels.profile import OpParams
    from servesim.hwmodels.catalog import get_gpu
    gpu = get_gpu("H100-SXM")
    truth = OpParams(0.75, 0.85, 6e-6, 3e-6)
    rows = []
    for m in (1, 16, 64, 256, 1024, 4096, 8192):
        for n, k in ((4096, 4096), (12288, 4096), (8192, 8192)):
            f, b = gemm(m, n, k)
            rows.append({"flops": f, "nbytes": b, "seqs": None, "num_kv_heads": 0, "head_dim": 0,
                         "latency_us": truth.time(f, b, gpu.bf16_flops, gpu.mem_bw) * 1e6})
    p = _fit_ops(pd.DataFrame(rows), "gemm", gpu)
    assert p.compute_efficiency == pytest.approx(0.75, rel=1e-3)
    assert p.memory_efficiency == pytest.approx(0.85, rel=1e-3)
    assert p.compute_offset_s == pytest.approx(6e-6, rel=1e-2) and p.memory_offset_s == pytest.approx(3e-6, rel=1e-2)


def test_end_to_end_against_published_trtllm_tables():
    # never fitted to these tables: a check of the whole model, recorded here as a regression guard
    from servesim.hwmodels.accuracy import engine_check
    e = engine_check()
    ok = e["predicted"].notna()
    assert ok.sum() == 29                                  # the LLaMA rows; GPT-J and Falcon are not in the catalog
    assert set(e.loc[~ok, "why"]) == {"GPT-J 6B not in the model catalog", "Falcon 180B not in the model catalog"}
    for table in ("throughput", "first_token_latency"):
        assert e.loc[ok & (e["table"] == table), "ape"].median() < 0.15


def test_static_batch_time_is_the_sum_of_its_steps():
    from servesim.hwmodels.accuracy import static_batch
    from servesim.hwmodels.catalog import get_gpu, get_model
    from servesim.hwmodels.roofline import RooflineModel
    from servesim.hwmodels.step_time import BatchShape
    first, total = static_batch("meta-llama/Llama-2-7b-hf", "H100-SXM", 1, "bf16", 4, 100, 3)
    rm = RooflineModel(get_model("meta-llama/Llama-2-7b-hf"), get_gpu("H100-SXM"))
    steps = [rm.step_time(BatchShape([100] * 4, [0] * 4, [], 4)).seconds,
             rm.step_time(BatchShape([], [], [100] * 4, 4)).seconds,
             rm.step_time(BatchShape([], [], [101] * 4, 4)).seconds]
    assert first == steps[0] and total == pytest.approx(sum(steps), rel=1e-15)


def test_calibrate_needs_exactly_one_source():
    r = subprocess.run([sys.executable, "-m", "servesim.sim.cli", "calibrate"], capture_output=True, text=True)
    assert r.returncode == 2 and "choose one: --backend numpy|torch" in r.stderr and "Traceback" not in r.stderr


def test_committed_profile_records_its_fit():
    import yaml
    from servesim.hwmodels.profile import PROFILES
    doc = yaml.safe_load((PROFILES / "reference.yaml").read_text())
    assert "kernel_points.csv" in doc["source"] and "least_squares" in doc["method"]
    h100 = doc["gpus"]["H100-SXM"]
    for cls in ("gemm", "gemm_fp8", "attn_prefill", "attn_decode", "all_reduce", "all_reduce_custom"):
        assert h100[cls]["rows"] >= 6 and "loo_median_ape_pct" in h100[cls]


def test_each_stack_is_fitted_on_its_own_and_the_newest_prices_the_simulator(rows):
    """A100 all-reduce: nccl-tests (NCCL 2.27.3) and Vidur's torch.distributed profiler disagree by up to
    1.7x; each stack has its own fit, the simulator uses the newest, and rows are scored by their own stack."""
    from servesim.hwmodels.catalog import get_gpu
    from servesim.hwmodels.profile import _fitted, link_params, profile_for
    entry = _fitted()["A100-80GB-SXM"]["all_reduce"]
    assert entry["stack"] == "NCCL 2.27.3 (nccl-tests)"
    vidur = entry["other_stacks"]["vidur collectives profiler (torch.distributed/NCCL, CUDA graph)"]
    gpu = get_gpu("A100-80GB-SXM")
    sim = profile_for(gpu, 1e-6).link("all_reduce")
    assert sim == link_params(entry)
    ar = rows[(rows["gpu_name"] == gpu.name) & (rows["cls"] == "all_reduce")]
    for r in ar.itertuples():
        own = link_params(vidur if r.stack.startswith("vidur") else entry)
        assert r.predicted_us == own.time("all_reduce", r.nbytes, int(r.num_gpus), gpu.link_bw) * 1e6
        assert r.simulator_stack == (not r.stack.startswith("vidur"))
    # the two stacks' fits really differ: 128 MiB over 2 GPUs, 747 us (nccl-tests) vs 430 us (Vidur)
    big = 134217728
    assert link_params(entry).time("all_reduce", big, 2, gpu.link_bw) > 1.4 * link_params(vidur).time(
        "all_reduce", big, 2, gpu.link_bw)
