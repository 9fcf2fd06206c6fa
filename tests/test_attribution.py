"""Attribution: each step's seconds split by class, each request's latency by phase, summing exactly."""
import copy
from dataclasses import replace

import numpy as np
import pytest

from conftest import BASE, run_raw
from servesim.hwmodels.catalog import get_gpu, get_model
from servesim.hwmodels.roofline import RooflineModel
from servesim.hwmodels.step_time import BatchShape, decode_steps
from servesim.sim.attribution import E2E_PARTS, TTFT_PARTS
from servesim.sim.config import parse_config
from servesim.sim.report import build_report
from servesim.sim.run import simulate

H100 = get_gpu("H100-SXM")
CASES = [("meta-llama/Llama-3.1-8B", 1, 1, False, "bf16"), ("meta-llama/Llama-3.1-70B", 4, 2, False, "fp8"),
         ("Qwen/Qwen3-30B-A3B", 4, 1, True, "bf16"), ("deepseek-ai/DeepSeek-V3", 8, 1, True, "fp8")]


def _split(st):
    return st.compute_s + st.memory_s + st.collective_s + st.overhead_s


@pytest.mark.parametrize("name,tp,pp,ep,dtype", CASES)
def test_roofline_split_sums_to_the_step_time(name, tp, pp, ep, dtype):
    m = RooflineModel(get_model(name), H100, tp=tp, pp=pp, ep=ep, dtype=dtype, overhead_s=3e-4,
                      kv_dtype="fp8" if dtype == "fp8" else "bf16")
    rnd = np.random.default_rng(1)
    for _ in range(30):
        n_pre, n_dec = rnd.integers(0, 4), rnd.integers(0, 80)
        shape = BatchShape(rnd.integers(1, 3000, n_pre).tolist(), rnd.integers(0, 4000, n_pre).tolist(),
                           rnd.integers(1, 8000, n_dec).tolist(), int(n_pre + n_dec))
        st = m.step_time(shape)
        assert _split(st) == pytest.approx(st.seconds, rel=1e-12)
        assert st.overhead_s == 3e-4
        assert (st.collective_s > 0) == (tp > 1 or pp > 1)
        for part in st[3:]:
            assert part >= 0
    ctx = rnd.integers(1, 4000, 40)
    fast, slow = m.decode_steps(ctx, 200).arrays(200), decode_steps(m, ctx, 200).arrays(200)
    np.testing.assert_allclose(fast[3], slow[3], rtol=1e-12, atol=1e-18)     # the split of each step too
    np.testing.assert_allclose(fast[3].sum(axis=0), fast[0], rtol=1e-12)


def test_split_classifies_by_the_binding_roofline_term():
    m = RooflineModel(get_model("meta-llama/Llama-3.1-8B"), H100)
    small = m.step_time(BatchShape(decode_cached=[1000] * 4, num_sampled=4))      # weights read for 4 tokens
    assert small.compute_s == 0 and small.memory_s == pytest.approx(small.seconds, rel=1e-12)
    big = m.step_time(BatchShape([8192], [0], [], 1))                              # one long prompt chunk
    assert big.compute_s > 0.85 * big.seconds      # the GEMMs and attention; norms and adds stay memory-bound
    assert big.memory_s > 0


def _linear_raw(tmp_path, rows, blocks=None, **engine):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n" + "".join(f"{a},{p},{o}\n" for a, p, o in rows))
    raw = copy.deepcopy(BASE)
    g = raw["fleet"]["replicas"][0]
    g["perf_model"] = {"name": "linear", "base_s": 1.0}
    g["engine"] = {"enable_prefix_caching": False, "block_size": 16, **engine}
    if blocks:
        g["engine"]["num_gpu_blocks_override"] = blocks
    raw["workload"] = {"kind": "trace", "path": str(trace)}
    return raw


def test_preemption_timeline_exact_parts(tmp_path):
    # 1 s steps, 3 blocks of 16 tokens. t=0: A and B prefill 16 tokens (1 block each), first tokens at 1.
    # t=1: both need a 2nd block, one is free: A takes it, B (admitted last) is preempted, 16 tokens lost.
    # A decodes alone (its 3rd block at token 33 takes the last free one) and finishes its 20th token at 20.
    # t=20: B recomputes its 17 tokens in one step: KV back at 21 (preempted 1 -> 21), then 18 more tokens.
    res, df = run_raw(_linear_raw(tmp_path, [(0.0, 16, 20), (0.0, 16, 20)], blocks=3))
    a, b = df.iloc[0], df.iloc[1]
    assert (a["finish_s"], b["finish_s"]) == (20.0, 39.0)
    assert (a["queue_s"], a["prefill_s"], a["decode_s"], a["preempted_s"]) == (0.0, 1.0, 19.0, 0.0)
    assert (b["queue_s"], b["prefill_s"], b["decode_s"], b["preempted_s"], b["preempted_ttft_s"]) == \
        (0.0, 1.0, 18.0, 20.0, 0.0)
    assert b["preemptions"] == 1
    # B waited during the 19 one-second steps from t=1 to t=20, each short of KV blocks
    stats = res.metrics.replicas[0]
    assert stats.blocked_s == {"max_num_seqs": 0.0, "token_budget": 0.0, "kv_blocks": 19.0, "policy": 0.0}
    assert stats.preempt_times == [1.0]
    rep = build_report(res, df)
    steps = rep["attribution"]["steps"]
    assert steps["other_s"] == steps["busy_s"] == 39.0                  # a linear model does not split its time
    assert steps["by_kind"]["prefill"]["steps"] == 2 and steps["by_kind"]["decode"]["steps"] == 37


