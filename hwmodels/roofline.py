"""Roofline step-time model: per-op FLOPs and bytes priced with the GPU's fitted op-class profile.

Each op belongs to a class (gemm, attention prefill/decode, norm, add, rope, act) whose cost
parameters come from hwmodels/data/profiles/ (fitted to measured kernels) or, for a GPU without
measurements, from the catalog's efficiencies and kernel floor (hwmodels/profile.py). TP adds two
all-reduces per layer (vLLM's custom all-reduce for small messages, NCCL ring otherwise). MoE layers
either shard every expert over the TP ranks, or, with expert parallelism (vLLM's enable_expert_parallel),
place whole experts on ranks: tokens travel by two all-to-alls, the MLP all-reduce goes away, and the
step waits for the busiest rank (moe_imbalance). With pipeline
parallelism a step's time is the whole pipeline's for one micro-batch: every stage (ceil(layers / pp)
layers each) in turn, with a send/recv of the activations between stages; the engine (sim/replica.py)
overlaps up to pp micro-batches, each holding a stage for 1/pp of that time.
"""
from __future__ import annotations

import math

import numpy as np

from .catalog import GPU, ModelSpec
from .memory import dtype_bytes, engine_constants, kv_bytes_per_token
from .ops import all_reduce_time, attention_time, gemm, inter_node_bandwidth, moe_imbalance
from .profile import profile_for
from .step_time import BatchShape, DecodeSteps, StepTime

LAYER_OPS = ("norm", "qkv_proj", "rope", "attn_prefill", "attn_decode", "o_proj", "add", "mlp_up", "mlp_act",
             "mlp_down", "moe_router", "moe_experts", "all_to_all", "all_reduce")


