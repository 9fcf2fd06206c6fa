"""Roofline sanity and the memory planner against hand calculations."""
import random

import pytest

from servesim.hwmodels.catalog import GIB, get_gpu, get_model
from servesim.hwmodels.memory import kv_bytes_per_token, plan_memory
from servesim.hwmodels.roofline import RooflineModel
from servesim.hwmodels.step_time import BatchShape, StepTime
from servesim.sim.errors import CapacityError

H100, L8B = get_gpu("H100-SXM"), get_model("meta-llama/Llama-3.1-8B")


def test_decode_batch1_is_weight_bandwidth_bound():
    m = RooflineModel(L8B, H100)
    t = m.step_time(BatchShape(decode_cached=[512], num_sampled=1)).seconds
    weight_s = L8B.params * 2 / H100.mem_bw            # 16.06 GB at 3.35 TB/s = 4.8 ms
    assert 4.7e-3 < weight_s < 4.9e-3
    assert weight_s < t < 1.5 * weight_s               # never faster than peak bandwidth; a few ms
    ops = m.breakdown(BatchShape(decode_cached=[512], num_sampled=1))
    for name in ("qkv_proj", "o_proj", "mlp_up", "mlp_down"):
        sec, flops, nbytes = ops[name]
        assert nbytes / H100.mem_bw > flops / H100.bf16_flops   # below the ridge: memory bound
        assert sec >= nbytes / H100.mem_bw                        # and never faster than peak bandwidth


def test_long_prefill_is_compute_bound():
    m = RooflineModel(L8B, H100)
    b = BatchShape(prefill_new=[8192], prefill_cached=[0], num_sampled=1)
    st = m.step_time(b)
    matmul_flops = 2 * 8192 * (L8B.params - 2 * L8B.vocab_size * L8B.hidden_size)  # 2 x params per token
    assert st.flops > matmul_flops
    assert st.seconds > st.flops / H100.bf16_flops                    # never faster than peak FLOPs
    assert st.flops / H100.bf16_flops > 0.5 * st.seconds              # and mostly spent computing
    for name in ("qkv_proj", "mlp_up", "mlp_down", "attn_prefill"):
        sec, flops, nbytes = m.breakdown(b)[name]
        assert flops / H100.bf16_flops > nbytes / H100.mem_bw        # above the ridge: compute bound
        assert sec >= flops / H100.bf16_flops


def test_more_tokens_never_faster():
    m = RooflineModel(L8B, H100)
    prev = 0.0
    for n in (1, 8, 64, 256, 1024, 4096):
        t = m.step_time(BatchShape(prefill_new=[n], prefill_cached=[100], num_sampled=1)).seconds
        assert t >= prev
        prev = t


def test_step_time_equals_breakdown_sum():
    rnd = random.Random(0)
    for name, tp, pp, ep, dtype in (("meta-llama/Llama-3.1-8B", 1, 1, False, "bf16"),
                                    ("meta-llama/Llama-3.1-70B", 4, 1, False, "fp8"),
                                    ("mistralai/Mixtral-8x7B-v0.1", 2, 2, False, "int4"),
                                    ("Qwen/Qwen3-30B-A3B", 4, 1, True, "bf16"),
                                    ("meta-llama/Llama-3.1-70B", 16, 1, False, "bf16"),
                                    ("meta-llama/Llama-3.1-70B", 4, 4, False, "bf16")):
        m = RooflineModel(get_model(name), H100, tp=tp, pp=pp, overhead_s=1e-3, ep=ep, dtype=dtype,
                          kv_dtype="fp8" if dtype == "fp8" else "bf16")
        for _ in range(40):
            pn = [rnd.randint(1, 600) for _ in range(rnd.randint(0, 3))]
            b = BatchShape(pn, [rnd.randint(0, 3000) for _ in pn], [rnd.randint(0, 5000) for _ in range(rnd.randint(1, 30))])
            b.num_sampled = len(b.decode_cached)
            ops = m.breakdown(b)
            st = m.step_time(b)
            assert st.seconds == pytest.approx(sum(o[0] for o in ops.values()), rel=1e-12)
            assert st.flops == pytest.approx(tp * sum(o[1] for o in ops.values()), rel=1e-12)
            assert st.bytes == pytest.approx(tp * sum(o[2] for o in ops.values()), rel=1e-12)