def test_preemption_before_the_first_token_counts_in_ttft(tmp_path):
    # 1 s steps, 3 blocks of 16, budget 16. t=0: A's 16-token prompt takes the budget (B queued by the budget).
    # t=1: A decodes into its 2nd block, B gets a 15-token chunk (the last free block). t=2: B's next chunk
    # needs a block, none is free: B preempted (15 tokens lost). B and A then alternate: B readmitted at odd
    # t, its 15 tokens back at t+1 (2 s lost per round), preempted again, until A's 3rd block (t=16) leaves
    # nothing; B waits until A finishes at 20, recomputes 16 tokens (KV back at 21: 5 s), its last 16 prompt
    # tokens give its first token at 22, its second at 23. Preemption: 7 x 2 + 5 = 19 s, all before TTFT.
    res, df = run_raw(_linear_raw(tmp_path, [(0.0, 16, 20), (0.0, 32, 2)], blocks=3, max_num_batched_tokens=16))
    b = df.iloc[1]
    assert (b["first_scheduled_s"], b["first_token_s"], b["finish_s"], b["preemptions"]) == (1.0, 22.0, 23.0, 8)
    assert (b["queue_s"], b["prefill_s"], b["preempted_ttft_s"], b["preempted_s"], b["decode_s"]) == \
        (1.0, 2.0, 19.0, 19.0, 1.0)
    stats = res.metrics.replicas[0]
    assert stats.preempt_times == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0]
    # queued at t=0 by the budget; short of KV blocks in the 8 preempting steps and at t=17, 18, 19
    assert stats.blocked_s == {"max_num_seqs": 0.0, "token_budget": 1.0, "kv_blocks": 11.0, "policy": 0.0}
    _check_sums(df)


def _check_sums(df):
    fin = df[(df["outcome"] == "finished") & (df["replica"] >= 0)]
    assert len(fin)
    for c in E2E_PARTS + ("preempted_ttft_s",):
        assert (fin[c] >= -1e-12).all(), c
    np.testing.assert_allclose(fin[list(TTFT_PARTS)].sum(axis=1), fin["ttft_s"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fin[list(E2E_PARTS)].sum(axis=1), fin["e2e_s"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variant", ["preempt_swap_offload", "pipeline", "prefix_multi"])
def test_every_request_and_every_step_sums_exactly(variant):
    """Roofline runs with preemption (recompute and swap), KV offload loads, pipeline parallelism, prefix
    caching and several replicas: each request's phases sum to its TTFT and E2E, each step's classes to its
    duration (fast decode runs included), and the per-replica totals to the steps'."""
    raw = copy.deepcopy(BASE)
    g = raw["fleet"]["replicas"][0]
    raw["workload"]["num_requests"] = 300
    raw["workload"]["arrival"]["rate"] = 40.0
    if variant == "preempt_swap_offload":
        g["engine"] = {"num_gpu_blocks_override": 1500, "enable_prefix_caching": True, "preemption_mode": "swap",
                       "swap_space_gib": 4.0, "kv_offload": [{"name": "cpu", "capacity_gib": 8.0,
                                                              "bandwidth_gbps": 20.0}]}
        # returning Mooncake conversations share prefixes: blocks evicted from the GPU come back from the CPU
        raw["workload"] = {"kind": "trace", "path": "bundled:mooncake_conversation_head3000.jsonl.gz",
                           "max_requests": 400, "rate_scale": 4.0}
    elif variant == "pipeline":
        g["model"], g["pipeline_parallel_size"] = "meta-llama/Llama-3.1-70B", 2
        g["tensor_parallel_size"] = 2
    else:
        g["count"] = 3
        g["engine"] = {"num_gpu_blocks_override": 90, "enable_prefix_caching": True}
        raw["policies"] = {"routing": {"name": "prefix_aware"}}
    res = simulate(parse_config(raw), trace_steps=True)
    from servesim.sim.report import request_table
    df = request_table(res)
    _check_sums(df)
    if variant == "preempt_swap_offload":
        assert df["preemptions"].sum() > 0 and res.metrics.replicas[0].swaps > 0
        assert (df["preempted_s"] > 0).any() and (df["loaded_prompt_tokens"] > 0).any()
    t = res.metrics.trace.table()
    split = t["compute_s"] + t["memory_s"] + t["collective_s"] + t["overhead_s"] + t["kv_load_s"]
    np.testing.assert_allclose(split, t["dur"], rtol=1e-9)
    rep = build_report(res, df)
    for r in rep["attribution"]["replicas"]:
        mine = t["replica"] == r["index"]
        for c in ("compute_s", "memory_s", "collective_s", "overhead_s", "kv_load_s"):
            assert r[c] == pytest.approx(float(t[c][mine].sum()), rel=1e-9, abs=1e-12)
        assert r["busy_s"] == pytest.approx(float(t["dur"][mine].sum()), rel=1e-9)
        assert abs(r["other_s"]) <= 1e-9 * r["busy_s"]


def test_offload_loads_are_their_own_part(tmp_path):
    """Returning conversations whose prefixes come back from a CPU tier (tests/test_kv_offload.py): each one's
    kv_load part is exactly its own load time, 131,072 KV bytes per token at 25 GB/s."""
    from test_kv_offload import _returning_conversations
    _, back = _returning_conversations(tmp_path, [{"name": "cpu", "capacity_gib": 100, "bandwidth_gbps": 25}])
    loaded = back[back["loaded_prompt_tokens"] > 0]
    assert len(loaded) >= 8 and (loaded["preemptions"] == 0).all()
    np.testing.assert_allclose(loaded["kv_load_s"], loaded["loaded_prompt_tokens"] * 131072 / 25e9, rtol=1e-12)
    assert (back.loc[back["loaded_prompt_tokens"] == 0, "kv_load_s"] == 0).all()
    _check_sums(back)