class RooflineModel:
    def __init__(self, model: ModelSpec, gpu: GPU, *, tp: int = 1, pp: int = 1, dtype: str = "bf16",
                 kv_dtype: str = "bf16", overhead_s: float = 0.0, ep: bool = False,
                 error: dict | None = None):
        self.model, self.gpu, self.tp, self.pp = model, gpu, tp, pp
        self.ep = ep and model.is_moe and tp > 1
        self.overhead_s = overhead_s
        self.wb = dtype_bytes(dtype)
        # activations stay 16-bit in every GPU profile (fp8 GEMM inputs are priced by its fit); fp32 on measured CPUs
        self.ab = 4 if dtype == "fp32" else 2
        m = model
        h, d = m.hidden_size, m.head_dim
        self.profile = profile_for(gpu, engine_constants()["collective_latency_s"])
        if error:                        # a model-error run: each class's ops error[class] times as long
            self.profile = self.profile.scaled(error)
        p = self.profile
        self.p_gemm = p.op("gemm_fp8" if dtype == "fp8" else "gemm")
        # one-row GEMMs (a lone decode token, one sampled row) run as GEMV where the profile measured that
        # kernel separately (CPU BLAS: no packing of the weights, ~3x faster per byte); otherwise as GEMMs
        gemv = p.op("gemv")
        self.p_gemv = gemv if gemv.fitted and dtype != "fp8" else self.p_gemm
        self.p_pre, self.p_dec = p.op("attn_prefill"), p.op("attn_decode")
        self.p_norm, self.p_add, self.p_rope, self.p_act = p.op("norm"), p.op("add"), p.op("rope"), p.op("act")
        self.peak = gpu.peak_flops(dtype)
        self.peak16 = self.peak if dtype == "fp32" else gpu.bf16_flops   # attention and other 16-bit-input ops
        self.bw = gpu.mem_bw
        self.layers = math.ceil(m.num_layers / pp) * pp
        self.heads = m.num_attention_heads / tp
        self.kv_tok = kv_bytes_per_token(m, tp, 1, kv_dtype) / m.num_layers  # KV bytes per token per layer
        H = self.heads
        n_moe = (self.layers - m.first_k_dense_layers) if m.is_moe else 0
        self.moe_layers, self.dense_layers = n_moe, self.layers - n_moe
        # (name, n_out, n_in, layers) of the GEMMs, per GPU; several rows may share a name
        if m.attention == "mla":
            # absorbed MLA (as FlashMLA / vLLM decode): fused q_a + kv_a down-projections, q_b up-projection,
            # W_UK folded into the query, attention over the kv_lora + rope latent, W_UV then o_proj
            ql, kl, r = m.mla_q_lora_rank, m.mla_kv_lora_rank, m.mla_qk_rope_head_dim
            nope, v = m.mla_qk_nope_head_dim, m.mla_v_head_dim
            self.attn_dim = (2 * kl + r) / 2           # QK over kl + r dims, PV over kl: 4 x attn_dim per key
            self.gemms = [("qkv_proj", ql + kl + r, h, self.layers), ("qkv_proj", H * (nope + r), ql, self.layers),
                          ("qkv_proj", H * kl, nope, self.layers), ("o_proj", H * v, kl, self.layers),
                          ("o_proj", h, H * v, self.layers)]
            self.rope_width = 2 * (H + 1) * r
        else:
            self.attn_dim = d
            q_kv = (m.num_attention_heads + 2 * m.num_kv_heads) * d / tp
            self.gemms = [("qkv_proj", q_kv, h, self.layers), ("o_proj", h, H * d, self.layers)]
            self.rope_width = 2 * (m.num_attention_heads + m.num_kv_heads) * d / tp
        self.hd = H * self.attn_dim
        self.kvh = self.kv_tok / (2 * self.attn_dim)  # kv heads x kv dtype bytes, per GPU, in attn_dim units
        dense_i = (m.dense_intermediate_size or m.intermediate_size) / tp
        if self.dense_layers:
            self.gemms += [("mlp_up", 2 * dense_i, h, self.dense_layers), ("mlp_down", h, dense_i, self.dense_layers)]
        i_tp = m.intermediate_size / tp
        self.i_tp = i_tp
        act_total = self.dense_layers * 3 * dense_i + self.moe_layers * 3 * i_tp * max(1, m.experts_per_token)
        self.act_width = act_total / self.layers     # per layer on average, so each layer pays one offset
        self.link_bw = gpu.link_bw or 0.0
        # a replica larger than a server: TP groups wider than a server all-reduce over the network, and
        # pipeline hops between stages on different servers go over it (GPUs numbered stage by stage)
        per = gpu.gpus_per_node if gpu.inter_node_bw else None
        self.tp_inter = bool(per and tp > per)
        self.ar_inter_bw = inter_node_bandwidth("all_reduce_inter", gpu.inter_node_bw, per) if self.tp_inter else 0.0
        self.pp_inter_hops = sum(((k + 1) * tp - 1) // per != ((k + 1) * tp) // per for k in range(pp - 1)) if per else 0
        self.pp_intra_hops = pp - 1 - self.pp_inter_hops
        self._dense_memo: dict = {}          # (tokens, sampled) -> _dense(): the model is immutable once built

    # --- one op each; used by breakdown() -------------------------------------------------
    def _gemm(self, T, n_out, n_in, out_bytes=2):
        f, b = gemm(T, n_out, n_in, self.wb, self.ab, out_bytes)
        return (self.p_gemv if T == 1 else self.p_gemm).time(f, b, self.peak, self.bw), f, b

    def _mem(self, p, nbytes):
        return p.time(0.0, nbytes, self.peak16, self.bw), 0.0, nbytes

    def _all_reduce(self, nbytes: float) -> float:
        if self.tp_inter:
            return self.profile.link("all_reduce_inter").time("all_reduce_inter", nbytes, self.tp, self.ar_inter_bw)
        return all_reduce_time(self.profile, nbytes, self.tp, self.link_bw)

    def _send_recv(self, nbytes: float) -> float:
        """Every hop between pipeline stages: NVLink inside a server, the network between servers."""
        p = self.profile
        t = self.pp_intra_hops * p.link("send_recv").time("send_recv", nbytes, 2, self.link_bw)
        if self.pp_inter_hops:
            t += self.pp_inter_hops * p.link("send_recv_inter").time("send_recv_inter", nbytes, 2, self.gpu.inter_node_bw)
        return t

    def _moe_ops(self, T: int) -> dict[str, tuple[float, float, float]]:
        """One MoE layer for T tokens: router, experts and (with EP) the dispatch/combine all-to-alls."""
        m, ab, tp = self.model, self.ab, self.tp
        h, E, k, sh = m.hidden_size, m.num_experts, m.experts_per_token, m.shared_experts
        ops = {"moe_router": self._gemm(T, E, h)}
        w_full = 3 * h * m.intermediate_size                       # one expert, all of it
        touched = E * (1 - (1 - k / E) ** T)                       # expected distinct routed experts hit
        if self.ep:
            mean = T * k / tp
            load = mean * moe_imbalance(T * k, tp)                 # routed tokens on the busiest rank
            shared = 2 * T * sh * w_full / tp                        # shared experts stay TP-sharded
            b = (touched / tp * w_full + sh * w_full / tp) * self.wb + (load + T * sh) * (h + 3 * m.intermediate_size) * ab
            # all-to-all has the all-gather's traffic pattern: priced with its fitted protocols
            a2a = self.profile.link("all_gather").time("all_gather", T / tp * k * h * ab, tp, self.link_bw)
            # the step waits for the busiest rank; useful FLOPs (for MFU) are the mean rank's
            ops["moe_experts"] = (self.p_gemm.time(2 * load * w_full + shared, b, self.peak, self.bw),
                                  2 * mean * w_full + shared, b)
            ops["all_to_all"] = (2 * a2a, 0.0, 0.0)
        else:
            w = w_full / tp
            f = 2 * T * (k + sh) * w
            b = (touched + sh) * w * self.wb + T * (k + sh) * (h + 3 * self.i_tp) * ab
            ops["moe_experts"] = (self.p_gemm.time(f, b, self.peak, self.bw), f, b)
        return ops

    def breakdown(self, batch: BatchShape) -> dict[str, tuple[float, float, float]]:
        """Per-op (seconds, useful FLOPs, bytes) for the whole step, all layers and stages included."""
        m, L, ab = self.model, self.layers, self.ab
        h = m.hidden_size
        T = sum(batch.prefill_new) + len(batch.decode_cached)
        ops: dict[str, tuple[float, float, float]] = {}
        if T == 0:
            return ops

        def put(name, t, f, b, times=L):
            ops[name] = (t * times, f * times, b * times)

        ops["embed"] = self._mem(self.p_add, 2 * T * h * ab)
        put("norm", *self._mem(self.p_norm, 2 * T * h * ab), times=2 * L)
        for name, n_out, n_in, times in self.gemms:
            t, f, b = self._gemm(T, n_out, n_in)
            old = ops.get(name, (0.0, 0.0, 0.0))
            ops[name] = (old[0] + t * times, old[1] + f * times, old[2] + b * times)
        put("rope", *self._mem(self.p_rope, T * self.rope_width * ab))
        args = (self.heads, self.kvh, self.attn_dim, 1, ab, self.peak16, self.bw)
        if batch.prefill_new:
            put("attn_prefill", *attention_time(self.p_pre, list(zip(batch.prefill_new, batch.prefill_cached)), *args))
        if batch.decode_cached:
            put("attn_decode", *attention_time(self.p_dec, [(1, c) for c in batch.decode_cached], *args))
        put("add", *self._mem(self.p_add, 3 * T * h * ab), times=2 * L)
        if m.is_moe:
            for name, op in self._moe_ops(T).items():
                put(name, *op, times=self.moe_layers)
        put("mlp_act", *self._mem(self.p_act, T * self.act_width * ab))
        if self.tp > 1:
            n_ar = 1 if self.ep else 2   # with EP the MoE output is combined by its all-to-all
            put("all_reduce", self._all_reduce(T * h * ab), 0.0, 0.0, times=n_ar * L)
        if self.pp > 1:
            ops["send_recv"] = (self._send_recv(T * h * ab), 0.0, 0.0)
        S = batch.num_sampled
        if S:
            ops["norm"] = tuple(a + b for a, b in zip(ops["norm"], self._mem(self.p_norm, 2 * S * h * ab)))
            ops["lm_head"] = self._gemm(S, m.vocab_size / self.tp, h, out_bytes=4)  # fp32 logits
            ops["sampling"] = self._mem(self.p_add, 2 * S * m.vocab_size * 4)       # softmax over the vocab
        if self.overhead_s:
            ops["cpu_overhead"] = (self.overhead_s, 0.0, 0.0)
        return ops

    def step_time(self, batch: BatchShape) -> StepTime:
        """The sum of breakdown(), computed without building it (a test holds the two equal): this runs
        once per simulated iteration, so everything that depends only on the token counts is memoized
        (_dense), and decode attention uses its closed form over sum(context). The seconds are split by
        what bounds each op (compute or memory term of its roofline), collectives and CPU overhead."""
        nd = len(batch.decode_cached)
        T = sum(batch.prefill_new) + nd
        if T == 0:
            return StepTime(self.overhead_s, 0.0, 0.0, 0.0, 0.0, 0.0, self.overhead_s)
        S = batch.num_sampled
        dense = self._dense_memo.get((T, S))
        if dense is None:
            if len(self._dense_memo) >= 1 << 16:      # unchunked long prompts: keep the memo bounded
                self._dense_memo.clear()
            dense = self._dense_memo[(T, S)] = self._dense(T, S)
        t, f_all, b_all, tc, tm, tcol, tover = dense
        L = self.layers
        if batch.prefill_new:
            p = self.p_pre
            hd, kv_tok, qo = self.hd, self.kv_tok, 2 * self.hd * self.ab
            s0 = p.seq_overhead
            fs = bs = fe = sq = 0.0
            for n, c in zip(batch.prefill_new, batch.prefill_cached):
                f = 4.0 * hd * n * (c + (n + 1) / 2)
                fs += f
                bs += (c + n) * kv_tok + n * qo
                if p.naive:                      # ops.attention_time: the whole score square
                    f = 4.0 * hd * n * (c + n)
                    sq += n * (c + n)
                fe += f * (1 + s0 / (c + n))
            be = bs + len(batch.prefill_new) * s0 * kv_tok + sq * self.heads * self.ab
            ct = fe / (self.peak16 * p.compute_efficiency) + p.compute_offset_s
            mt = be / (self.bw * p.memory_efficiency) + p.memory_offset_s
            if ct >= mt:
                t += L * ct
                tc += L * ct
            else:
                t += L * mt
                tm += L * mt
            f_all += self.tp * L * fs
            b_all += self.tp * L * bs
        if nd:
            ta, fs, bs, tac = self._decode_attention(sum(batch.decode_cached) + nd, nd)
            t += ta
            tc += tac
            tm += ta - tac
            f_all += self.tp * L * fs
            b_all += self.tp * L * bs
        return StepTime(t, f_all, b_all, tc, tm, tcol, tover)

    def _dense(self, T: int, S: int) -> tuple:
        """Everything in a step of T tokens sampling S of them but attention: (seconds incl. the CPU
        overhead, FLOPs and bytes over all tp GPUs, then the seconds split: compute-bound ops, memory-bound
        ops, collectives, CPU overhead)."""
        m, L, ab = self.model, self.layers, self.ab
        h = m.hidden_size
        peak, bw = self.peak, self.bw
        t = f_all = b_all = tc = tm = tcol = 0.0

        def mem(p, nbytes, times):
            nonlocal t, b_all, tm
            d = times * max(p.compute_offset_s, nbytes / (bw * p.memory_efficiency) + p.memory_offset_s)
            t += d
            tm += d
            b_all += times * nbytes

        def gemm_op(rows, n_out, n_in, times, out_bytes=2):
            nonlocal t, f_all, b_all, tc, tm
            p = self.p_gemv if rows == 1 else self.p_gemm
            f = 2.0 * rows * n_out * n_in
            b = n_in * n_out * self.wb + rows * n_in * ab + rows * n_out * out_bytes
            ct = f / (peak * p.compute_efficiency) + p.compute_offset_s
            mt = b / (bw * p.memory_efficiency) + p.memory_offset_s
            t += times * max(ct, mt)
            if ct >= mt:
                tc += times * ct
            else:
                tm += times * mt
            f_all += times * f
            b_all += times * b

        mem(self.p_add, 2 * T * h * ab, 1)                        # embed
        mem(self.p_norm, 2 * T * h * ab, 2 * L)
        for _, n_out, n_in, times in self.gemms:
            gemm_op(T, n_out, n_in, times)
        mem(self.p_rope, T * self.rope_width * ab, L)
        mem(self.p_add, 3 * T * h * ab, 2 * L)
        if m.is_moe:
            Lm = self.moe_layers
            for name, (ot, of, ob) in self._moe_ops(T).items():
                t += Lm * ot
                f_all += Lm * of
                b_all += Lm * ob
                if name == "all_to_all":
                    tcol += Lm * ot
                else:                 # bound by memory when its time is the memory term of the expert GEMM
                    p = self.p_gemv if (name == "moe_router" and T == 1) else self.p_gemm
                    if ot == ob / (bw * p.memory_efficiency) + p.memory_offset_s:
                        tm += Lm * ot
                    else:
                        tc += Lm * ot
        mem(self.p_act, T * self.act_width * ab, L)
        if self.tp > 1:
            d = (1 if self.ep else 2) * L * self._all_reduce(T * h * ab)
            t += d
            tcol += d
        if self.pp > 1:
            d = self._send_recv(T * h * ab)
            t += d
            tcol += d
        if S:
            mem(self.p_norm, 2 * S * h * ab, 1)
            gemm_op(S, m.vocab_size / self.tp, h, 1, out_bytes=4)
            mem(self.p_add, 2 * S * m.vocab_size * 4, 1)
        g = self.tp  # ops are per GPU; the replica's FLOPs and bytes are tp x those (MFU over all GPUs)
        return t + self.overhead_s, g * f_all, g * b_all, tc, tm, tcol, self.overhead_s

    def _decode_terms(self, C, nd):
        """Decode attention of nd sequences whose KV lengths sum to C, one layer: the compute and memory terms of
        its roofline, its useful FLOPs and bytes. All are affine in C (decode_steps extrapolates them)."""
        p, s0, kv_tok = self.p_dec, self.p_dec.seq_overhead, self.kv_tok
        fs = 4.0 * self.hd * C
        bs = C * kv_tok + nd * 2 * self.hd * self.ab
        fe = 4.0 * self.hd * (C + nd * s0)
        be = bs + nd * s0 * kv_tok
        if p.naive:                                  # ops.attention_time: the score row is written out
            be = be + C * self.heads * self.ab
        ct = fe / (self.peak16 * p.compute_efficiency) + p.compute_offset_s
        mt = be / (self.bw * p.memory_efficiency) + p.memory_offset_s
        return ct, mt, fs, bs

    def _decode_attention(self, C, nd):
        """Decode attention's seconds over all layers, useful FLOPs and bytes of one layer, and the seconds bound
        by compute (all or nothing)."""
        ct, mt, fs, bs = self._decode_terms(C, nd)
        t = self.layers * max(ct, mt)
        return t, fs, bs, t * (ct >= mt)

    def decode_steps(self, ctx, k: int, first: StepTime | None = None) -> DecodeSteps:
        """k consecutive pure-decode steps in closed form (a test holds them equal to step_time one by one):
        from one step to the next only the decode attention changes, its KV lengths summing b more, so its
        compute and memory terms, FLOPs and bytes grow by a constant each step. ctx: the cached tokens of each
        sequence (a list); first: step 0's StepTime when the caller has it."""
        b = len(ctx)
        st = first if first is not None else self.step_time(BatchShape(decode_cached=[int(c) for c in ctx], num_sampled=b))
        C0 = float(sum(ctx)) + b                                        # sum of KV lengths in step 0
        ct0, mt0, fs0, bs0 = self._decode_terms(C0, b)
        ct1, mt1, fs1, bs1 = self._decode_terms(C0 + b, b)              # one step later
        return AffineDecodeSteps(st, k, self.layers, self.tp * self.layers, ct0, ct1 - ct0, mt0, mt1 - mt0,
                                 fs1 - fs0, bs1 - bs0)


class AffineDecodeSteps(DecodeSteps):
    """Roofline decode steps: step j's attention compute and memory terms are ct0 + j dct and mt0 + j dmt (one
    layer), the rest of the step is step 0's. The attention binds on the larger term, and which one changes at
    most once in a run (their difference is affine in j), so over a stretch bound by one term the sums are
    closed forms; the per-step FLOPs, bytes and split are built only when asked for (tracing)."""
    __slots__ = ("st", "L", "g", "ct0", "dct", "mt0", "dmt", "dfs", "dbs")

    def __init__(self, st: StepTime, k: int, L: int, g: int, ct0, dct, mt0, dmt, dfs, dbs):
        self.st, self.L, self.g = st, L, g
        self.ct0, self.dct, self.mt0, self.dmt, self.dfs, self.dbs = ct0, dct, mt0, dmt, dfs, dbs
        j = np.arange(k, dtype=float)
        bound = self._bound(k)
        if bound is not None:           # one term binds every step: seconds grow by L x its slope per step
            self.secs = st.seconds + j * (L * (dct if bound else dmt))
        else:
            self.secs = self._attn(j)[0] + (st.seconds - L * max(ct0, mt0))
            self.secs[0] = st.seconds

    def _bound(self, n: int):
        """True if the compute term binds steps 0 to n - 1 alike, False if the memory term does, None if it
        changes among them."""
        c0 = self.ct0 >= self.mt0
        return c0 if (self.ct0 + (n - 1) * self.dct >= self.mt0 + (n - 1) * self.dmt) == c0 else None

    def _attn(self, j):
        """Attention seconds (all layers) of steps j, and the share of them bound by compute."""
        ct, mt = self.ct0 + j * self.dct, self.mt0 + j * self.dmt
        attn = self.L * np.maximum(ct, mt)
        return attn, attn * (ct >= mt)

    def arrays(self, n: int):
        st, j = self.st, np.arange(n, dtype=float)
        attn, ac = self._attn(j)
        parts = np.empty((4, n))
        parts[0] = ac + (st.compute_s - ac[0])
        parts[1] = (attn - ac) + (st.memory_s - (attn[0] - ac[0]))
        parts[2] = st.collective_s
        parts[3] = st.overhead_s
        parts[:, 0] = st[3:]
        return (self.secs[:n], st.flops + j * (self.g * self.dfs), st.bytes + j * (self.g * self.dbs), parts)

    def sums(self, n: int) -> tuple[float, float, list[float]]:
        st, L = self.st, self.L
        tri = n * (n - 1) / 2                                   # sum of j over the n steps
        bound = self._bound(n)
        if bound is None:                                       # the binding term changes inside the run
            attn, ac = self._attn(np.arange(n, dtype=float))
            A, AC = float(attn.sum()), float(ac.sum())
        else:
            A = L * (n * self.ct0 + tri * self.dct) if bound else L * (n * self.mt0 + tri * self.dmt)
            AC = A if bound else 0.0
        a0 = L * max(self.ct0, self.mt0)
        ac0 = a0 if self.ct0 >= self.mt0 else 0.0
        return (n * st.flops + tri * self.g * self.dfs, n * st.bytes + tri * self.g * self.dbs,
                [n * (st.compute_s - ac0) + AC, n * (st.memory_s - (a0 - ac0)) + (A - AC), n * st.collective_s,
                 n * st.overhead_s])
