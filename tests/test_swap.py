"""Swap preemption: the KV goes to CPU memory and back, priced by bandwidth; nothing is recomputed."""
import copy

import pytest

from conftest import BASE, build_report, run_raw
from servesim.hwmodels.catalog import get_model
from servesim.hwmodels.memory import kv_bytes_per_token


def _raw(mode, swap_gib=4.0):
    raw = copy.deepcopy(BASE)
    raw["sim"] = {"check_invariants": True}
    raw["fleet"]["replicas"][0]["engine"] = {"num_gpu_blocks_override": 120, "max_num_batched_tokens": 256,
                                             "enable_prefix_caching": False, "preemption_mode": mode,
                                             "swap_space_gib": swap_gib, "swap_bandwidth_gbps": 20.0}
    raw["workload"] = {"kind": "synthetic", "num_requests": 300, "arrival": {"process": "poisson", "rate": 15.0},
                       "lengths": {"kind": "independent", "input": {"dist": "uniform", "low": 20, "high": 400},
                                   "output": {"dist": "uniform", "low": 1, "high": 200}}}
    return raw


def test_swapped_requests_are_not_recomputed_and_the_copies_are_priced():
    res, df = run_raw(_raw("swap"))
    rep = build_report(res, df)
    st = res.metrics.replicas[0]
    assert rep["requests"]["preemptions"] > 10 and rep["requests"]["swapped"] == rep["requests"]["preemptions"]
    assert (df["outcome"] == "finished").all()
    assert st.prefill_tokens == df["prompt_tokens"].sum()          # every prompt token computed exactly once
    block_s = kv_bytes_per_token(get_model("meta-llama/Llama-3.1-8B"), 1, 1, "bf16") * 16 / 20e9
    # each swap copies its blocks out and back: swap_s is an even number of block copies, every one priced
    copies = rep["requests"]["swap_s"] / block_s
    assert copies == pytest.approx(round(copies), abs=1e-6) and round(copies) % 2 == 0 and copies > 0


def test_recompute_mode_recomputes_and_swaps_nothing():
    res, df = run_raw(_raw("recompute"))
    rep = build_report(res, df)
    assert rep["requests"]["preemptions"] > 10 and rep["requests"]["swapped"] == 0 and rep["requests"]["swap_s"] == 0
    assert res.metrics.replicas[0].prefill_tokens > df["prompt_tokens"].sum()


def test_a_full_swap_space_falls_back_to_recompute():
    res, df = run_raw(_raw("swap", swap_gib=0.01))                  # 5 blocks of 2 MiB: one small request at most
    rep = build_report(res, df)
    assert 0 < rep["requests"]["swapped"] < rep["requests"]["preemptions"]
    assert (df["outcome"] == "finished").all()


def test_swap_keeps_the_fast_and_plain_paths_identical():
    from test_fast_decode import _same
    raw = _raw("swap")
    raw["sim"]["check_invariants"] = False
    _same(raw)
