"""Prefill/decode disaggregation: the KV transfer against its formula, decode admission waiting for memory,
nothing lost, phases summing to latency."""
import copy

import numpy as np
import pytest

from conftest import BASE, run_raw
from servesim.sim.config import parse_config
from servesim.sim.errors import ConfigError
from servesim.sim.report import build_report

KV_PER_TOKEN = 131072          # Llama-3.1-8B, bf16, TP1: 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes


def _raw(tmp_path, rows, link, decode_blocks=None, linear=True):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n" + "".join(f"{a},{p},{o}\n" for a, p, o in rows))
    raw = copy.deepcopy(BASE)
    g = {"gpu": "H100-SXM", "model": "meta-llama/Llama-3.1-8B", "engine": {"enable_prefix_caching": False}}
    if linear:
        g["perf_model"] = {"name": "linear", "base_s": 1.0}
    dec = copy.deepcopy(g)
    if decode_blocks:
        dec["engine"]["num_gpu_blocks_override"] = decode_blocks
    raw["fleet"]["replicas"] = [{**g, "name": "p", "role": "prefill"}, {**dec, "name": "d", "role": "decode"}]
    raw["disaggregation"] = link
    raw["workload"] = {"kind": "trace", "path": str(trace)}
    return raw


def test_transfer_time_is_latency_plus_bytes_over_bandwidth(tmp_path):
    # 1 s steps. The prefill replica computes the 1,000-token prompt and the first token at t=1; the KV
    # (1,000 x 131,072 B) takes 10 us + 131 MB / 50 GB/s = 2.63 ms; the decode replica then makes a token
    # per step: the 5th at 1 + t + 4
    res, df = run_raw(_raw(tmp_path, [(0.0, 1000, 5)], {"bandwidth_gbps": 50, "latency_us": 10}))
    t = 10e-6 + 1000 * KV_PER_TOKEN / 50e9
    r = df.iloc[0]
    assert (r["prefill_replica"], r["replica"]) == (0, 1)
    assert r["first_token_s"] == 1.0 and r["kv_transfer_s"] == pytest.approx(t, rel=1e-12)
    assert r["finish_s"] == pytest.approx(1 + t + 4, rel=1e-12)
    assert r["decode_s"] == pytest.approx(4.0, rel=1e-9)
    assert res.metrics.replicas[0].decode_tokens == 0 and res.metrics.replicas[1].prefill_tokens == 0
    rep = build_report(res, df)
    assert rep["disaggregation"]["transfers"] == 1
    assert rep["disaggregation"]["transfer_ms"]["mean"] == pytest.approx(t * 1000)


def test_layerwise_transfer_leaves_only_the_last_layers_share(tmp_path):
    # the prompt took 1 s, far longer than the transfer: only 1/32 of the bytes are left when it is done
    _, df = run_raw(_raw(tmp_path, [(0.0, 1000, 5)], {"bandwidth_gbps": 50, "latency_us": 10, "layerwise": True}))
    assert df["kv_transfer_s"][0] == pytest.approx(10e-6 + 1000 * KV_PER_TOKEN / 50e9 / 32, rel=1e-12)
    # over a slow link the transfer outlasts the prompt: what is not yet sent when it ends is left
    _, df = run_raw(_raw(tmp_path, [(0.0, 1000, 5)], {"bandwidth_gbps": 0.1, "latency_us": 0, "layerwise": True}))
    assert df["kv_transfer_s"][0] == pytest.approx(1000 * KV_PER_TOKEN / 0.1e9 - 1.0, rel=1e-12)


def test_decode_admission_waits_for_decode_memory(tmp_path):
    # the decode replica holds 70 blocks of 16 tokens: A (1,000 + 30 tokens, 65 blocks) runs, B's KV arrives
    # but its 63 blocks do not fit until A finishes
    rows = [(0.0, 1000, 30), (0.0, 1000, 5)]
    res, df = run_raw(_raw(tmp_path, rows, {"bandwidth_gbps": 50, "latency_us": 0}, decode_blocks=70))
    a, b = df.iloc[0], df.iloc[1]
    assert (df["outcome"] == "finished").all()
    # both prompts in one prefill step (t=0 to 1); both KVs land at 1 + t; A decodes, B waits for A's finish
    assert b["finish_s"] > a["finish_s"]
    waits = b["decode_s"] - 4                                    # B's 4 decode steps after its first token
    assert waits == pytest.approx(a["finish_s"] - (1 + b["kv_transfer_s"]), rel=1e-9)
    assert res.metrics.replicas[1].blocked_s["kv_blocks"] > 0


def test_roofline_fleet_loses_nothing_and_phases_sum(tmp_path):
    raw = copy.deepcopy(BASE)
    raw["fleet"]["replicas"] = [
        {"name": "p", "count": 2, "gpu": "H100-SXM", "model": "meta-llama/Llama-3.1-8B", "role": "prefill"},
        {"name": "d", "count": 2, "gpu": "H100-SXM", "model": "meta-llama/Llama-3.1-8B", "role": "decode",
         "engine": {"num_gpu_blocks_override": 60}}]
    raw["disaggregation"] = {"bandwidth_gbps": 50}
    raw["workload"]["num_requests"] = 400
    raw["workload"]["arrival"]["rate"] = 100.0
    res, df = run_raw(raw)
    assert (df["outcome"] == "finished").all() and len(df) == 400
    one = df["output_tokens"] == 1                      # answered by the prefill replica alone
    assert (df.loc[one, "prefill_replica"] == -1).all() and df.loc[one, "replica"].isin([0, 1]).all()
    assert df.loc[~one, "prefill_replica"].isin([0, 1]).all() and df.loc[~one, "replica"].isin([2, 3]).all()
    assert df["preemptions"].sum() > 0                  # the small decode pools preempt
    rep = build_report(res, df)
    assert rep["disaggregation"]["transfers"] == int((~one).sum())
    from servesim.sim.attribution import E2E_PARTS, TTFT_PARTS
    np.testing.assert_allclose(df[list(E2E_PARTS)].sum(axis=1), df["e2e_s"], rtol=1e-9)
    np.testing.assert_allclose(df[list(TTFT_PARTS)].sum(axis=1), df["ttft_s"], rtol=1e-9)
    for pool in res.pools:                              # every block back in the pools at the end
        assert pool.num_used == 0


@pytest.mark.parametrize("roles,link,msg", [
    (["prefill", "prefill"], {"bandwidth_gbps": 50}, "needs prefill and decode groups"),
    (["prefill", "mixed"], {"bandwidth_gbps": 50}, "needs prefill and decode groups"),
    (["prefill", "decode"], None, "need the KV link"),
    (["mixed", "mixed"], {"bandwidth_gbps": 50}, "set fleet.replicas\\[\\].role"),
])
def test_bad_disaggregation_configs(tmp_path, roles, link, msg):
    raw = _raw(tmp_path, [(0.0, 10, 2)], link)
    for g, r in zip(raw["fleet"]["replicas"], roles):
        g["role"] = r
    if link is None:
        del raw["disaggregation"]
    with pytest.raises(ConfigError, match=msg):
        parse_config(raw)
