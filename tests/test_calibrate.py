"""`servesim calibrate --backend numpy`: a measured device profile that run and estimate accept."""
import math

import numpy as np
import pytest
import yaml

from servesim.hwmodels import estimate
from servesim.hwmodels.calibrate import calibrate
from servesim.hwmodels.catalog import get_gpu
from servesim.sim.errors import ConfigError


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    d = tmp_path_factory.mktemp("profiles")
    mp = pytest.MonkeyPatch()
    mp.setenv("SERVESIM_PROFILES", str(d))
    path, doc = calibrate("numpy", "cpu", "test-cpu", None, repeats=1, warmup=1)
    yield path, doc
    mp.undo()


def test_profile_records_device_fits_and_raw_measurements(profile):
    path, doc = profile
    on_disk = yaml.safe_load(path.read_text())
    dev = on_disk["devices"]["test-cpu"]
    assert dev["bf16_tflops"] > 0 and dev["mem_bw_tbps"] > 0
    assert {"python", "numpy", "cpus"} <= set(on_disk["versions"]) and on_disk["created"]
    raw = on_disk["measurements"]
    gemms = [r for r in raw if r["cls"] == "gemm"]
    # the device peak is the best GEMM throughput measured, so no GEMM ran faster than it
    assert max(r["flops"] / r["seconds"] for r in gemms) == pytest.approx(dev["bf16_tflops"] * 1e12)
    for cls in ("gemm", "attn_prefill", "attn_decode", "add"):
        assert on_disk["gpus"]["test-cpu"][cls]["rows"] >= 4


def test_the_devices_residuals_are_its_model_error(profile):
    # each class's residuals, log(measured / predicted) per measured row, are what a model-error run draws from
    from servesim.hwmodels import model_error
    _, doc = profile
    entry = doc["gpus"]["test-cpu"]["gemm"]
    assert len(entry["log_residuals"]) == entry["rows"]
    med = 100 * float(np.median(np.abs(np.exp(entry["log_residuals"]) ** -1 - 1)))
    assert med == pytest.approx(entry["median_ape_pct"], abs=0.02)           # the same rows the fit scored
    src = model_error.sources("test-cpu")["classes"]
    assert src["gemm"] == f"{entry['rows']} rows" and src["attn_decode"] == f"{doc['gpus']['test-cpu']['attn_decode']['rows']} rows"
    f = model_error.draw(["test-cpu"], np.random.default_rng(0))["test-cpu"]
    assert np.isclose(np.log(f["gemm"]), entry["log_residuals"], atol=1e-12).any()


def test_measured_device_works_like_a_catalog_gpu(profile):
    gpu = get_gpu("test-cpu")
    assert gpu.source.startswith("measured by servesim calibrate")
    r = estimate(gpu="test-cpu", model="meta-llama/Llama-3.1-8B", decode=[100] * 4)
    assert r["seconds"] > 0 and math.isfinite(r["seconds"])
    # a decode step cannot beat reading the weights at the measured bandwidth: every parameter but the
    # input embedding table (only the batch's rows of it are read), 16-bit
    read = (8.03e9 - 128256 * 4096) * 2
    assert r["seconds"] > read / gpu.mem_bw


def test_cuda_without_torch_or_gpu_is_a_clear_error():
    with pytest.raises(ConfigError):
        calibrate("numpy", "cuda", None, None, repeats=1)