def test_naive_attention_pays_the_score_square():
    """A kernel that materializes the scores (the measured CPU backend's) is priced on the whole new x L
    square, in FLOPs and in bytes written, and step_time still equals the breakdown."""
    from dataclasses import replace
    from servesim.hwmodels.ops import attention_time
    m = RooflineModel(L8B, H100)
    p = replace(m.p_pre, naive=True, seq_overhead=0.0)
    flash = replace(p, naive=False)
    args = (32, 8, 128, 2, 2, 1e15, 1e12)          # heads, kv heads, head_dim, bytes, bytes, peak, bandwidth
    t, f, b = attention_time(p, [(512, 0)], *args)
    t0, f0, b0 = attention_time(flash, [(512, 0)], *args)
    assert (f, b) == (f0, b0)                          # useful work is the same
    square = 4.0 * 32 * 128 * 512 * 512
    assert t == pytest.approx(max(square / (1e15 * p.compute_efficiency) + p.compute_offset_s,
                                  (b + 32 * 512 * 512 * 2) / (1e12 * p.memory_efficiency) + p.memory_offset_s))
    assert t > t0
    m.p_pre, m.p_dec = p, replace(m.p_dec, naive=True)
    b = BatchShape([300, 40], [0, 700], [100, 2000], 4)
    assert m.step_time(b).seconds == pytest.approx(sum(o[0] for o in m.breakdown(b).values()), rel=1e-12)


def test_tp_adds_all_reduce_time_of_the_alpha_beta_formula():
    from servesim.hwmodels.ops import CUSTOM_ALL_REDUCE_MAX_BYTES
    b = BatchShape(decode_cached=[100] * 32, num_sampled=32)
    m = RooflineModel(get_model("meta-llama/Llama-3.1-70B"), H100, tp=4)
    msg = 32 * 8192 * 2
    assert msg <= CUSTOM_ALL_REDUCE_MAX_BYTES                         # vLLM would use its custom all-reduce
    lp = m.profile.link("all_reduce_custom")
    # the faster of the fitted protocols, each base + 2(n-1) alpha + 2(n-1)/n x bytes / (eta x link bandwidth)
    per = min(base + 2 * 3 * alpha + 2 * 3 / 4 * msg / (H100.link_bw * eta) for alpha, eta, base in lp.protocols)
    assert lp.fitted and len(lp.protocols) == 2
    assert m.breakdown(b)["all_reduce"][0] == pytest.approx(per * 2 * 80, rel=1e-12)


def test_replicas_wider_than_a_server_pay_the_network():
    """A100 servers hold 8 GPUs with 25 GB/s of InfiniBand per GPU (aiconfigurator's a100_sxm.yaml). TP=16
    all-reduces over the network, one ring per NIC: 8 x 25 GB/s; with TP=4 x PP=4 the hop between stages 1
    and 2 (GPUs 7 -> 8) leaves the server, the other two stay on NVLink."""
    a100, l70 = get_gpu("A100-80GB-SXM"), get_model("meta-llama/Llama-2-70b-hf")
    assert (a100.gpus_per_node, a100.inter_node_bw) == (8, 25e9)
    b = BatchShape(decode_cached=[100] * 32, num_sampled=32)
    msg = 32 * 8192 * 2
    m = RooflineModel(l70, a100, tp=16)
    lp = m.profile.link("all_reduce_inter")
    assert lp.fitted
    per = min(base + 2 * 15 * alpha + 2 * 15 / 16 * msg / (8 * 25e9 * eta) for alpha, eta, base in lp.protocols)
    assert m.breakdown(b)["all_reduce"][0] == pytest.approx(per * 2 * 80, rel=1e-12)
    m = RooflineModel(l70, a100, tp=4, pp=4)
    assert (m.pp_intra_hops, m.pp_inter_hops) == (2, 1)
    intra, inter = m.profile.link("send_recv"), m.profile.link("send_recv_inter")
    hop = min(base + alpha + msg / (a100.link_bw * eta) for alpha, eta, base in intra.protocols)
    net = min(base + alpha + msg / (25e9 * eta) for alpha, eta, base in inter.protocols)
    assert m.breakdown(b)["send_recv"][0] == pytest.approx(2 * hop + net, rel=1e-12)
    assert net > 3 * hop
    # inside one server nothing changes
    assert RooflineModel(l70, a100, tp=8).tp_inter is False
    assert RooflineModel(l70, a100, tp=2, pp=4).pp_inter_hops == 0


def test_kv_bytes_per_token_gqa_and_mla():
    assert kv_bytes_per_token(L8B, 1, 1, "bf16") == 32 * 2 * 8 * 128 * 2           # 128 KiB
    assert kv_bytes_per_token(L8B, 2, 1, "bf16") == 32 * 2 * 4 * 128 * 2
    assert kv_bytes_per_token(L8B, 16, 1, "fp8") == 32 * 2 * 1 * 128 * 1            # kv heads replicated
    assert kv_bytes_per_token(get_model("deepseek-v3"), 8, 1, "bf16") == 61 * 576 * 2


def test_memory_plan_matches_hand_calculation():
    p = plan_memory(L8B, H100, block_size=16, gpu_memory_utilization=0.9, max_num_batched_tokens=8192,
                    max_num_seqs=256, runtime_overhead_gib=1.0)
    weights = 8.03e9 * 2
    act = 8192 * (2 * 4096 + (32 + 16) * 128 + 3 * 14336) * 2 + 256 * 128256 * 4
    free = 80 * GIB * 0.9 - weights - act - GIB
    assert p.weight_bytes == pytest.approx(weights, rel=1e-12) and p.activation_bytes == act
    assert p.num_blocks == int(free // (131072 * 16))


def test_model_that_does_not_fit_names_the_numbers():
    with pytest.raises(CapacityError, match=r"does not fit on 1 x H100-SXM .*weights 755\.\d+ GiB"):
        plan_memory(get_model("llama3.1-405b"), H100)
    assert plan_memory(get_model("llama3.1-405b"), get_gpu("H200"), tp=8).num_blocks > 0


@pytest.mark.parametrize("alpha,k", [(0.0, 4), (0.6, 1), (0.8, 4), (0.95, 7), (1.0, 3)])
def test_speculative_expected_tokens_matches_monte_carlo(alpha, k):
    import numpy as np
    from servesim.hwmodels.speculative import expected_tokens
    rng = np.random.default_rng(0)
    n = 200_000
    accepted = rng.random((n, k)) < alpha
    # tokens per step = accepted prefix of the draft + the target's own token
    run = np.where(accepted.all(axis=1), k, np.argmin(accepted, axis=1))
    mc = (run + 1).mean()
    se = (run + 1).std() / np.sqrt(n)
    assert abs(expected_tokens(alpha, k) - mc) <= max(4 * se, 1e-12)


def test_speculation_pays_off_only_when_acceptance_is_high():
    from servesim.hwmodels.speculative import speedup
    target = RooflineModel(get_model("meta-llama/Llama-3.1-70B"), H100, tp=4)
    draft = RooflineModel(L8B, H100)
    ctx = [1000] * 4
    assert speedup(target, draft, ctx, 4, 0.9) > 1.5
    assert speedup(target, draft, ctx, 4, 0.1) < 1.0


def test_weight_only_int4_saves_weight_bytes_not_flops():
    bf16 = RooflineModel(L8B, H100, dtype="bf16")
    int4 = RooflineModel(L8B, H100, dtype="int4", kv_dtype="bf16")
    dec = BatchShape(decode_cached=[512], num_sampled=1)
    assert int4.breakdown(dec)["mlp_up"][2] < 0.3 * bf16.breakdown(dec)["mlp_up"][2]      # bytes: 0.52 vs 2 per weight
    assert int4.step_time(dec).seconds < 0.5 * bf16.step_time(dec).seconds
    pre = BatchShape(prefill_new=[8192], prefill_cached=[0], num_sampled=1)
    assert int4.breakdown(pre)["mlp_up"][1] == bf16.breakdown(pre)["mlp_up"][1]          # same FLOPs
    assert int4.breakdown(pre)["mlp_up"][0] == pytest.approx(bf16.breakdown(pre)["mlp_up"][0], rel=0.05)
    p4 = plan_memory(L8B, H100, dtype="int4", kv_dtype="bf16")
    assert p4.weight_bytes == pytest.approx(L8B.params * 0.515625, rel=1e-12)


@pytest.mark.parametrize("assign,ranks", [(64, 4), (512, 8), (4096, 2), (64, 8), (8192, 8)])
def test_moe_imbalance_matches_monte_carlo(assign, ranks):
    import numpy as np
    from servesim.hwmodels.ops import moe_imbalance
    rng = np.random.default_rng(1)
    loads = np.stack([np.bincount(rng.integers(0, ranks, assign), minlength=ranks) for _ in range(4000)])
    mc = loads.max(axis=1).mean() / (assign / ranks)
    # normal approximation of the multinomial: within 5% from 8 assignments per rank, 1-2% from 64
    assert moe_imbalance(assign, ranks) == pytest.approx(mc, rel=0.05 if assign / ranks < 64 else 0.02)


def test_expert_parallel_replaces_the_mlp_all_reduce_with_all_to_alls():
    qwen = get_model("Qwen/Qwen3-30B-A3B")
    b = BatchShape(decode_cached=[500] * 8, num_sampled=8)
    tp_ops = RooflineModel(qwen, H100, tp=4).breakdown(b)
    ep_ops = RooflineModel(qwen, H100, tp=4, ep=True).breakdown(b)
    assert "all_to_all" not in tp_ops and ep_ops["all_to_all"][0] > 0
    assert ep_ops["all_reduce"][0] == pytest.approx(tp_ops["all_reduce"][0] / 2, rel=1e-12)
    # at batch 8, 64 of 128 experts are touched at most: EP reads whole experts on a quarter of the ranks
    assert ep_ops["moe_experts"][2] < tp_ops["moe_experts"][2] * 1.05


def test_mla_absorbed_attention_closed_form():
    ds = get_model("deepseek-v3")
    m = RooflineModel(ds, get_gpu("H200"), tp=8, dtype="fp8", kv_dtype="bf16")
    ctx = 4000
    ops = m.breakdown(BatchShape(decode_cached=[ctx], num_sampled=1))
    heads = 128 / 8
    # per layer: scores over the 512 + 64 latent dims, values over the 512 latent dims, for ctx + 1 keys
    assert ops["attn_decode"][1] == pytest.approx(61 * 2 * heads * (ctx + 1) * (512 + 64 + 512), rel=1e-12)
    # reads the shared latent KV once per layer (576 bf16 values per token) plus the query and output
    kv = 61 * (ctx + 1) * 576 * 2
    assert kv < ops["attn_decode"][2] < kv * 1.01
    assert m.moe_layers == 58 and m.dense_layers == 3
    assert ops["mlp_up"][1] == pytest.approx(3 * 2 * 1 * 7168 * 2 * 18432 / 8, rel=1e-12)   # dense layers only


def test_matmul_flops_are_twice_the_parameters_per_token():
    # dense model: every weight multiplies once per token (2 FLOPs); embeddings are a lookup, not a GEMM
    m = RooflineModel(L8B, H100)
    b = BatchShape(prefill_new=[1], prefill_cached=[0], num_sampled=1)
    ops = m.breakdown(b)
    matmul = sum(ops[k][1] for k in ("qkv_proj", "o_proj", "mlp_up", "mlp_down", "lm_head"))
    assert matmul == pytest.approx(2 * (L8B.params - L8B.vocab_size * L8B.hidden_size), rel=1e-3)


def test_closed_form_decode_runs_equal_step_by_step_pricing():
    """RooflineModel.decode_steps (used by the engine's fast decode path) against step_time one step at a
    time, for dense, MoE with EP, MLA, fp8 and pipeline-parallel models."""
    import numpy as np
    from dataclasses import replace
    from servesim.hwmodels.step_time import decode_steps
    cases = [("meta-llama/Llama-3.1-8B", 1, 1, False, "bf16"), ("meta-llama/Llama-3.1-70B", 4, 2, False, "fp8"),
             ("Qwen/Qwen3-30B-A3B", 4, 1, True, "bf16"), ("deepseek-ai/DeepSeek-V3", 8, 1, True, "fp8")]
    rnd = np.random.default_rng(0)
    for name, tp, pp, ep, dtype in cases:
        m = RooflineModel(get_model(name), H100, tp=tp, pp=pp, ep=ep, dtype=dtype, overhead_s=2e-4,
                          kv_dtype="fp8" if dtype == "fp8" else "bf16")
        for naive in (False, True):
            m.p_dec = replace(m.p_dec, naive=naive)
            ctx = rnd.integers(1, 4000, rnd.integers(1, 64))
            fast = m.decode_steps(ctx, 300)
            slow = decode_steps(m, ctx, 300)
            np.testing.assert_allclose(fast.secs, slow.secs, rtol=1e-12)
            for a, b in zip(fast.arrays(300), slow.arrays(300)):
                np.testing.assert_allclose(a, b, rtol=1e-12)
            for n in (1, 2, 17, 300):                     # a run's totals, in closed form, over its first n steps
                (f, b, parts), (f2, b2, parts2) = fast.sums(n), slow.sums(n)
                assert (f, b) == pytest.approx((f2, b2), rel=1e-12)
                np.testing.assert_allclose(parts, parts2, rtol=1e-12, atol=1e-18)


def test_closed_form_decode_sums_follow_the_binding_term_when_it_changes_inside_a_run():
    """Attention bound by memory up to step 40 and by compute from step 41 on (ct0 + j dct >= mt0 + j dmt from
    j = 40.5): a run's split sums (closed form on each stretch, arrays across the change) equal the per-step
    split summed, and each step's seconds are step 0's plus the growth of the larger term."""
    import numpy as np
    from servesim.hwmodels.roofline import AffineDecodeSteps
    st = StepTime(0.01 + 3 * 1e-4, 5e12, 2e10, 0.004, 0.006 + 3 * 1e-4, 0.0, 0.0)   # step 0: attention memory-bound
    steps = AffineDecodeSteps(st, 100, 3, 6, 0.5e-4, 2e-6, 1e-4, 0.765432e-6, 7.0, 11.0)
    j = np.arange(100)
    attn = 3 * np.maximum(0.5e-4 + j * 2e-6, 1e-4 + j * 0.765432e-6)
    np.testing.assert_allclose(steps.secs, st.seconds + attn - attn[0], rtol=1e-12)
    assert steps._bound(40) is False and steps._bound(41) is False and steps._bound(42) is None
    secs, flops, nbytes, parts = steps.arrays(100)
    assert (parts[0][:41] == st.compute_s).all() and (parts[0][41:] > st.compute_s).all()
    np.testing.assert_allclose(parts.sum(axis=0), secs, rtol=1e-12)
    np.testing.assert_allclose(flops, 5e12 + 6 * 7.0 * j, rtol=1e-15)
    for n in (1, 40, 41, 42, 100):
        f, b, p = steps.sums(n)
        assert f == pytest.approx(flops[:n].sum(), rel=1e-14) and b == pytest.approx(nbytes[:n].sum(), rel=1e-14)
        np.testing.assert_allclose(p, parts[:, :n].sum(axis=1), rtol=1e-12)
